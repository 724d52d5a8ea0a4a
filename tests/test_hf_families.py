"""HF families against transformers (torch runs in tests/oracles/hf_families.py; a missing torch FAILS): Mixtral,
Qwen2-MoE and Qwen3 logits through our loader, aux and total loss, KV-cache greedy decoding, our checkpoints' round
trip, export → transformers load → same logits, adapters on Qwen3 and on an MoE base, and bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tiny_variants import VARIANTS

MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
V = 6400   # minimind's tokenizer: a real tokenizer.json that fits a tiny vocabulary
COMMON = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
              max_position_embeddings=256)
QWEN2 = dict(COMMON, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             num_hidden_layers=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
             router_aux_loss_coef=0.02)
CASES = {  # name: (family, transformers config)
    "mixtral": ("mixtral", dict(COMMON, intermediate_size=48, num_hidden_layers=3, num_local_experts=4,
                                num_experts_per_tok=2, router_aux_loss_coef=0.02)),
    "qwen2_moe_norm": ("qwen2_moe", dict(QWEN2, norm_topk_prob=True)),
    "qwen2_moe_raw": ("qwen2_moe", dict(QWEN2, norm_topk_prob=False, num_experts_per_tok=3)),
    "mixtral_fused": ("mixtral", dict(COMMON, intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen2_moe_fused": ("qwen2_moe", dict(QWEN2, norm_topk_prob=True)),
    "qwen3": ("qwen3", dict(COMMON, intermediate_size=96, head_dim=32, num_hidden_layers=3, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
MOE_CASES = ("mixtral", "qwen2_moe_norm", "qwen2_moe_raw")


def oracle(jobs, tmp):
    """Run the torch oracle on a job list; its failure (torch missing included) fails the test."""
    path = os.path.join(tmp, "jobs%d.json" % len(os.listdir(tmp)))
    with open(path, "w") as f:
        json.dump(jobs, f)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "oracles", "hf_families.py"), path],
                       capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, "HF oracle failed (torch + transformers are required):\n" + r.stderr[-3000:]


def batch():
    rng = np.random.default_rng(7)
    tokens = rng.integers(3, V, size=(2, 20))
    labels = tokens.copy()
    labels[1, :6] = -100        # a prompt part that is not supervised
    return tokens, labels


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Each case written by transformers itself (seeded random init) and its logits / loss / aux loss."""
    tmp = str(tmp_path_factory.mktemp("hf"))
    tokens, labels = batch()
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "labels.npy"), labels)
    jobs, out = [], {}
    for i, (name, (family, cfg)) in enumerate(CASES.items()):
        d = os.path.join(tmp, name)
        jobs.append({"make": d, "family": family, "config": cfg, "seed": 10 + i, "tokenizer": MINIMIND,
                     "fused": name.endswith("_fused")})
        jobs.append({"run": d, "tokens": os.path.join(tmp, "tokens.npy"), "labels": os.path.join(tmp, "labels.npy"),
                     "out": d + ".npz"})
        out[name] = d
    oracle(jobs, tmp)
    return {name: (d, dict(np.load(d + ".npz"))) for name, d in out.items()}


@pytest.fixture(scope="module")
def ours(hf, jt):
    from Models import LLaMA_adapter
    return {name: LLaMA_adapter.from_pretrained(d, max_seq_len=64) for name, (d, _) in hf.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_transformers(hf, ours, name):
    """Per-expert files as transformers writes by default, and its stacked ("fused") form too."""
    tokens, _ = batch()
    if name.endswith("_fused"):
        from Utils.checkpoint_io import read_safetensors
        keys = read_safetensors(os.path.join(hf[name][0], "model.safetensors"), lazy=True)
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    got, want = ours[name].logits(tokens), hf[name][1]["logits"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


def test_configurations_read_as_intended(ours):
    q2, q3, mx = ours["qwen2_moe_norm"].args, ours["qwen3"].args, ours["mixtral"].args
    assert q2.moe_layer_ids() == (1, 3) and q2.attn_bias and q2.moe.shared_gate and q2.moe.norm_topk_prob
    assert q2.ffn_hidden_dim == 96 and q2.moe.expert_hidden == 32 and q2.moe.shared_hidden == 48
    assert not ours["qwen2_moe_raw"].args.moe.norm_topk_prob and ours["qwen2_moe_raw"].args.moe.top_k == 3
    assert q3.qk_norm and q3.tie_word_embeddings and q3.head_dim == 32 and q3.rope_theta == 1e6
    assert ours["qwen3"].llama.output is None
    assert mx.moe_layer_ids() == (0, 1, 2) and mx.moe.norm_topk_prob and mx.moe.aux_switch == 0.02


@pytest.mark.parametrize("name", MOE_CASES)
def test_aux_and_total_loss_equal_transformers(hf, ours, name, jt):
    tokens, labels = batch()
    model, want = ours[name], hf[name][1]
    terms = model.loss_terms({"tokens": jt.array(tokens.astype(np.int32)), "labels": jt.array(labels.astype(np.int32))})
    weights = model.loss_weights()
    aux = float(terms["aux_switch"].item())
    assert aux == pytest.approx(float(want["aux_loss"]), rel=1e-5, abs=1e-6)
    total = sum(weights[k] * float(v.item()) for k, v in terms.items() if k in weights)
    assert weights["aux_switch"] == 0.02
    assert total == pytest.approx(float(want["loss"]), abs=1e-4)
    assert float(terms["lm"].item()) == pytest.approx(float(want["loss"]) - 0.02 * float(want["aux_loss"]), abs=1e-4)


@pytest.mark.parametrize("name", MOE_CASES + ("qwen3",))
def test_kv_cache_greedy_equals_repeated_full_forward(ours, name):
    model = ours[name]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, V, n).tolist() for n in (5, 9)]
    got = model.generate(prompts, 10, temperature=0.0)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(10):
            seq.append(int(model.logits(np.array([seq]))[0, -1].argmax()))
        full = seq[len(p):]
        stop = next((i for i, t in enumerate(full) if t in model.tokenizer.stop_tokens), len(full))
        assert g == full[:stop]


def test_our_moe_checkpoint_round_trips(ours, tmp_path):
    from Models import LLaMA_adapter
    model, out = ours["qwen2_moe_norm"], str(tmp_path / "ours")
    tokens, _ = batch()
    model.save_pretrained(out)
    model.save_pretrained(out)                      # again over the existing directory: swapped in whole
    assert sorted(os.listdir(out)) == ["consolidated.00.pth", "generation_config.json", "params.json",
                                       "tokenizer.json", "tokenizer_config.json"]
    assert not [n for n in os.listdir(str(tmp_path)) if n != "ours"]          # no temporary directory left
    params = json.load(open(os.path.join(out, "params.json")))
    assert params["moe"]["layers"] == [1, 3] and params["moe"]["shared_gate"] and params["attn_bias"]
    back = LLaMA_adapter.from_pretrained(out, max_seq_len=64)
    assert np.array_equal(back.logits(tokens), model.logits(tokens))


# ------------------------------------------------------------------------------------------------ export
def _random_model(jt, args, seed):
    """Our random init, with every 1-D weight (norms, biases) perturbed so a lost or unpermuted one shows."""
    from Models import LLaMA_adapter
    from Models.tokenizer import load_tokenizer
    from Utils.runtime import seed_everything
    seed_everything(seed)
    model = LLaMA_adapter(args, load_tokenizer(MINIMIND))
    rng = np.random.default_rng(seed)
    for name, p in model.llama.named_parameters():
        if len(p.shape) == 1 and "tau" not in name:
            base = 1.0 if "norm" in name else 0.0
            p.update(jt.array((base + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    return model.eval()


EXPORTS = {  # name: (family, ModelArgs fields, max shard bytes)
    "mixtral": ("mixtral", dict(n_layers=2, intermediate_size=48, moe=dict(num_experts=4, top_k=2, aux_switch=0.01)),
                None),
    "qwen2_moe": ("qwen2_moe", dict(n_layers=4, intermediate_size=80, attn_bias=True, moe=dict(
        num_experts=4, top_k=2, layers=[0, 3], expert_hidden=24, shared_experts=1, shared_hidden=40, shared_gate=True,
        norm_topk_prob=False)), 300_000),
    "qwen2_moe_no_shared": ("qwen2_moe", dict(n_layers=2, intermediate_size=80, moe=dict(
        num_experts=4, top_k=2, expert_hidden=24)), None),
    "llama": ("llama", dict(n_layers=2, intermediate_size=96, attn_bias=True, tie_word_embeddings=True), None),
    "qwen3": ("qwen3", dict(n_layers=2, intermediate_size=96, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                            rope_theta=1e6, norm_eps=1e-6), None),
}


@pytest.fixture(scope="module")
def exported(jt, tmp_path_factory):
    from Models.checkpoints import export_hf
    from Models.model_args import ModelArgs
    tmp = str(tmp_path_factory.mktemp("export"))
    tokens, _ = batch()
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    jobs, out = [], {}
    for i, (name, (family, fields, shard)) in enumerate(EXPORTS.items()):
        args = ModelArgs(dim=64, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=64, **fields)
        model = _random_model(jt, args, 20 + i)
        d = os.path.join(tmp, name)
        notes = export_hf(model, d, family, max_shard_bytes=shard or 5 * 10**9)
        jobs.append({"run": d, "tokens": os.path.join(tmp, "tokens.npy"), "labels": None, "out": d + ".npz"})
        out[name] = (model, d, notes)
    oracle(jobs, tmp)
    return {name: (m, d, notes, np.load(d + ".npz")["logits"]) for name, (m, d, notes) in out.items()}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_loads_in_transformers_with_the_same_logits(exported, name):
    model, d, notes, theirs = exported[name]
    tokens, _ = batch()
    assert np.abs(model.logits(tokens) - theirs).max() <= 1e-4
    assert "tokenizer.json" in os.listdir(d)
    if name == "qwen2_moe":     # 300 kB shards: an index and several files, which transformers followed
        index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
        assert len(set(index["weight_map"].values())) > 1
    if name == "qwen2_moe_no_shared":
        assert any("zero weights" in n for n in notes)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_reads_back_exactly(exported, name, jt):
    from Models import LLaMA_adapter
    model, d, _, _ = exported[name]
    back = LLaMA_adapter.from_pretrained(d, max_seq_len=64)
    a, b = model.args, back.args
    rewritten = name == "qwen2_moe_no_shared"   # zero q/k/v biases and a zero shared expert were written for it
    assert (b.moe_layer_ids(), b.qk_norm, b.attn_bias, b.tie_word_embeddings, b.head_dim, b.rope_theta) == \
        (a.moe_layer_ids(), a.qk_norm, a.attn_bias or rewritten, a.tie_word_embeddings, a.head_dim, a.rope_theta)
    if a.moe is not None:
        assert (b.moe.top_k, b.moe.norm_topk_prob, b.moe.aux_switch) == (a.moe.top_k, a.moe.norm_topk_prob,
                                                                         a.moe.aux_switch)
    mine = {k: v.numpy() for k, v in model.llama.state_dict().items()}
    theirs = {k: v.numpy() for k, v in back.llama.state_dict().items()}
    extra = {k for k in theirs if ".shared." in k or k.endswith(".bias")} if rewritten else set()
    assert set(theirs) - extra == set(mine)
    assert all(np.array_equal(mine[k], theirs[k]) for k in mine)
    assert all(not np.any(theirs[k]) for k in extra if not k.endswith("shared.gate.weight"))


def test_export_refuses_what_a_family_cannot_express():
    from Models.hf_config import hf_config_for
    from Models.model_args import ModelArgs
    from Utils.errors import UserError
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=V, moe=dict(
        num_experts=3, top_k=2, layers=[1, 2], router="gmm", expert_sizes=[8, 16, 16], shared_experts=1,
        scoring="topk_softmax", capacity_factor=1.25, aux_z=0.01))
    with pytest.raises(UserError) as e:
        hf_config_for(args, "mixtral")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot export as mixtral")
    for field in ("moe.router='gmm'", "moe.expert_sizes", "moe.shared_experts=1", "moe.scoring='topk_softmax'",
                  "capacity", "moe placement [1, 2]"):
        assert field in msg, field
    with pytest.raises(UserError) as e:
        hf_config_for(args, "qwen2_moe")
    assert "moe.shared_gate=False" in str(e.value) and "moe placement" not in str(e.value)
    with pytest.raises(UserError, match=r"cannot export as llama: .*moe \(MoE layers \[1, 2\]"):
        hf_config_for(args, "llama")
    with pytest.raises(UserError, match=r"qk_norm=False"):
        hf_config_for(ModelArgs(dim=64, n_layers=1, n_heads=4), "qwen3")
    cfg, notes = hf_config_for(ModelArgs(dim=64, n_layers=2, n_heads=4, moe=dict(
        num_experts=4, top_k=2, noisy_gating=True, aux_z=0.1)), "mixtral")
    assert cfg["num_local_experts"] == 4
    assert any("noisy_gating" in n for n in notes) and any("aux_z" in n for n in notes)


def test_export_cli(tmp_path, hf):
    d, out = hf["qwen3"][0], str(tmp_path / "q3")
    r = subprocess.run([sys.executable, "-m", "Models.checkpoints", "export", "--ckpt_dir", d, "--out_dir", out,
                        "--family", "qwen3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == os.path.abspath(out), r.stderr
    from Models.checkpoints import load_hf_checkpoint
    a, b = load_hf_checkpoint(d), load_hf_checkpoint(out)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    r = subprocess.run([sys.executable, "-m", "Models.checkpoints", "export", "--ckpt_dir", d, "--out_dir", out,
                        "--family", "mixtral"], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot export as mixtral" in lines[0], r.stderr


# ------------------------------------------------------------------------------------------------ adapters
HAS_PA = {n for n, v in VARIANTS.items() if v.get("p_adapter_layers")}
# tiny_variants' "every layer" is "0-2" for its 2-layer model; the Qwen3 case has 3 layers (UniPEFT needs all).
QWEN3_VARIANTS = {n: {k: ("0-3" if val == "0-2" else val) for k, val in v.items()} for n, v in VARIANTS.items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_adapters_at_init_leave_qwen3_logits_unchanged(hf, ours, name):
    from Models import LLaMA_adapter
    model = LLaMA_adapter.from_pretrained(hf["qwen3"][0], max_seq_len=64, **QWEN3_VARIANTS[name])
    assert model.num_trainable_params() > 0
    tokens, _ = batch()
    diff = np.abs(model.logits(tokens) - ours["qwen3"].logits(tokens)).max()
    assert diff < 1e-3 if name in HAS_PA else diff <= 1e-5, diff   # PA: Xavier gain 1e-4, tiny but not zero


def test_moa_on_an_moe_base_trains_and_ffn_targets_are_refused(hf, jt):
    from Models import LLaMA_adapter
    from Utils.errors import UserError
    d = hf["qwen2_moe_norm"][0]
    moa = dict(routing="soft_moa", lora_layers="0-4", lora_targets="Q,K,V,O", lora_rank=4, prompt_layers="0-4",
               prompt_len=3, p_adapter_layers="0-4", p_adapter_size=8, swi_x=2)
    model = LLaMA_adapter.from_pretrained(d, max_seq_len=64, **moa).train()
    tokens, labels = (jt.array(a.astype(np.int32)) for a in batch())
    names, params = zip(*model.trainable_parameters())
    base = {k: v.numpy() for k, v in model.named_parameters() if k not in names}
    loss = model(tokens, labels)[0]
    grads = jt.grad(loss, list(params))
    assert any(float(np.abs(g.numpy()).max()) > 0 for g in grads)
    for p, g in zip(params, grads):
        p.update(p - 0.5 * g)
    after = float(model(tokens, labels)[0].item())
    assert np.isfinite(after) and after != pytest.approx(float(loss.item()), abs=1e-7)
    assert all(np.array_equal(v.numpy(), base[k]) for k, v in model.named_parameters() if k in base)
    with pytest.raises(UserError) as e:
        LLaMA_adapter.from_pretrained(d, max_seq_len=64, **dict(moa, lora_targets="Q,FFN_DOWN"))
    assert "\n" not in str(e.value) and "FFN_DOWN cannot attach to layer 1" in str(e.value)
    dense_only = LLaMA_adapter.from_pretrained(d, max_seq_len=64, **dict(moa, lora_layers="0-1",
                                                                        lora_targets="Q,FFN_DOWN"))
    assert dense_only.llama.layers[0].feed_forward.lora_DOWN is not None


# ------------------------------------------------------------------------------------------------ bad inputs
def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **kw):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    for k, v in kw.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))
    return path


@pytest.mark.parametrize("edit,pattern", [
    (dict(model_type="gpt2"), r"config.json: model_type 'gpt2' is not supported"),
    (dict(hidden_size=None), r"config.json: missing field 'hidden_size'"),
    (dict(quantization_config={"bits": 4}), r"config.json: field 'quantization_config' of a qwen3 config"),
    (dict(use_sliding_window=True, sliding_window=16), r"config.json: sliding_window 16 is used"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), r"config.json: rope_parameters"),
    (dict(num_attention_heads="4"), r"config.json: field 'num_attention_heads' = '4' is not an integer"),
])
def test_bad_config_is_one_line_naming_the_field(hf, tmp_path, edit, pattern):
    from Models.model_args import ModelArgs
    from Utils.errors import UserError
    d = _copy(hf["qwen3"][0], str(tmp_path / "c"))
    path = _edit_config(d, **edit)
    with pytest.raises(UserError, match=pattern) as e:
        ModelArgs.from_hf_config(path, max_seq_len=64)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_bad_tensors_are_one_line_naming_file_and_tensor(hf, tmp_path):
    from Models.checkpoints import read_checkpoint
    from Utils.checkpoint_io import read_safetensors, write_safetensors
    from Utils.errors import UserError
    d = _copy(hf["mixtral"][0], str(tmp_path / "m"))
    f = os.path.join(d, "model.safetensors")
    good = read_safetensors(f)
    k = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    for state, pattern in (
            (dict(good, **{k: good[k][:, :40]}), r"tensor '%s' has shape \(64, 40\), expected \(64, 48\)" % k),
            ({n: v for n, v in good.items() if n != k}, r"missing tensor '%s'" % k),
            (dict(good, **{"model.layers.0.mlp.bogus.weight": good[k]}), r"unexpected tensor 'model.layers.0.mlp")):
        write_safetensors(f, state)
        with pytest.raises(UserError, match=pattern) as e:
            read_checkpoint(d, max_seq_len=64)
        assert "\n" not in str(e.value) and d in str(e.value)
