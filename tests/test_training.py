"""Training loop (docs/moa.md §5, decisions D3, D5, D7, D11): AdamW against a numpy oracle, data sharding, gradient
accumulation, 2-rank mpirun == 1 process, exact resumption after SIGKILL, crash-safe checkpoints, the output-dir
lock, strict CLI flags and the analytic dry run."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ENV, PY, ROOT, last_trainable, max_diff, run_script, train_log

# A tiny Soft MoA: every adapter type (LoRA on 5 targets, prompt, parallel adapter) and a SwiGLU type router.
ADAPTER_FLAGS = ["--lora_layers", "0-2", "--lora_rank", "4", "--lora_targets", "Q,K,V,O,FFN_DOWN",
                 "--prompt_layers", "0-2", "--prompt_len", "4", "--p_adapter_layers", "0-2", "--p_adapter_size", "8",
                 "--swi_x", "2", "--max_seq_len", "64"]


def _records(n):
    # Every record has the same token count, so a per-rank mean equals the global mean (the reference's DDP
    # averages per-rank means; with unequal supervised-token counts 1-proc and 2-proc runs differ by design).
    return [{"instruction": "What is %d plus %d?" % (a, a + 1), "input": "", "output": "The answer is %d." % (2 * a + 1),
             "answer": str(2 * a + 1)} for a in range(100, 100 + n)]


def _math(args, cwd=ROOT, np_=1, timeout=300, output=None):
    """Run Math.py to completion; with `output` (a file object) start it in the background instead."""
    return run_script("Math.py", args, np_=np_, timeout=timeout, output=output, cwd=cwd)


_log, _last_adapters, _max_diff = train_log, last_trainable, max_diff


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from Models.tiny_checkpoint import make_tiny_checkpoint
    base = tmp_path_factory.mktemp("train")
    ckpt = str(base / "ckpt")
    make_tiny_checkpoint(ckpt)
    data = str(base / "train.json")
    with open(data, "w") as f:
        json.dump(_records(48), f)
    common = ["--llama_path", ckpt, "--data_path", data, "--batch_size", 4, "--epochs", 2, "--warmup_epochs", 1,
              "--lr", "1e-2", "--log_interval", 1, "--save_interval", 1, "--progress", "false"] + ADAPTER_FLAGS
    return SimpleNamespace(base=base, ckpt=ckpt, data=data, common=common)


@pytest.fixture(scope="module")
def reference_run(setup):
    """The uninterrupted single-process run (24 optimizer steps) several tests compare against."""
    out = str(setup.base / "ref")
    r = _math(setup.common + ["--output_dir", out])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------------------------- optimizer
def _numpy_adamw(params, grads_per_step, lrs, wds, betas=(0.9, 0.95), eps=1e-8):
    """torch.optim.AdamW written out in float64 numpy."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), 1):
        for k in p:
            g = grads[k].astype(np.float64)
            p[k] *= 1 - lr * wds[k]
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g
            v[k] = betas[1] * v[k] + (1 - betas[1]) * g * g
            denom = np.sqrt(v[k]) / np.sqrt(1 - betas[1] ** t) + eps
            p[k] -= lr / (1 - betas[0] ** t) * m[k] / denom
    return p, m, v


@pytest.mark.parametrize("kernel", [True, False])   # the CPU AdamW kernel, and Jittor's element-wise ops
def test_adamw_matches_numpy_reference(jt, kernel):
    from engine_finetune import AdamW, param_groups
    from Models import kernel_config
    rng = np.random.default_rng(0)
    init = {"layer.lora_A.weight": rng.normal(size=(4, 8)), "layer.lora_B.weight": rng.normal(size=(8, 4)),
            "layer.router.bias": rng.normal(size=(3,)), "layer.prompt_gate": rng.normal(size=(1, 2, 1, 1)),
            "norm.weight": rng.normal(size=(8,))}
    init = {k: v.astype(np.float32) for k, v in init.items()}
    named = [(k, jt.array(v)) for k, v in init.items()]
    wd = 0.02
    groups = param_groups(named, wd)
    no_decay = {n for n, _ in groups[0]["named"]}
    assert no_decay == {"layer.router.bias", "norm.weight"}          # 1-D or ".bias": no decay (docs/moa.md §5.2)
    opt = AdamW(groups, lr=0.0)
    steps = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()} for _ in range(5)]
    lrs = [0.0, 1e-2, 3e-2, 2e-2, 5e-3]
    before = kernel_config.used["fused_adamw"]
    with kernel_config.override(fused_adamw=kernel):
        for grads, lr in zip(steps, lrs):
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step({k: jt.array(v) for k, v in grads.items()}, grad_scale=0.5)   # a clipping factor
    assert (kernel_config.used["fused_adamw"] > before) == (kernel and not jt.flags.use_cuda)
    scaled = [{k: v * np.float32(0.5) for k, v in grads.items()} for grads in steps]
    ref, ref_m, ref_v = _numpy_adamw(init, scaled, lrs, {k: (0.0 if k in no_decay else wd) for k in init})
    for k, p in named:
        np.testing.assert_allclose(p.numpy(), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
        # the moments show the gradient scale (the update itself hardly depends on it: m/√v is scale-free)
        np.testing.assert_allclose(opt.state[k]["m"].numpy(), ref_m[k], rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(opt.state[k]["v"].numpy(), ref_v[k], rtol=1e-5, atol=1e-8, err_msg=k)
    assert opt.step_count == 5
    # state round trip
    sd = opt.state_dict()
    opt2 = AdamW(param_groups(named, wd), lr=0.0)
    opt2.load_state_dict(pickle.loads(pickle.dumps(sd)))
    assert opt2.step_count == 5
    np.testing.assert_array_equal(opt2.state["layer.lora_A.weight"]["v"].numpy(), sd["v"]["layer.lora_A.weight"])



_ADAMW_PEAK_SCRIPT = r"""
import sys
sys.path.insert(0, %r)
import numpy as np
from Utils.runtime import import_jittor
jt = import_jittor()
from Models import kernel_config
from engine.optim import AdamW, param_groups
R = 2048                                     # 8 parameters of 16 MB each
named = [("w%%d" %% i, jt.array(np.full((R, R), 0.5, np.float32))) for i in range(8)]
opt = AdamW(param_groups(named, 0.01), 1e-3)
grads = {n: jt.array(np.full((R, R), 0.01, np.float32)) for n, _ in named}
jt.sync(list(grads.values()))
def mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) // 1024
open("/proc/self/clear_refs", "w").write("5")   # restart the peak (VmHWM) from here
base = mb("VmRSS")
with kernel_config.override(fused_adamw=%r):
    opt.step(grads, 0.5)
print("GROWTH", mb("VmHWM") - base)
"""


@pytest.mark.parametrize("kernel", [True, False])
def test_adamw_step_holds_one_parameters_temporaries(kernel):
    """The update materialises one parameter at a time and lets the old weight, moments and gradient go: the peak
    grows by about one parameter's new p, m and v (3 × 16 MB here), never by the whole model. The CPU kernel once
    kept every parameter's old buffers alive through the step (+160 MB here, +600 MB in the MoE LM benchmark)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    r = subprocess.run([PY, "-c", _ADAMW_PEAK_SCRIPT % (ROOT, kernel)], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    growth = int(r.stdout.split("GROWTH")[1].split()[0])
    assert growth <= 4 * 16, "AdamW step raised the peak RSS by %d MB (one parameter's temporaries: 48)" % growth

# ----------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("kernel", [True, False])
def test_global_norm_equals_float64_numpy(jt, kernel):
    """The clipping norm over gradients of many sizes (tiny, not a multiple of the 4096-element block, large enough
    for the threads) equals numpy's float64 value, with the multi-threaded kernel and with Jittor's reduction."""
    from engine.optim import global_norm
    from Models import kernel_config
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(n).astype(np.float32) * s for n, s in ((5, 1.0), (4097, 1e-3), (300001, 2.0),
                                                                         (64 * 70, 1e-20))]
    grads.append(rng.standard_normal((257, 300)).astype(np.float32))
    want = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    before = kernel_config.used["grad_norm"]
    with kernel_config.override(grad_norm=kernel):
        got = global_norm([jt.array(g) for g in grads])
    assert (kernel_config.used["grad_norm"] > before) == kernel
    assert got == pytest.approx(want, rel=2e-6 if kernel else 1e-4)


def test_shards_are_disjoint_and_cover_each_global_batch():
    from Dataset.finetune_dataset import EvalData, FinetuneData
    examples = [([i, i + 1], [-100, i + 1]) for i in range(23)]
    single = FinetuneData(examples, batch_size=4, data_seed=3)
    ranks = [FinetuneData(examples, batch_size=2, data_seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == 5 and len(ranks[0]) == len(ranks[1]) == 5          # drop_last: 23 // 4
    for epoch in range(3):
        for i in range(len(single)):
            parts = [set(d.indices(epoch, i).tolist()) for d in ranks]
            assert not parts[0] & parts[1]
            assert parts[0] | parts[1] == set(single.indices(epoch, i).tolist())
    assert not np.array_equal(single.permutation(0), single.permutation(1))   # reshuffled every epoch
    assert np.array_equal(single.permutation(1), FinetuneData(examples, 4, data_seed=3).permutation(1))
    i, batch = next(single.batches(0))
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.dtype == np.int32 and tokens.shape == labels.shape == (4, 2)
    # validation shards keep every example
    ev = [EvalData(examples, 4, r, 2) for r in range(2)]
    assert len(ev[0].shard) + len(ev[1].shard) == 23


def _tiny_model(jt, seed=0):
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Models.tokenizer import Tokenizer
    from Utils.runtime import seed_everything
    seed_everything(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=64,
                     routing="soft_moa", lora_layers="0-2", lora_rank=4, lora_targets="Q,K,V,O,FFN_DOWN",
                     prompt_layers="0-2", prompt_len=4, p_adapter_layers="0-2", p_adapter_size=8, swi_x=2)
    model = LLaMA_adapter(args, Tokenizer())
    model.train()
    return model


def _trainer(model, data, optimizer, tmp_dir="/nonexistent", accum_iter=1):
    """The engine's Trainer over `data` with MoA's schedule (lr 1e-2, no warm-up, one epoch)."""
    from engine.schedule import EpochSchedule
    from engine.trainer import Trainer, TrainConfig
    cfg = TrainConfig(output_dir=tmp_dir, lr=1e-2, schedule=EpochSchedule(1e-2, 0.0, 0.0, 1), epochs=1,
                      accum_iter=accum_iter, log_interval=100, seed=0)
    return Trainer(model, data, cfg, optimizer=optimizer, print_fn=lambda *a: None)


def test_gradient_accumulation_equals_large_batch(jt, tokenizer):
    """batch 4 × accum 1 and batch 2 × accum 2 take identical optimizer steps (bias correction per step)."""
    from Dataset.finetune_dataset import FinetuneData
    from engine_finetune import AdamW, param_groups, train_one_epoch

    class RecordingAdamW(AdamW):  # keeps the gradient handed to every optimizer step
        def step(self, grads, grad_scale=1.0):
            self.seen.append({n: g.numpy() * grad_scale for n, g in grads.items()})
            return super().step(grads, grad_scale)

    results, grads = [], []
    for bs, accum in ((4, 1), (2, 2)):
        model = _tiny_model(jt)
        data = FinetuneData.from_records(_records(12), tokenizer, 64, bs, data_seed=1)
        opt = RecordingAdamW(param_groups(model.trainable_parameters(), 0.02), 1e-2)
        opt.seen = []
        trainer = _trainer(model, data, opt, accum_iter=accum)
        train_one_epoch(trainer, 0)
        state = trainer.state
        assert state.step == 3 and opt.step_count == 3 and state.epoch == 1 and state.micro == 0
        results.append(model.adapter_state_dict())
        grads.append(opt.seen)
    # Every optimizer step sees the same averaged gradient, up to fp32 summation order (relative to each tensor's
    # gradient scale; measured ~3e-8).
    for step, (ga, gb) in enumerate(zip(*grads)):
        assert sorted(ga) == sorted(gb)
        for n in ga:
            scale = max(float(np.abs(ga[n]).max()), 1e-12)
            assert float(np.abs(ga[n] - gb[n]).max()) <= 1e-6 * scale, (step, n)
    # The weights then agree to the tolerance of the 2-rank == 1-process test. Not tighter: Adam divides by √v, so
    # an element whose gradient cancels to ~1e-8 (the first non-zero LoRA-A gradient after B leaves zero) moves by
    # ~lr/2 either way, and a 1e-10 summation-order difference in it shows up as ~3e-6 in the weight. A per-micro-
    # step bias correction (Jittor's default) would differ by ~1e-3.
    assert _max_diff(*results) <= 1e-5


def test_non_finite_loss_stops_before_the_update(jt, tokenizer):
    from Dataset.finetune_dataset import FinetuneData
    from engine_finetune import AdamW, NonFiniteLoss, param_groups, train_one_epoch
    model = _tiny_model(jt)
    calls = {"n": 0}

    class PoisonAtSecondStep:
        """The model, except that its second micro-batch's loss is NaN."""
        def train(self):
            model.train()

        def trainable_parameters(self):
            return model.trainable_parameters()

        def loss_weights(self):
            return model.loss_weights()

        def loss_terms(self, batch):
            calls["n"] += 1
            terms = model.loss_terms(batch)
            return dict(terms, lm=terms["lm"] * float("nan")) if calls["n"] == 2 else terms

    data = FinetuneData.from_records(_records(12), tokenizer, 64, 4)
    opt = AdamW(param_groups(model.trainable_parameters(), 0.0), 1e-2)
    seen = []
    trainer = _trainer(PoisonAtSecondStep(), data, opt)
    with pytest.raises(NonFiniteLoss, match="optimizer step 2"):
        train_one_epoch(trainer, 0, on_step=lambda r: seen.append(model.adapter_state_dict()) and False)
    state = trainer.state
    assert state.step == 1 and opt.step_count == 1
    assert _max_diff(seen[-1], model.adapter_state_dict()) == 0.0     # the poisoned step changed nothing


# ----------------------------------------------------------------------------------------------- runs
def test_run_writes_logs_checkpoints_and_adapter(reference_run):
    log = _log(reference_run)
    steps = [r["step"] for r in log if r["kind"] == "train"]
    assert steps == list(range(1, 25))
    assert log[0]["lr"] == 0.0                                        # warm-up starts at 0
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")
    with open(os.path.join(reference_run, "log.txt")) as f:
        start = json.loads(f.readline())
    assert start["event"] == "start" and start["n_truncated"] == 0
    assert os.path.isfile(os.path.join(reference_run, "adapter", "adapter_params.json"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(reference_run))
    assert not os.path.exists(os.path.join(reference_run, ".train.lock"))


def test_two_ranks_equal_one_process_with_same_global_batch(setup, reference_run):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    out = str(setup.base / "mpi")
    args = list(setup.common)
    args[args.index("--batch_size") + 1] = 2                           # 2 ranks × 2 = the reference's 4
    r = _math(args + ["--output_dir", out], np_=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(_last_adapters(out), _last_adapters(reference_run)) <= 1e-5
    a, b = _log(out), _log(reference_run)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    np.testing.assert_allclose([x["loss"] for x in a if x["kind"] == "train"],
                               [x["loss"] for x in b if x["kind"] == "train"], rtol=1e-5)


def test_sigkill_then_resume_matches_uninterrupted_run(setup, reference_run):
    # Jittor's SIGCHLD handler quick-exits a process (this pytest) whose child dies from a signal other than
    # SIGTERM; give SIGCHLD back its default action before killing our child with SIGKILL.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    out = str(setup.base / "killed")
    k = random.randint(3, 18)
    console = open(str(setup.base / "killed.console"), "w")
    proc = _math(setup.common + ["--output_dir", out], output=console)
    log_path = os.path.join(out, "log.txt")
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log_path):
            with open(log_path) as f:
                lines = [json.loads(x) for x in f if x.endswith("\n")]
            done = [x["step"] for x in lines if x["kind"] == "train"]
            if done and done[-1] >= k:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done[-1]
                break
        time.sleep(0.005)
    proc.wait()
    console.close()
    assert killed_at is not None, "run ended before step %d (rc %s): %s" % (
        k, proc.returncode, open(console.name).read()[-2000:])
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isfile(os.path.join(out, ".train.lock"))             # stale lock left behind by the kill
    r = _math(setup.common + ["--output_dir", out, "--resume", "auto"])
    assert r.returncode == 0, "killed at step %d: %s" % (killed_at, r.stderr[-3000:])
    assert _max_diff(_last_adapters(out), _last_adapters(reference_run)) <= 1e-6, "killed at step %d" % killed_at
    assert _log(out) == _log(reference_run), "killed at step %d" % killed_at
    events = [x["event"] for x in _log(out, ("event",))]
    assert events[0] == "start" and "resume" in events and events[-1] == "done"


def test_second_run_on_same_output_dir_is_refused(setup):
    out = setup.base / "locked"
    out.mkdir()
    holder = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".train.lock").write_text("%d %s\n" % (holder.pid, os.uname().nodename))
        r = _math(setup.common + ["--output_dir", str(out)])
        assert r.returncode == 2
        err = [line for line in r.stderr.splitlines() if line.startswith("error")]
        assert len(err) == 1 and "in use" in err[0] and str(holder.pid) in err[0], r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    finally:
        holder.terminate()   # SIGTERM: Jittor's SIGCHLD handler ignores it (SIGKILL would end this pytest)
        holder.wait()


def test_lock_of_dead_process_is_taken_over(tmp_path):
    from Utils.train_checkpoint import OutputDirLock
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    (tmp_path / ".train.lock").write_text("%d %s\n" % (dead.pid, os.uname().nodename))
    lock = OutputDirLock(str(tmp_path)).acquire()
    assert (tmp_path / ".train.lock").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".train.lock").exists()


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    from Utils.train_checkpoint import load_train_checkpoint, save_train_checkpoint
    path = str(tmp_path / "checkpoint-last.pkl")
    save_train_checkpoint(path, {"state": {"step": 1}, "adapters": {"a": np.ones(3, np.float32)}})
    code = ("import sys, numpy as np; sys.path.insert(0, %r)\n"
            "from Utils.train_checkpoint import save_train_checkpoint\n"
            "save_train_checkpoint(%r, {'state': {'step': 2}, 'adapters': {'a': np.zeros(3, np.float32)}})\n"
            % (ROOT, path))
    r = subprocess.run([PY, "-c", code], env=dict(ENV, MOA_TEST_CRASH_AFTER_CKPT_TMP="1"), capture_output=True)
    assert r.returncode == 86                                            # died between temp write and rename
    assert any(n.startswith(".checkpoint-last.pkl.tmp") for n in os.listdir(tmp_path))
    state = load_train_checkpoint(path)
    assert state["state"]["step"] == 1 and state["adapters"]["a"].tolist() == [1, 1, 1]
    assert load_train_checkpoint(str(tmp_path))["state"]["step"] == 1   # a directory means its last checkpoint


# ----------------------------------------------------------------------------------------------- CLI
LLAMA31_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
SOFT_MOA_README = ["--routing", "soft_moa", "--lora_layers", "0-32", "--lora_rank", "8", "--lora_alpha", "8",
                   "--lora_targets", "Q,K,V,O,FFN_DOWN", "--prompt_layers", "0-32", "--prompt_len", "10",
                   "--p_adapter_layers", "0-32", "--p_adapter_size", "16", "--swi_x", "4"]


def test_dry_run_counts_8b_soft_moa_without_weights(tmp_path, capsys):
    import Math
    (tmp_path / "params.json").write_text(json.dumps(LLAMA31_8B))
    t0 = time.time()
    Math.main(["--llama_path", str(tmp_path), "--dry_run", "true", "--batch_size", "8", "--accum_iter", "4",
               "--blr", "6e-3"] + SOFT_MOA_README)
    assert time.time() - t0 < 30                                         # analytic: no model, no weights
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["trainable_params"] == 24_520_288                        # docs/moa.md §4.3
    assert last["base_params"] == 8_030_261_248
    assert last["lr"] == pytest.approx(7.5e-4) and last["eff_batch_size"] == 32    # docs/moa.md §5.2 step 4


@pytest.mark.parametrize("argv, needle", [
    (["--hydra_moe", "maybe"], "--hydra_moe"),
    (["--noisy_router", "True1"], "--noisy_router"),
    (["--lora_layers", "0-x"], "lora_layers"),
    (["--lora_layers", "0-40"], "lora_layers"),
    (["--lora_targets", "Q,FOO"], "lora_targets"),
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "two"], "--batch_size"),
    (["--llama_path", "/nonexistent/llama"], "--llama_path"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, argv, needle):
    import Math
    (tmp_path / "params.json").write_text(json.dumps(dict(LLAMA31_8B, n_layers=32)))
    with pytest.raises(SystemExit) as e:
        Math.main(["--llama_path", str(tmp_path), "--dry_run", "true"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_missing_data_file_is_a_one_line_error(tmp_path, capsys):
    import Math
    with pytest.raises(SystemExit) as e:
        Math.main(["--llama_path", str(tmp_path), "--data_path", str(tmp_path / "nope.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data_path" in err[0]


def test_strict_booleans():
    import Math
    assert Math.parse_args(["--hydra_moe", "yes", "--w_bias", "0", "--noisy_router", "TRUE"]).hydra_moe is True
    args = Math.parse_args(["--w_bias", "no"])
    assert args.w_bias is False and args.warmup_epochs == 1.0
    assert Math.parse_args(["--routing", "topk_moe"]).warmup_epochs == 40.0      # docs/moa.md §5.1


def test_gradientless_threshold_is_not_decayed(jt, tokenizer):
    """Sparse MoA's Γ gets no gradient in the reference's mode; torch's AdamW then skips it entirely (no weight
    decay either), so after training with weight decay Γ must still hold its initial values, while the adapters
    that do get gradients have moved."""
    from Dataset.finetune_dataset import FinetuneData
    from engine_finetune import AdamW, param_groups, train_one_epoch
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Models.tokenizer import Tokenizer
    from Utils.runtime import seed_everything
    seed_everything(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=64,
                     routing="sparse_moa", lora_layers="0-2", lora_rank=4, lora_targets="Q,V", p_adapter_layers="0-2",
                     p_adapter_size=8)
    model = LLaMA_adapter(args, Tokenizer())
    model.train()
    before = model.adapter_state_dict()
    gamma = [n for n in before if "adapter_threshold_fn" in n]
    assert sorted(gamma) == sorted(model.gradientless_parameters()) and len(gamma) == 4
    data = FinetuneData.from_records(_records(12), tokenizer, 64, 4)
    trainer = _trainer(model, data, AdamW(param_groups(model.trainable_parameters(), 0.5), 1e-2))
    train_one_epoch(trainer, 0)
    after = model.adapter_state_dict()
    for n in gamma:
        assert np.array_equal(after[n], before[n]), n
    assert any(not np.array_equal(after[n], before[n]) for n in after if "lora_A" in n)


def test_padding_sensitive_variants_pad_to_max_seq_len(tokenizer):
    """Instance MoA, UniPEFT, Top-K and AdaMoLE see padded positions (sequence mean, load-balance counts), so their
    batches are padded to max_seq_len as the reference pads every example; per-token variants pad to the batch."""
    from Dataset.finetune_dataset import EvalData, FinetuneData
    from Models.variants import VARIANTS
    assert sorted(n for n, v in VARIANTS.items() if v.padding_sensitive) == ["adamole", "instance_moa", "topk_moe",
                                                                            "unipeft"]
    data = FinetuneData.from_records(_records(8), tokenizer, 64, 4, pad_to=64)
    _, batch = next(data.batches(0))
    assert batch["tokens"].shape == (4, 64) and (batch["labels"][:, -1] == -100).all()
    _, short = next(FinetuneData.from_records(_records(8), tokenizer, 64, 4).batches(0))
    assert short["tokens"].shape[1] < 64
    (ev, n), = list(EvalData(data.examples[:2], 4, pad_to=64).batches())
    assert ev["tokens"].shape == (2, 64) and n == FinetuneData.target_count(ev)
