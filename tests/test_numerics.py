"""Arithmetic that must stay defined for denormal and zero inputs (Jittor's CPU kernels run with flush-to-zero and
fast math, where a fused sqrt of a denormal can come out NaN on some CPUs), and the demo's fine-tune under mpirun
at the demo's own shapes: finite losses and 2 ranks == 1 process."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")

# The values of the report that found the bug: 3e-20 gives v = (1 − β2)·g² ≈ 4.5e-41, a float32 denormal.
DENORMAL_GRADS = np.array([0.0, 1e-30, 3e-20, 1e-13, 1.0, -2e-19, 5e-21, -1e-22], np.float32)


def _torch_adamw(p0, grads, lrs, wd, betas=(0.9, 0.95), eps=1e-8):
    """torch.optim.AdamW's update in float64 (where none of these values is denormal)."""
    p, m, v = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, (g, lr) in enumerate(zip(grads, lrs), 1):
        g = g.astype(np.float64)
        p *= 1 - lr * wd
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p -= lr / (1 - betas[0] ** t) * m / (np.sqrt(v) / np.sqrt(1 - betas[1] ** t) + eps)
    return p


def _adamw_path(jt, kernel):
    """The AdamW update through its CPU kernel (True) or Jittor's element-wise ops (False)."""
    from Models import kernel_config
    if kernel and (jt.flags.use_cuda or jt.flags.cc_type not in ("g++", "clang")):
        pytest.skip("the AdamW kernel applies to the CPU with g++/clang")
    return kernel_config.override(fused_adamw=kernel)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.9, 0.999)])
def test_adamw_step_with_denormal_second_moments_matches_torch(jt, betas, kernel):
    from engine_finetune import AdamW
    from Models import kernel_config
    rng = np.random.default_rng(0)
    n = 4096
    # Every element of a large tensor (one fused kernel over many vector lanes) gets a gradient from the list,
    # mixed with ordinary ones, for several steps: the first at lr = 0 as the demo's warm-up starts.
    grads = [np.where(rng.random(n) < 0.7, rng.choice(DENORMAL_GRADS, n), rng.normal(size=n)).astype(np.float32)
             for _ in range(4)]
    lrs = [0.0, 1e-3, 5e-3, 2e-3]
    p0 = rng.normal(size=n).astype(np.float32)
    p = jt.array(p0)
    opt = AdamW([{"named": [("w", p)], "weight_decay": 0.01}], lr=0.0, betas=betas)
    before = kernel_config.used["fused_adamw"]
    with _adamw_path(jt, kernel):
        for g, lr in zip(grads, lrs):
            opt.param_groups[0]["lr"] = lr
            opt.step({"w": jt.array(g)})
            assert np.isfinite(p.numpy()).all(), "AdamW produced a non-finite weight at lr %g" % lr
    assert (kernel_config.used["fused_adamw"] > before) == kernel
    want = _torch_adamw(p0, grads, lrs, 0.01, betas)
    np.testing.assert_allclose(p.numpy(), want, rtol=2e-6, atol=1e-7)
    # The stored moment is PyTorch's (not floored): only the sqrt's input is.
    v = opt.state["w"]["v"].numpy()
    assert (v >= 0).all() and np.isfinite(v).all()


@pytest.mark.parametrize("kernel", [True, False])
def test_adamw_single_fused_expression_from_the_report(jt, kernel):
    """The report's five values through one AdamW step at lr = 0 and then lr > 0: the weights stay finite and equal
    the float64 formula."""
    from engine_finetune import AdamW
    g = np.array([0.0, 1e-30, 3e-20, 1e-13, 1.0], np.float32)
    p0 = np.ones(5, np.float32)
    p = jt.array(p0)
    opt = AdamW([{"named": [("w", p)], "weight_decay": 0.0}], lr=0.0)
    with _adamw_path(jt, kernel):
        for lr in (0.0, 1e-2):
            opt.param_groups[0]["lr"] = lr
            opt.step({"w": jt.array(g)})
    np.testing.assert_allclose(p.numpy(), _torch_adamw(p0, [g, g], [0.0, 1e-2], 0.0), rtol=1e-6)


def test_rms_norm_of_tiny_and_zero_rows_is_finite(jt):
    """A zero row and a row of denormal-sized values normalise to finite outputs (eps keeps the root normal)."""
    from Models.llama import RMSNorm
    x = np.zeros((3, 64), np.float32)
    x[1] = 1e-30
    x[2] = np.linspace(-1, 1, 64)
    norm = RMSNorm(64, eps=1e-5)
    y = norm(jt.array(x)).numpy()
    assert np.isfinite(y).all()
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-30)


def test_causal_softmax_with_extreme_scores_is_finite(jt):
    """Rows whose scores differ by hundreds (exp underflows to denormals / zero) stay a finite distribution."""
    from Models.kernels import causal_softmax, causal_softmax_available
    T = 8
    s = np.zeros((1, T, T), np.float32)
    s[0, :, 0] = 200.0
    s[0, 3, 1] = -200.0
    scores = jt.array(s)
    if not causal_softmax_available(scores):
        pytest.skip("the CPU softmax kernel does not apply on this device")
    p = causal_softmax(scores, T, 0.5).numpy()
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)


# --------------------------------------------------------------------------------- the demo's fine-tune, 2 ranks
def _demo_shaped_run(tmp, ckpt, data, np_, batch):
    out = os.path.join(tmp, "np%d" % np_)
    cmd = [PY, os.path.join(ROOT, "Math.py"), "--llama_path", ckpt, "--data_path", data, "--output_dir", out,
           "--routing", "soft_moa", "--lora_layers", "0-4", "--lora_targets", "Q,K,V,O,FFN_DOWN", "--lora_rank", "8",
           "--lora_alpha", "8", "--prompt_layers", "0-4", "--p_adapter_layers", "0-4", "--swi_x", "4",
           "--batch_size", str(batch), "--epochs", "10", "--warmup_epochs", "0.2", "--lr", "8e-3",
           "--weight_decay", "0.02", "--max_steps", "4", "--max_seq_len", "128", "--log_interval", "1",
           "--save_interval", "0", "--progress", "false"]
    if np_ > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_)] + cmd
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    import pickle
    with open(os.path.join(out, "checkpoint-last.pkl"), "rb") as f:
        adapters = pickle.load(f)["trainable"]
    return [x["loss"] for x in log if x["kind"] == "train"], adapters


def test_demo_finetune_two_ranks_equals_one_process(tmp_path):
    """The demo's Soft MoA fine-tune (its adapters, router and shapes: dim 128, 4 layers, GQA 4/2, the real
    128,256-token vocabulary, batch 8) for 4 optimizer steps: every loss finite, and 2 ranks × 4 == 1 × 8."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    from Dataset.math_generator import generate_math_dataset
    from Models.tiny_checkpoint import make_tiny_checkpoint
    ckpt = str(tmp_path / "base")
    make_tiny_checkpoint(ckpt, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, seed=3)
    from collections import Counter
    from Dataset.encoding import IGNORE_INDEX, encode_example
    from Models.tokenizer import Tokenizer
    # Like the reference's DDP, each rank's loss is the mean over ITS supervised tokens and ranks are averaged, so
    # 2 ranks equal 1 process exactly only when every example supervises the same number of tokens: keep those.
    tok = Tokenizer()
    pool = generate_math_dataset(600, "task", seed=1)
    n_sup = [sum(t != IGNORE_INDEX for t in encode_example(r, tok, 128)[1]) for r in pool]
    common = Counter(n_sup).most_common(1)[0][0]
    records = [r for r, n in zip(pool, n_sup) if n == common][:32]
    assert len(records) == 32
    data = str(tmp_path / "train.json")
    with open(data, "w") as f:
        json.dump(records, f)
    loss1, w1 = _demo_shaped_run(str(tmp_path), ckpt, data, 1, 8)
    loss2, w2 = _demo_shaped_run(str(tmp_path), ckpt, data, 2, 4)
    assert len(loss1) == len(loss2) == 4
    assert np.isfinite(loss1).all() and np.isfinite(loss2).all()
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    assert sorted(w1) == sorted(w2)
    for k in w1:
        assert np.isfinite(w2[k]).all(), k
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-5, err_msg=k)
