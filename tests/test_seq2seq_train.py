"""Training runs of the encoder–decoder (issue 18) through train_seq2seq.py and the engine: exact resumption after
SIGKILL (dropout and router jitter on, so the RNG is part of it), 2-rank mpirun == 1 process, the written model
directory loads and generates, and overfitting a reverse task to >= 99% token accuracy."""
import json
import os
import random
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ENV, PY, ROOT, last_trainable, max_diff, run_script, train_log


def _reverse_records(n, seed, lengths=(4, 7)):
    # digits: the seq2seq recipe splits every digit, so a record's token count depends on its length only
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = [rng.choice("0123456789") for _ in range(rng.randint(*lengths))]
        out.append({"question": " ".join(s), "answer": " ".join(reversed(s))})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from Utils.train_tokenizer import train_tokenizer
    base = tmp_path_factory.mktemp("s2s_train")
    (base / "train.json").write_text(json.dumps(_reverse_records(48, 0)))
    (base / "val.json").write_text(json.dumps(_reverse_records(8, 1)))
    # equal lengths for the 2-rank comparison: per-rank means of the MoE terms (z-loss over real tokens, capacity
    # from the padded length) then equal the global ones, as in tests/test_training.py
    (base / "train_eq.json").write_text(json.dumps(_reverse_records(48, 2, (6, 6))))
    train_tokenizer(str(base / "train.json"), 300, str(base / "tok"), recipe="seq2seq")
    model = {"embed_size": 32, "num_heads": 4, "hidden_dim": 48, "enc_layers": 2, "dec_layers": 2, "style": "switch",
             "encoder_sparse_step": 2, "decoder_sparse_step": 1, "moe": {"num_experts": 4, "top_k": 2}}
    (base / "noisy.json").write_text(json.dumps(dict(model, dropout=0.1, moe=dict(model["moe"], jitter=0.05))))
    (base / "quiet.json").write_text(json.dumps(dict(model, dropout=0.0, moe=dict(model["moe"], jitter=0.0))))
    common = ["--data_path", base / "train.json", "--val_data_path", base / "val.json", "--tokenizer", base / "tok",
              "--batch_size", 4, "--epochs", 2, "--lr", "3e-3", "--warmup_steps", 4, "--log_interval", 1,
              "--save_interval", 1, "--val_generate", 4, "--val_max_new_tokens", 10, "--progress", "false"]
    return SimpleNamespace(base=base, common=[str(a) for a in common])


def _run(args, np_=1, output=None, timeout=600):
    return run_script("train_seq2seq.py", args, np_=np_, timeout=timeout, output=output)


_log, _weights, _max_diff = train_log, last_trainable, max_diff


@pytest.fixture(scope="module")
def noisy_ref(setup):
    out = str(setup.base / "noisy_ref")
    r = _run(setup.common + ["--model_config", setup.base / "noisy.json", "--output_dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_logs_validation_scores_and_writes_a_loadable_model(setup, noisy_ref):
    log = _log(noisy_ref)
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 25))
    vals = [r for r in log if r["kind"] == "val"]
    assert len(vals) == 2 and all(k in vals[0] for k in ("exact_match", "bleu", "chrf", "val_loss"))
    train = [r for r in log if r["kind"] == "train"]
    assert all("aux_switch" in r and "aux_z" in r and "nll" in r and "expert_load" in r for r in train)
    assert set(train[0]["expert_load"]) == {"enc.1", "dec.0", "dec.1"}
    from Models.seq2seq.files import load_model
    model = load_model(os.path.join(noisy_ref, "model"))
    assert model.cfg.vocab_size == model.tokenizer.n_words
    src = model.tokenizer.encode("1 2 3", False, True)
    assert isinstance(model.generate([src], max_new_tokens=5)[0], list)
    r = subprocess.run([PY, os.path.join(ROOT, "generate_seq2seq.py"), "--model", os.path.join(noisy_ref, "model"),
                        "--text", "1 2 3", "--num_beams", "2", "--max_new_tokens", "5"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_sigkill_then_resume_matches_uninterrupted_run(setup, noisy_ref):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # Jittor's SIGCHLD handler would end pytest (test_training.py)
    out = str(setup.base / "killed")
    k = random.randint(3, 18)
    console = open(str(setup.base / "killed.console"), "w")
    args = setup.common + ["--model_config", setup.base / "noisy.json", "--output_dir", out]
    proc = _run(args, output=console)
    log_path, killed_at, deadline = os.path.join(out, "log.txt"), None, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log_path):
            with open(log_path) as f:
                done = [json.loads(x)["step"] for x in f if x.endswith("\n") and '"kind": "train"' in x]
            if done and done[-1] >= k:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done[-1]
                break
        time.sleep(0.005)
    proc.wait()
    console.close()
    assert killed_at is not None, open(console.name).read()[-2000:]
    r = _run(args + ["--resume", "auto"])
    assert r.returncode == 0, "killed at step %d: %s" % (killed_at, r.stderr[-3000:])
    assert _max_diff(_weights(out), _weights(noisy_ref)) <= 1e-6, "killed at step %d" % killed_at
    assert _log(out) == _log(noisy_ref), "killed at step %d" % killed_at


def test_two_ranks_equal_one_process(setup):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    one, two = str(setup.base / "np1"), str(setup.base / "np2")
    args = setup.common + ["--model_config", setup.base / "quiet.json"]
    args[args.index("--data_path") + 1] = str(setup.base / "train_eq.json")
    r = _run(args + ["--output_dir", one])
    assert r.returncode == 0, r.stderr[-3000:]
    args2 = list(args)
    args2[args2.index("--batch_size") + 1] = "2"                     # 2 ranks × 2 = 4
    r = _run(args2 + ["--output_dir", two], np_=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(_weights(two), _weights(one)) <= 1e-5
    a, b = _log(two), _log(one)
    np.testing.assert_allclose([x["loss"] for x in a if x["kind"] == "train"],
                               [x["loss"] for x in b if x["kind"] == "train"], rtol=1e-5)
    assert [x.get("exact_match") for x in a if x["kind"] == "val"] == \
        [x.get("exact_match") for x in b if x["kind"] == "val"]


def test_overfits_a_reverse_task(jt, tmp_path):
    """Issue 18's memorisation check: d 64, 2+2 layers, 4 experts, ≥ 99% token accuracy on the memorised set."""
    from Dataset.seq2seq_data import Seq2SeqData, collate
    from engine.schedule import StepSchedule
    from engine.trainer import TrainConfig, Trainer
    from Models.seq2seq.config import Seq2SeqConfig
    from Models.seq2seq.model import Seq2SeqTransformer
    from Utils.runtime import seed_everything
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(64):
        s = list(rng.integers(3, 16, rng.integers(5, 9)))
        examples.append((s + [1], s[::-1]))
    cfg = Seq2SeqConfig(vocab_size=16, embed_size=64, num_heads=4, hidden_dim=128, enc_layers=2, dec_layers=2,
                        dropout=0.0, style="seed", moe={"num_experts": 4}, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=2)
    seed_everything(0)
    model = Seq2SeqTransformer(cfg)
    steps = 300
    tc = TrainConfig(output_dir=str(tmp_path), lr=3e-3, schedule=StepSchedule(3e-3, steps, 0.0, 20, "cosine"),
                     epochs=1000, max_steps=steps, betas=(0.9, 0.98), clip_grad=1.0, progress=False,
                     token_weighted=True, log_interval=50)
    start = time.time()
    Trainer(model, Seq2SeqData(examples, 16, (0, 2, 1)), tc).fit()
    b = collate(examples, 0, 2, 1)
    model.eval()
    pred = model.logits(b["src"], b["tgt_in"], b["src_mask"]).argmax(-1)
    real = b["tgt_out"] >= 0
    acc = float((pred == b["tgt_out"])[real].mean())
    assert acc >= 0.99, "token accuracy %.4f after %d steps (%.0f s)" % (acc, steps, time.time() - start)
