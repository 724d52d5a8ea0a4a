"""The MoE LLM trained from scratch (issue 15 §4): pretrain.py and sft.py on the one engine, the from-scratch init,
the presets' closed-form counts, tied embeddings, KV-cache decoding, SFT masking, the aux loss reaching the
optimizer, overfitting, 2 ranks == 1 process, exact resume after SIGKILL, and one-line errors for bad input."""
import json
import os
import random
import signal
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, last_trainable, max_diff, run_script, train_log
MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
WORDS = ("the of and to in is was for on that with as by at from it an be this which or are module function "
         "returns value list string object").split()
# A tiny wyf3-shaped MoE (interleaved layers, biased router, top-k-then-softmax, tied embeddings, GQA) with the
# aux loss on; router noise/jitter stay off so ranks compute the same maths.
TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 48, "max_seq_len": 24,
        "tie_word_embeddings": True, "norm_eps": 1e-6,
        "moe": {"num_experts": 4, "top_k": 2, "start_layer": 1, "router_bias": True, "scoring": "topk_softmax",
                "aux_switch": 0.05}}


def tiny_args(vocab=64, **moe):
    from Models.model_args import ModelArgs
    params = json.loads(json.dumps(TINY))
    params["moe"].update(moe)
    return ModelArgs.create(dict(params, vocab_size=vocab))


def tiny_model(jt, vocab=64, std=0.02, seed=0, trainable="all", **moe):
    from Models.init import init_weights
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(seed)
    model = LLaMA_adapter(tiny_args(vocab, **moe), None, trainable=trainable)
    init_weights(model, std)
    return model


def run_cli(script, args, np_=1, timeout=600, output=None):
    return run_script(script, args, np_=np_, timeout=timeout, output=output)


last_weights = last_trainable


# ------------------------------------------------------------------------------------------------ init and counts
def test_init_weights_normal_and_scaled_residual(jt):
    from Models.init import init_weights
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Utils.runtime import seed_everything
    seed_everything(0)
    args = ModelArgs.create({"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 512, "intermediate_size": 256,
                             "moe": {"num_experts": 4, "top_k": 2, "layers": [1, 3], "shared_experts": 1,
                                     "router_bias": True, "noisy_gating": True}})
    model = LLaMA_adapter(args, None, trainable="all")
    counts = init_weights(model, 0.02)
    resid = 0.02 / np.sqrt(2 * 4)
    seen = set()
    for name, p in model.llama.named_parameters():
        v = p.numpy()
        if name.endswith("norm.weight"):
            assert np.all(v == 1.0), name
        elif name.endswith(".bias"):
            assert np.all(v == 0.0), name
        elif "noise" in name:
            assert np.all(v == 0.0), name       # noisy gating starts at its noise floor
        else:
            want = resid if name.endswith(("wo.weight", "w2.weight", "experts.w2", "shared.w2")) else 0.02
            assert abs(v.mean()) < 3 * want / np.sqrt(v.size) + 1e-6, name
            assert v.std() == pytest.approx(want, rel=0.08), name
            seen.add(name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1])
    assert {"wo", "w2", "wq", "tok_embeddings", "output", "gate"} <= seen
    assert counts["residual"] == 4 + 2 + 2 * 2                      # wo × 4, dense w2 × 2, experts/shared w2 × 2


def test_dry_run_of_the_wyf3_preset_gives_the_anchors_used_and_active_counts():
    r = run_cli("pretrain.py", ["--preset", "wyf3", "--dry_run"])
    assert r.returncode == 0, r.stderr[-2000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    # seed 001: the anchor builds 135.4 M parameters of which 62.9 M are dead (every layer holds both an FFN
    # and an MoE); its used 72.5 M and ≈47.3 M active per token are exactly our closed form: 6,400×512 tied
    # embedding + 8 attention blocks + 4 dense SwiGLU FFNs + 4 MoE layers of 4 full-width experts and a biased
    # router (72,499,728), minus 2 unused experts in each of the 4 MoE layers for the active count.
    assert counts["total_params"] == 72_499_728 and counts["active_params"] == 47_333_904
    assert counts["moe_layers"] == [1, 3, 5, 7] and counts["vocab_size"] == 6400


def test_wyf3_preset_builds_no_dead_parameters(jt):
    """The built wyf3 model has exactly the closed-form parameters and every tensor gets a gradient."""
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Models.param_count import count_params
    from engine.lm_frontend import read_model_config
    args = ModelArgs.create(dict(read_model_config(os.path.join(ROOT, "configs", "wyf3.json")), vocab_size=6400))
    model = LLaMA_adapter(args, None, trainable="all")
    named = model.trainable_parameters()
    assert sum(int(np.prod(p.shape)) for _, p in named) == count_params(args)["total"] == 72_499_728
    assert not any(k.endswith("output.weight") for k, _ in named)  # tied: the head is the embedding
    tokens = np.random.default_rng(0).integers(3, 6400, (2, 12)).astype(np.int32)
    terms = model.loss_terms({"tokens": jt.array(tokens), "labels": jt.array(tokens)})
    total = terms["lm"] + 0.01 * terms["aux_switch"]
    grads = jt.grad(total, [p for _, p in named])
    dead = [n for (n, _), g in zip(named, grads) if not np.any(g.numpy())]
    assert dead == []
    del model, grads
    jt.gc()


# ------------------------------------------------------------------------------------------------ model behaviour
def test_tied_head_is_the_embedding_var_and_stays_tied_through_save_and_load(jt, tmp_path):
    from Models.llama_adapter import LLaMA_adapter
    from Models.tokenizer import load_tokenizer
    model = tiny_model(jt, vocab=6400)
    llama = model.llama
    assert llama.output is None and llama.head_weight is llama.tok_embeddings.weight
    # one Var: the gradient of the tied weight is the embedding's part plus the head's part
    tokens = np.random.default_rng(0).integers(3, 6400, (2, 10)).astype(np.int32)
    batch = {"tokens": jt.array(tokens), "labels": jt.array(tokens)}
    g_tied = jt.grad(model.loss_terms(batch)["lm"], llama.tok_embeddings.weight).numpy()
    from Models.model_args import ModelArgs
    untied = LLaMA_adapter(ModelArgs.create(dict(model.args.to_dict(), tie_word_embeddings=False)), None,
                           trainable="all")
    for name, p in untied.llama.named_parameters():
        src = llama.tok_embeddings.weight if name == "output.weight" else dict(llama.named_parameters())[name]
        p.update(src.clone())
    ge, gh = jt.grad(untied.loss_terms(batch)["lm"], [untied.llama.tok_embeddings.weight, untied.llama.output.weight])
    np.testing.assert_allclose(g_tied, ge.numpy() + gh.numpy(), atol=1e-6)
    # update the embedding: the head changes with it
    before = model.logits(tokens[:1])
    llama.tok_embeddings.weight.update(llama.tok_embeddings.weight * 1.5)
    assert not np.allclose(model.logits(tokens[:1]), before)
    model.tokenizer = load_tokenizer(MINIMIND)
    out = str(tmp_path / "tied")
    model.save_pretrained(out)
    assert json.load(open(os.path.join(out, "params.json")))["tie_word_embeddings"] is True
    back = LLaMA_adapter.from_pretrained(out, trainable="all")
    assert back.llama.output is None and back.llama.head_weight is back.llama.tok_embeddings.weight
    np.testing.assert_allclose(back.logits(tokens[:1]), model.logits(tokens[:1]), atol=1e-5)


def test_kv_cache_greedy_equals_no_cache_greedy_for_the_moe_lm(jt):
    model = tiny_model(jt, vocab=64, std=0.3)   # decisive logits: argmax ties would make the check vacuous
    model.eval()

    class NoStop:
        stop_tokens = ()
    model.tokenizer = NoStop()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 64, n).tolist() for n in (3, 7)]
    got = model.generate(prompts, 12, temperature=0.0)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(12):
            seq.append(int(model.logits(np.array([seq]))[0, -1].argmax()))
        assert g == seq[len(p):]
    assert len(set(got[0])) > 1      # not one repeated token


def _sft_batch(tokenizer, max_len=64):
    from Dataset.lm_batches import collate
    from Dataset.sft_data import encode_conversation
    convs = [[{"role": "user", "content": "Reverse the order of these words: apple river stone"},
              {"role": "assistant", "content": "stone river apple"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3, 1, 2"},
              {"role": "assistant", "content": "1, 2, 3"}]]
    rows = [encode_conversation(m, tokenizer, max_len)[:2] for m in convs]
    return convs, rows, collate(rows)


def test_sft_loss_is_on_answer_tokens_only(jt):
    from Dataset.encoding import IGNORE_INDEX
    from Models.tokenizer import load_tokenizer
    tok = load_tokenizer(MINIMIND)
    convs, rows, batch = _sft_batch(tok)
    # the supervised positions are exactly each answer's tokens and its end-of-turn token
    for (ids, labels), conv in zip(rows, convs):
        answer = tok.encode(conv[-1]["content"], bos=False, eos=False) + [tok.eos_id]
        sup = [int(t) for t, l in zip(ids, labels) if l != IGNORE_INDEX]
        assert sup == answer
    model = tiny_model(jt, vocab=tok.n_words, std=0.1)
    model.eval()

    def loss(tokens, labels):
        b = {"tokens": jt.array(tokens), "labels": jt.array(labels), "token_mask": jt.array(batch["token_mask"])}
        return float(model.loss_terms(b)["lm"].item())

    tokens, labels = batch["tokens"], batch["labels"]
    base = loss(tokens, labels)
    # oracle: the token-mean cross-entropy over exactly the answer positions, from full logits
    logits = model.logits(tokens).astype(np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    tgt, pos = labels[:, 1:], np.argwhere(labels[:, 1:] != IGNORE_INDEX)
    nll = [-lp[b, t, tgt[b, t]] for b, t in pos]
    assert base == pytest.approx(float(np.mean(nll)), rel=1e-5)
    # labels built from other ids at the prompt positions (the pipeline masks them): the loss is unchanged
    prompt = labels == IGNORE_INDEX
    other_ids = np.where(prompt, (tokens + 7) % tok.n_words, tokens)
    relabelled = np.where(prompt, IGNORE_INDEX, other_ids).astype(np.int32)
    assert loss(tokens, relabelled) == base
    # a different answer token changes it
    changed = labels.copy()
    b, t = np.argwhere(labels != IGNORE_INDEX)[0]
    changed[b, t] = (changed[b, t] + 11) % tok.n_words
    assert loss(tokens, changed) != pytest.approx(base, rel=1e-6)


# ------------------------------------------------------------------------------------------------ the engine
class _Rows:
    """A data object (the engine's protocol) over fixed rows, one optimizer step = every row."""

    def __init__(self, rows, batch_size):
        from Dataset.lm_batches import LMData
        self.inner = LMData(rows, batch_size)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def _trainer(model, data, lr, steps, out, clip_grad=1.0):
    from engine.schedule import StepSchedule
    from engine.trainer import Trainer, TrainConfig
    cfg = TrainConfig(output_dir=out, lr=lr, schedule=StepSchedule(lr, steps, kind="constant"), epochs=10 ** 6,
                      max_steps=steps, token_weighted=True, clip_grad=clip_grad, progress=False, save_interval=0,
                      log_interval=10 ** 6, weight_decay=0.0)
    return Trainer(model, data, cfg, print_fn=lambda *a: None)


def test_aux_loss_reaches_the_optimizer_with_its_coefficient(jt, tmp_path):
    """total = lm + coef·aux in the step's record, and the router's update moves with the coefficient
    (minimind#140: an aux loss that is computed but never added leaves the router's gradient unchanged)."""
    rng = np.random.default_rng(0)
    rows = [(r, r) for r in (rng.integers(3, 64, 16).astype(np.int32) for _ in range(4))]
    batch = [_Rows(rows, 4).inner.batches(0).__next__()[1]]
    grads = {}
    for coef in (0.0, 0.5):
        model = tiny_model(jt, aux_switch=coef)
        tr = _trainer(model, _Rows(rows, 4), 1e-3, 1, str(tmp_path), clip_grad=0.0)   # gradients as computed
        tr.optimizer.step = lambda g, scale=1.0, coef=coef: grads.__setitem__(
            coef, {k: v.numpy() * scale for k, v in g.items()})
        rec = tr.optimizer_step(batch, 1e-3, 0, 0)
        if coef:
            assert rec["loss"] == pytest.approx(rec["lm"] + coef * rec["aux_switch"], rel=1e-6)
            assert rec["aux_switch"] > 1.0    # the Mixtral form: k (= 2) at balance, E at collapse
        else:
            assert "aux_switch" not in rec and rec["loss"] == pytest.approx(rec["lm"], rel=1e-6)
    # d(total)/d(aux) = coef: the difference of the two router gradients is coef × the aux term's own gradient
    model = tiny_model(jt, aux_switch=0.5)
    named = dict(model.trainable_parameters())
    router = [n for n in named if "router" in n]
    assert router
    terms = model.loss_terms({k: jt.array(v) for k, v in batch[0].items()})
    g_aux = jt.grad(terms["aux_switch"], [named[n] for n in router])
    for n, g in zip(router, g_aux):
        diff = grads[0.5][n] - grads[0.0][n]
        assert np.abs(diff).max() > 1e-6, n                               # the aux loss changes the update
        np.testing.assert_allclose(diff, 0.5 * g.numpy(), atol=2e-6, rtol=1e-3)


def test_tiny_moe_lm_overfits_four_sequences(jt, tmp_path):
    rng = np.random.default_rng(0)
    rows = [(r, r) for r in (rng.integers(3, 64, 16).astype(np.int32) for _ in range(4))]
    model = tiny_model(jt)
    tr = _trainer(model, _Rows(rows, 4), 1e-2, 300, str(tmp_path))
    t0 = time.time()
    tr.fit()
    losses = [json.loads(l) for l in open(os.path.join(str(tmp_path), "log.txt"))]
    assert tr.state.step == 300
    terms = model.loss_terms({k: jt.array(v) for k, v in _Rows(rows, 4).inner.batches(0).__next__()[1].items()})
    assert float(terms["lm"].item()) < 0.1, "lm loss %.3f after 300 steps (%.0fs)" % (terms["lm"].item(),
                                                                                       time.time() - t0)
    assert losses[-1]["event"] == "done"


# ------------------------------------------------------------------------------------------------ the CLIs
def _corpus(path, n=120, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40)))}) + "\n")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    from Dataset.instruction_generator import write_splits
    base = tmp_path_factory.mktemp("lm")
    corpus, cfg = str(base / "corpus.jsonl"), str(base / "tiny.json")
    _corpus(corpus)
    with open(cfg, "w") as f:
        json.dump(dict(TINY, _comment="a tiny wyf3-shaped MoE"), f)
    write_splits(str(base / "sft"), 48, 8, 0, seed=0)
    common = ["--model_config", cfg, "--data_path", corpus, "--val_split", "0.1", "--batch_size", 2, "--lr", "3e-3",
              "--max_steps", 8, "--warmup_steps", 2, "--log_interval", 1, "--save_interval", 1, "--val_interval", 4,
              "--progress", "false"]
    return base, corpus, cfg, common


@pytest.fixture(scope="module")
def pretrain_ref(cli):
    """Uninterrupted 1-process pretraining, 2 micro-batches of 2 per step (the 2-rank run's global batch)."""
    base, _, _, common = cli
    out = str(base / "ref")
    r = run_cli("pretrain.py", common + ["--accum_iter", 2, "--output_dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_pretrain_writes_a_loadable_model_and_a_summary(cli, pretrain_ref, jt):
    from Models.llama_adapter import LLaMA_adapter
    model = LLaMA_adapter.from_pretrained(os.path.join(pretrain_ref, "model"))
    assert model.args.moe is not None and model.args.vocab_size == 6400 and model.llama.output is None
    summary = json.load(open(os.path.join(pretrain_ref, "train_summary.json")))
    assert summary["steps"] == 8 and summary["params"]["total"] > summary["params"]["active"]
    recs = train_log(pretrain_ref, ("train",))
    assert all("aux_switch" in r and "lm" in r and r["expert_load"]["1"] for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"]


def test_pretrain_two_ranks_equal_one_process(cli, pretrain_ref):
    base, _, _, common = cli
    out = str(base / "np2")
    r = run_cli("pretrain.py", common + ["--output_dir", out], np_=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(last_weights(out), last_weights(pretrain_ref)) <= 2e-5
    a, b = train_log(out), train_log(pretrain_ref)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    np.testing.assert_allclose([x.get("loss", x.get("val_loss")) for x in a],
                               [x.get("loss", x.get("val_loss")) for x in b], rtol=2e-5)


def test_pretrain_resumes_exactly_after_sigkill(cli, pretrain_ref):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # Jittor's handler would end this pytest when the child dies
    base, _, _, common = cli
    out = str(base / "killed")
    k = random.randint(2, 6)
    console = open(str(base / "killed.console"), "w")
    proc = run_cli("pretrain.py", common + ["--accum_iter", 2, "--output_dir", out], output=console)
    log_path, killed_at, deadline = os.path.join(out, "log.txt"), None, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log_path):
            with open(log_path) as f:
                done = [json.loads(x)["step"] for x in f if x.endswith("\n") and '"train"' in x]
            if done and done[-1] >= k:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done[-1]
                break
        time.sleep(0.005)
    proc.wait()
    console.close()
    assert killed_at is not None, open(console.name).read()[-2000:]
    r = run_cli("pretrain.py", common + ["--accum_iter", 2, "--output_dir", out, "--resume", "auto"])
    assert r.returncode == 0, "killed at step %d: %s" % (killed_at, r.stderr[-3000:])
    assert max_diff(last_weights(out), last_weights(pretrain_ref)) <= 1e-6, "killed at step %d" % killed_at
    assert train_log(out) == train_log(pretrain_ref), "killed at step %d" % killed_at


def test_sft_two_ranks_equal_one_process_with_unequal_lengths(cli, pretrain_ref):
    base = cli[0]
    common = ["--init_from", os.path.join(pretrain_ref, "model"), "--data_path", str(base / "sft" / "train.jsonl"),
              "--val_data_path", str(base / "sft" / "validation.jsonl"), "--batch_size", 2, "--max_seq_len", 96,
              "--lr", "1e-3", "--max_steps", 6, "--log_interval", 1, "--progress", "false"]
    one, two = str(base / "sft1"), str(base / "sft2")
    r = run_cli("sft.py", common + ["--accum_iter", 2, "--output_dir", one])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("sft.py", common + ["--output_dir", two], np_=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert max_diff(last_weights(one), last_weights(two)) <= 2e-5
    a, b = train_log(one), train_log(two)
    np.testing.assert_allclose([x.get("loss", x.get("val_loss")) for x in a],
                               [x.get("loss", x.get("val_loss")) for x in b], rtol=2e-5)
    from Dataset.sft_data import read_conversations
    lengths = {len(str(m)) for m, _ in read_conversations(str(base / "sft" / "train.jsonl"))}
    assert len(lengths) > 10                            # the conversations really differ in length
    assert os.path.isfile(os.path.join(one, "model", "consolidated.00.pth"))


# ------------------------------------------------------------------------------------------------ bad input
def _fails(capsys, script, argv):
    """Run a front end's main() in this process; it must exit 2 with one line on stderr, no traceback."""
    import importlib
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as e:
        mod.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_errors_and_nothing_on_disk_is_lost(cli, pretrain_ref, capsys, tmp_path, jt):
    base, corpus, cfg, _ = cli
    sys.path.insert(0, ROOT)
    out = str(tmp_path / "out")
    short = ["--batch_size", 2, "--max_steps", 1, "--progress", "false", "--output_dir", out]
    bad = str(tmp_path / "bad.jsonl")
    with open(bad, "w") as f:
        f.write('{"text": "a fine line"}\n\n{"text": "after a blank"}\n')
    assert "line 2: empty line" in _fails(capsys, "pretrain", ["--model_config", cfg, "--data_path", bad] + short)
    with open(bad, "w") as f:
        f.write('{"text": "a fine line"}\n{"text": oops}\n')
    assert "line 2: invalid JSON" in _fails(capsys, "pretrain", ["--model_config", cfg, "--data_path", bad] + short)
    with open(bad, "w") as f:
        f.write('{"text": ""}\n')
    assert "line 1: field 'text' is empty" in _fails(capsys, "pretrain", ["--model_config", cfg, "--data_path", bad]
                                                     + short)
    assert not os.path.exists(out)                                      # nothing written for bad data
    # configurations
    for params, want in ((dict(TINY, vocab_size=100), "does not fit the tokenizer"),
                         (dict(TINY, moe=dict(TINY["moe"], top_k=5)), "moe.top_k: 5 must be between 1 and "
                                                                      "num_experts 4"),
                         (dict(TINY, n_layer=2), "unknown key 'n_layer'")):
        with open(str(tmp_path / "c.json"), "w") as f:
            json.dump(params, f)
        assert want in _fails(capsys, "pretrain", ["--model_config", str(tmp_path / "c.json"), "--data_path",
                                                   corpus] + short)
    assert "bfloat16 runs on CUDA only" in _fails(capsys, "pretrain", ["--model_config", cfg, "--data_path", corpus,
                                                                       "--dtype", "bfloat16"] + short)
    assert "not both" in _fails(capsys, "pretrain", ["--model_config", cfg, "--preset", "wyf3", "--data_path",
                                                     corpus] + short)
    # SFT records
    sft_model = os.path.join(pretrain_ref, "model")
    for record, want in (({"conversations": [{"role": "bot", "content": "hi"}]}, 'role "bot" is not one of'),
                         ({"conversations": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
                         ({"instruction": 3, "output": "x"}, "field 'instruction' is a number")):
        with open(bad, "w") as f:
            f.write(json.dumps({"instruction": "ok", "output": "fine"}) + "\n" + json.dumps(record) + "\n")
        err = _fails(capsys, "sft", ["--init_from", sft_model, "--data_path", bad] + short)
        assert "line 2" in err and want in err, err
    with open(bad, "w") as f:
        f.write(json.dumps({"instruction": "word " * 40, "output": "x"}) + "\n")
    assert "has an answer token within max_seq_len=16" in _fails(
        capsys, "sft", ["--init_from", sft_model, "--data_path", bad, "--max_seq_len", 16] + short)
    assert not os.path.exists(out)
    # an earlier run in --output_dir is kept, not overwritten
    ref = pretrain_ref
    before = open(os.path.join(ref, "checkpoint-last.pkl"), "rb").read()
    assert "already holds checkpoint-last.pkl" in _fails(capsys, "pretrain", [
        "--model_config", cfg, "--data_path", corpus, "--batch_size", 2, "--progress", "false", "--output_dir", ref])
    assert open(os.path.join(ref, "checkpoint-last.pkl"), "rb").read() == before


def test_split_corpus_holds_out_whole_documents_at_the_end():
    from Dataset.pretrain_data import Corpus, split_corpus
    from Utils.errors import UserError
    tokens = np.arange(20, dtype=np.int32)
    c = Corpus(tokens, np.array([0, 4, 9, 15, 20]), "x", False)
    tr, va = split_corpus(c, 0.3)                           # ceil(0.3 × 4) = 2 documents held out
    assert tr.tokens.tolist() == list(range(9)) and tr.offsets.tolist() == [0, 4, 9]
    assert va.tokens.tolist() == list(range(9, 20)) and va.offsets.tolist() == [0, 6, 11]
    with pytest.raises(UserError):
        split_corpus(c, 0.99)
