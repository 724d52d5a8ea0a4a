"""Dense → MoE upcycling (issue 16): the converted model equals the dense one, placement and counts
equal closed forms (LLaMA-2-7B included), the seed's aux losses have their closed forms, residual MoE and PMoE, the
exported HF Mixtral / Qwen2-MoE give the same logits in transformers (torch in a subprocess; a missing torch FAILS),
streaming keeps peak RSS far below the checkpoint, and bad inputs are one-line errors naming the file or field.
Training-side acceptance (aux weight gradient, copies' symmetry, adapters) is tests/test_upcycle_training.py."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from upcycle_fixtures import DENSE, cli, expert_blocks, load, make_dense, randomise_routers, tokens, upcycle
from Models.model_args import ModelArgs
from Models.upcycling import closed_form, load_spec, moe_config, report, upcycled_args
from Utils.checkpoint_io import read_safetensors, read_torch_pth
from Utils.errors import UserError

SEED7B = os.path.join(ROOT, "configs", "dense2moe_seed.json")
LLAMA2_7B = os.path.join(ROOT, "configs", "llama2_7b_params.json")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense") / "meta")
    state = make_dense(d)
    return d, state


@pytest.fixture(scope="module")
def dense_logits(dense, jt):
    return load(dense[0]).logits(tokens())


def _ffn_np(state, layer, x):
    p = "layers.%d.feed_forward." % layer
    a, b = x @ state[p + "w1.weight"].T, x @ state[p + "w3.weight"].T
    return (a / (1 + np.exp(-a)) * b) @ state[p + "w2.weight"].T


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("gate", ["linear", "mlp", "gmm"])
def test_logits_equal_dense_right_after_upcycling(dense, dense_logits, tmp_path, gate):
    """normalize_top_k (default): equal to the dense model for every gate and any router initialisation."""
    out = upcycle(dense[0], str(tmp_path / gate), num_experts=4, expert_top_k=2, moe_start_layer=1, moe_layer_freq=2,
                  gate_type=gate, gating_size=16, seed=3, sample_topk=1, gating_dropout=0.1)
    model = load(out)
    assert [i for i, _ in model.llama.moe_layers()] == [1, 3]
    assert np.abs(model.logits(tokens()) - dense_logits).max() <= 1e-5
    for seed in (0, 1):
        randomise_routers(model, seed)
        assert np.abs(model.logits(tokens()) - dense_logits).max() <= 1e-5


def test_hf_source_and_bf16_output(dense, dense_logits, tmp_path):
    """An HF LlamaForCausalLM source (rotate-half q/k) upcycles to the same model; --dtype bfloat16 writes bf16."""
    hf = str(tmp_path / "hf")
    make_dense(hf, fmt="hf")
    out = upcycle(hf, str(tmp_path / "from_hf"), num_experts=3, expert_top_k=2, gate_type="linear")
    assert np.abs(load(out).logits(tokens()) - dense_logits).max() <= 1e-5
    out16 = upcycle(dense[0], str(tmp_path / "bf16"), dtype="bfloat16", num_experts=2, expert_top_k=1)
    header = read_safetensors(os.path.join(out16, "model.safetensors"), lazy=True)
    assert {t.dtype for t in header.values()} == {"bfloat16"}


def test_without_normalisation_output_is_kept_mass_times_ffn(dense, dense_logits, tmp_path, jt):
    """The seed's arithmetic: y = Σ_{e∈S} p_e·FFN(x) = (Σ kept p)·FFN(x) ≈ (k/E)·FFN(x); the model then differs."""
    out = upcycle(dense[0], str(tmp_path / "raw"), num_experts=8, expert_top_k=2, moe_start_layer=1,
                  moe_layer_freq=2, gate_type="linear", normalize_top_k=False)
    model = load(out)
    x = np.random.default_rng(0).standard_normal((1, 10, DENSE["dim"])).astype(np.float32)
    ffn = model.llama.layers[1].feed_forward
    with jt.no_grad():
        y = ffn(jt.array(x)).numpy()[0]
        sel = ffn.route(jt.array(x[0]))
        kept = sel.weight.numpy().sum(1, keepdims=True)
        probs = sel.probs.numpy()
    np.testing.assert_allclose(kept[:, 0], np.sort(probs, 1)[:, -2:].sum(1), rtol=1e-5)
    want = kept * _ffn_np(dense[1], 1, x[0])
    assert np.abs(y - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert 0.1 < kept.mean() < 0.5   # about k/E = 0.25 for a fresh router
    assert np.abs(model.logits(tokens()) - dense_logits).max() > 1e-3


def test_residual_moe_equals_dense(dense, dense_logits, tmp_path):
    """Shared expert = the dense FFN, routed copies' down-projections zero: equal to the dense model with or without
    renormalisation, even with noise on the routed copies."""
    for norm in (True, False):
        out = upcycle(dense[0], str(tmp_path / ("res%d" % norm)), num_experts=4, expert_top_k=1, gate_type="mlp",
                      gating_size=8, residual_moe=True, normalize_top_k=norm, noise_std=0.05)
        model = load(out)
        assert np.abs(model.logits(tokens()) - dense_logits).max() <= 1e-5
        assert np.all(expert_blocks(model, 2, "w2") == 0)
        np.testing.assert_array_equal(model.llama.layers[2].feed_forward.shared.w1.numpy(),
                                      dense[1]["layers.2.feed_forward.w1.weight"])


def test_copies_layout_noise_and_from_dense(dense, tmp_path, jt):
    """The streamed stacked layout is Experts.from_dense's; noise is relative to each weight's std and seeded."""
    from Models.moe.experts import Experts
    s = dense[1]
    plain = load(upcycle(dense[0], str(tmp_path / "plain"), num_experts=3, expert_top_k=1))
    ref = Experts.from_dense(s["layers.0.feed_forward.w1.weight"], s["layers.0.feed_forward.w3.weight"],
                             s["layers.0.feed_forward.w2.weight"], 3)
    for proj in ("w1", "w3", "w2"):
        np.testing.assert_array_equal(getattr(plain.llama.layers[0].feed_forward.experts, proj).numpy(),
                                      getattr(ref, proj).numpy())
    a = load(upcycle(dense[0], str(tmp_path / "n1"), num_experts=3, expert_top_k=1, noise_std=0.1, seed=7))
    b = load(upcycle(dense[0], str(tmp_path / "n2"), num_experts=3, expert_top_k=1, noise_std=0.1, seed=7))
    w, base = expert_blocks(a, 0), s["layers.0.feed_forward.w1.weight"]
    np.testing.assert_array_equal(w, expert_blocks(b, 0))                 # same seed, same copies
    rel = (w - base).std(axis=(1, 2)) / base.std()
    assert np.all(np.abs(rel - 0.1) < 0.01) and not np.array_equal(w[0], w[1])


# ------------------------------------------------------------------------------------------------ counts
def test_placement_and_counts_closed_forms_7b():
    """32 layers, start 16, freq 2 → 16, 18, …, 30; LLaMA-2-7B: 14.31 B total, 7.82 B active (not 22 B; freq 1
    gives 21.89 B); closed forms for every gate, residual MoE and PMoE equal the model's parameter table."""
    d, F, V, L = 4096, 11008, 32000, 32
    dense_args = ModelArgs.from_params_json(LLAMA2_7B)
    assert dense_args.ffn_hidden_dim == F
    dense_total = 2 * V * d + d + L * (4 * d * d + 3 * d * F + 2 * d)
    args = upcycled_args(dense_args, load_spec(SEED7B))
    form = report(dense_args, args)
    assert form["layers"] == list(range(16, 32, 2)) == list(args.moe_layer_ids())
    assert form["dense"] == dense_total == 6_738_415_616
    assert form["total"] == dense_total + 8 * 7 * 3 * d * F + 8 * 8 * d == 14_313_590_784
    assert form["active"] == dense_total + 8 * 1 * 3 * d * F + 8 * 8 * d == 7_820_808_192
    every = report(dense_args, upcycled_args(dense_args, load_spec(SEED7B, {"moe_layer_freq": 1})))
    assert every["total"] == 21_888_765_952 and round(every["total"] / 1e9) == 22   # the seed's "22 B"
    for over, router in (({"gate_type": "mlp"}, d * 256 + 256 + 256 * 8), ({"gate_type": "gmm"}, 256 * d + 8 * 256 + 1),
                         ({"residual_moe": True}, 8 * d)):
        f = report(dense_args, upcycled_args(dense_args, load_spec(SEED7B, over)))
        extra = 8 if over.get("residual_moe") else 7
        assert f["total"] == dense_total + 8 * extra * 3 * d * F + 8 * router, over
    pmoe = load_spec(SEED7B, {"experts_per_layer": [2, 2, 4, 4, 8, 8, 16, 16]})
    f = report(dense_args, upcycled_args(dense_args, pmoe))
    assert f["total"] == dense_total + (1 + 1 + 3 + 3 + 7 + 7 + 15 + 15) * 3 * d * F + 60 * d
    assert f["active"] == form["active"] - 8 * 8 * d + 60 * d


def test_counts_equal_built_model_and_param_count(dense, tmp_path, jt):
    from Models.param_count import count_params
    out = upcycle(dense[0], str(tmp_path / "pmoe"), num_experts=4, expert_top_k=2, moe_layers=[0, 2, 3],
                  experts_per_layer=[2, 4, 3], gate_type="gmm", gating_size=8, residual_moe=True)
    model = load(out)
    dense_args = ModelArgs.from_params_json(os.path.join(dense[0], "params.json"))
    form = closed_form(dense_args, model.args)
    built = sum(int(np.prod(p.shape)) for _, p in model.llama.named_parameters())
    assert built == form["total"] == count_params(model.args)["total"]
    assert form["active"] == count_params(model.args)["active"]
    assert [ffn.n_experts for _, ffn in model.llama.moe_layers()] == [2, 4, 3]
    with open(os.path.join(out, "upcycle.json")) as f:
        meta = json.load(f)
    assert meta["parameters"]["total"] == built and meta["upcycle_config"]["experts_per_layer"] == [2, 4, 3]


def test_dry_run_reads_no_weights():
    code, out, err = cli("--ckpt_dir", LLAMA2_7B, "--moe_config", SEED7B, "--dry_run")
    assert code == 0, err
    assert "MoE layers (8 of 32): 16, 18, 20, 22, 24, 26, 28, 30" in out
    assert "14,313,590,784 (14.31 B) total, 7,820,808,192 (7.82 B) active" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["total_params"] == 14_313_590_784 and last["moe"]["aux_mi"] == 0.01


# ------------------------------------------------------------------------------------------------ aux losses
def _sels(logits, cfg):
    from Utils.runtime import import_jittor
    from Models.moe.selection import select
    jt = import_jittor()
    return [select(jt.array(np.asarray(logits, np.float32)), cfg, training=False)]


def test_seed_aux_losses_closed_forms(jt):
    from Models.moe.aux_losses import aux_loss_terms
    E, N = 4, 64
    mi = moe_config(load_spec({"num_experts": E, "expert_top_k": 2, "aux_loss_type": "mi", "aux_loss_weight": 0.2}))
    assert mi.aux_weights() == {"aux_mi": 0.2}
    value = lambda z: aux_loss_terms(_sels(z, mi), mi)["aux_mi"].item()
    assert abs(value(np.zeros((N, E)))) <= 1e-6                                        # uniform router: 0
    confident = 60.0 * np.eye(E)[np.arange(N) % E]
    assert abs(value(confident) + math.log(E)) <= 1e-5                                 # sure and balanced: −log E
    assert abs(value(60.0 * np.eye(E)[np.zeros(N, int)])) <= 1e-5                     # all to one expert: 0
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 10.0):
        v = value(scale * rng.standard_normal((N, E)))
        assert -math.log(E) - 1e-6 <= v <= 1e-6
    sw = moe_config(load_spec({"num_experts": E, "expert_top_k": 2, "aux_loss_type": "switch", "aux_loss_weight": 0.3}))
    assert sw.aux_weights() == {"aux_switch": 0.3, "aux_z": pytest.approx(0.03)} and sw.aux_switch_form == "normalized"
    two_hot = 40.0 * (np.eye(E)[np.arange(N) % E] + np.eye(E)[(np.arange(N) + 1) % E])
    terms = aux_loss_terms(_sels(two_hot, sw), sw)
    assert abs(terms["aux_switch"].item() - 1.0) <= 1e-5                               # balance: 1
    zero = aux_loss_terms(_sels(np.zeros((N, E)), sw), sw)
    total = sum(sw.aux_weights()[k] * v.item() for k, v in zero.items())
    assert abs(total - 0.3 * (1 + 0.1 * math.log(E) ** 2)) <= 1e-6                     # issue 16
    z = 3.0 * rng.standard_normal((N, E))
    lse = np.log(np.exp(z).sum(1))
    got = aux_loss_terms(_sels(z, sw), sw)["aux_z"].item()
    assert abs(got - (lse ** 2).mean()) <= 1e-4 * (lse ** 2).mean()


# ------------------------------------------------------------------------------------------------ export
def _hf_logits(path, tmp_path, name):
    toks, out = str(tmp_path / (name + "_tok.npy")), str(tmp_path / (name + ".npz"))
    np.save(toks, tokens())
    jobs = str(tmp_path / (name + "_jobs.json"))
    with open(jobs, "w") as f:
        json.dump([{"run": path, "tokens": toks, "labels": None, "out": out}], f)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "oracles", "hf_families.py"), jobs],
                       capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, "HF oracle failed (torch + transformers are required):\n" + r.stderr[-3000:]
    return np.load(out)["logits"]


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe_raw"])
def test_export_loads_in_transformers_with_same_logits(dense, dense_logits, tmp_path, case):
    flags = {"mixtral": ["--num_experts", 4, "--expert_top_k", 2, "--gate_type", "linear"],
             "qwen2_moe_raw": ["--num_experts", 4, "--expert_top_k", 2, "--gate_type", "linear",
                               "--moe_start_layer", 1, "--moe_layer_freq", 2, "--normalize_top_k", "false"]}[case]
    out, hf = str(tmp_path / "moe"), str(tmp_path / "hf")
    code, stdout, err = cli("--ckpt_dir", dense[0], "--out_dir", out, "--export_hf", hf, "--progress", "false", *flags)
    assert code == 0, err
    family = case.split("_raw")[0]
    assert "exported %s" % family in stdout
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    ours = load(out).logits(tokens())
    theirs = _hf_logits(hf, tmp_path, case)
    assert np.abs(theirs - ours).max() <= 1e-4
    if case == "mixtral":
        assert np.abs(theirs - dense_logits).max() <= 1e-4


def test_export_refuses_what_no_family_expresses(dense, tmp_path):
    code, _, err = cli("--ckpt_dir", dense[0], "--out_dir", tmp_path / "m", "--export_hf", tmp_path / "h",
                       "--gate_type", "mlp", "--num_experts", 2, "--progress", "false")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot export as mixtral" in err and "cannot export as qwen2_moe" in err and "moe.router='mlp'" in err
    assert os.path.isfile(os.path.join(tmp_path, "m", "params.json"))   # the conversion itself is kept


# ------------------------------------------------------------------------------------------------ streaming
def test_streaming_peak_rss_is_far_below_the_checkpoint(tmp_path):
    """A ~280 MB dense checkpoint upcycled (8 experts in 4 of 8 layers, ~800 MB written): the converter's peak RSS
    stays near one tensor, far below the checkpoint (the kernel's VmHWM of its own process)."""
    src, out = str(tmp_path / "big"), str(tmp_path / "big_moe")
    gen = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        from Models.tiny_checkpoint import make_tiny_checkpoint
        make_tiny_checkpoint(%r, "meta", dim=768, n_layers=8, n_heads=12, n_kv_heads=4, vocab_size=8000,
                             multiple_of=256, tokenizer=False)
    """ % (ROOT, src))
    subprocess.run([sys.executable, "-c", gen], check=True)
    size = os.path.getsize(os.path.join(src, "consolidated.00.pth"))
    # VmHWM, not getrusage's ru_maxrss: the latter survives execve, so a child forked from this (Jittor-sized)
    # process would report at least our own size.
    probe = textwrap.dedent("""
        import runpy, sys
        sys.argv = ["upcycle.py"] + sys.argv[1:]
        try:
            runpy.run_path(%r, run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print("PEAK", int(hwm.split()[1]) * 1024)
    """ % os.path.join(ROOT, "upcycle.py"))
    r = subprocess.run([sys.executable, "-c", probe, "--ckpt_dir", src, "--out_dir", out, "--num_experts", "8",
                        "--expert_top_k", "2", "--moe_layer_freq", "2", "--noise_std", "0.01", "--progress", "false"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = int(r.stdout.split("PEAK")[-1])
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    largest = 8000 * 768 * 4
    assert size > 2.5e8 and written > 2.5 * size
    assert peak < 0.5 * size and peak < 60e6 + 4 * largest, (peak, size, written)
    assert read_torch_pth(os.path.join(src, "consolidated.00.pth"), lazy=True)["norm.weight"].shape == (768,)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_one_line_errors(dense, tmp_path):
    cfg = tmp_path / "c.json"
    mixtral = tmp_path / "mixtral"
    mixtral.mkdir()
    (mixtral / "config.json").write_text(json.dumps({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}))
    moe_dir = upcycle(dense[0], str(tmp_path / "already"), num_experts=2)
    seed_like = dict(json.load(open(SEED7B)), model_type="llama", hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    cases = [
        ({"num_expert": 4}, dense[0], "c.json: unknown key 'num_expert'"),
        ({"num_experts": 2, "expert_top_k": 3}, dense[0], "c.json: expert_top_k = 3 is more than num_experts = 2"),
        ({"moe_start_layer": 4}, dense[0], "c.json: moe_start_layer = 4 is beyond the model's 4 layers"),
        ({"gate_type": "rnn"}, dense[0], "c.json: gate_type = 'rnn' is not one of linear, mlp, gmm"),
        ({"num_experts": "8"}, dense[0], "c.json: num_experts = '8' is not an integer"),
        ({"experts_per_layer": [2, 2]}, dense[0], "c.json: experts_per_layer has 2 counts for the 4 MoE layers"),
        ({"aux_loss_type": "switch", "aux_loss_weight": 0.1, "experts_per_layer": [2, 2, 4, 4]}, dense[0],
         "aux_loss_type 'switch' takes its statistics over all MoE layers together"),
        (seed_like, dense[0], "c.json: hidden_size = 4096 disagrees with the checkpoint's dim = 64"),
        ({}, str(mixtral), "model_type 'mixtral' is not a dense LLaMA"),
        ({}, moe_dir, "already a mixture of experts"),
        ({}, str(tmp_path / "nowhere"), "checkpoint directory not found"),
    ]
    for config, src, want in cases:
        cfg.write_text(json.dumps(config))
        code, _, err = cli("--ckpt_dir", src, "--moe_config", cfg, "--out_dir", tmp_path / "o", "--progress", "false")
        assert code == 2 and want in err and len(err.strip().splitlines()) == 1, (config, err)
    cfg.write_text("{not json")
    code, _, err = cli("--ckpt_dir", dense[0], "--moe_config", cfg, "--out_dir", tmp_path / "o")
    assert code == 2 and "c.json: not valid JSON" in err
    code, _, err = cli("--ckpt_dir", dense[0], "--out_dir", dense[0])
    assert code == 2 and "--out_dir must differ" in err
    code, _, err = cli("--ckpt_dir", os.path.join(ROOT, "configs", "nope.json"), "--dry_run")
    assert code == 2 and "nope.json" in err
    assert not os.path.exists(tmp_path / "o")   # nothing half-written
    with pytest.raises(UserError, match="seed.json: first_init"):
        load_spec({"first_init": False}, source="seed.json")


def test_seed_style_full_hf_config_is_accepted(dense, dense_logits, tmp_path):
    """The seed's config file is a whole LLaMA config.json plus the MoE keys: accepted when it describes the
    checkpoint (bookkeeping fields such as torch_dtype are ignored)."""
    d = DENSE
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d["dim"],
           "intermediate_size": ModelArgs(**d).ffn_hidden_dim, "num_hidden_layers": d["n_layers"],
           "num_attention_heads": d["n_heads"], "num_key_value_heads": d["n_kv_heads"], "vocab_size": d["vocab_size"],
           "torch_dtype": "float16", "rms_norm_eps": 1e-5, "num_experts": 2, "expert_top_k": 1,
           "moe_start_layer": 2, "moe_layer_freq": 2, "gate_type": "linear", "aux_loss_type": "mi",
           "aux_loss_weight": 0.01}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    code, _, err = cli("--ckpt_dir", dense[0], "--moe_config", path, "--out_dir", tmp_path / "o", "--progress", "false")
    assert code == 0, err
    model = load(str(tmp_path / "o"))
    assert [i for i, _ in model.llama.moe_layers()] == [2] and model.args.moe.aux_mi == 0.01
    assert np.abs(model.logits(tokens()) - dense_logits).max() <= 1e-5


def test_cli_flags_follow_the_project_conventions():
    """Every boolean flag of upcycle.py, demo_upcycle.py and bench/upcycle_memory.py takes `--flag` and `--flag
    true|false` (decision D3), no store_true switch; a bad value is one UserError line naming the flag; every
    config key is a flag."""
    import argparse
    import importlib.util
    import demo_upcycle
    import upcycle
    from Models.upcycling import KEYS
    from Utils.cli import is_bool_action
    spec = importlib.util.spec_from_file_location("bench_upcycle_memory", os.path.join(ROOT, "bench",
                                                                                       "upcycle_memory.py"))
    bench = importlib.util.module_from_spec(spec)
    if os.path.join(ROOT, "bench") not in sys.path:   # bench scripts import their `common` module
        sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec.loader.exec_module(bench)
    for build, extra in ((upcycle.build_parser, ["--ckpt_dir", "x"]), (demo_upcycle.build_parser, []),
                         (bench.build_parser, [])):
        parser = build()
        bools = [a for a in parser._actions if is_bool_action(a)]
        assert not [a for a in parser._actions if isinstance(a, (argparse._StoreTrueAction,
                                                                argparse._StoreFalseAction))]
        for a in bools:
            flag = a.option_strings[0]
            assert getattr(parser.parse_args(extra + [flag]), a.dest) is True
            assert getattr(parser.parse_args(extra + [flag, "false"]), a.dest) is False
            with pytest.raises(UserError, match=flag):
                parser.parse_args(extra + [flag, "maybe"])
    flags = {a.dest for a in upcycle.build_parser()._actions}
    assert set(KEYS) <= flags
    opts = upcycle.build_parser().parse_args(["--ckpt_dir", "x", "--experts_per_layer", "2,4", "--noise_std", "0.1"])
    assert upcycle.overrides_of(opts) == {"experts_per_layer": [2, 4], "noise_std": 0.1}
