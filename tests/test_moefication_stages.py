"""MoEfication end to end on tiny real checkpoints (issue 17 acceptance): k = E reproduces the dense logits for every
split method, permutation invariance, feature shards equal what the hooks saw (padding excluded), a killed
`features` run resumes, Meta and HF LLaMA-2/3 checkpoints through `moefy.py all`, under mpirun, and bad inputs."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests import moefy_assets as A
from tests.moefy_assets import moefy_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return A.build_assets(str(tmp_path_factory.mktemp("moefy")))


# shared with tests/test_moefy_math_eval.py (tests/moefy_assets.py)
_batches, _load, _features, _split_convert = A.batches, A.load, A.features, A.split_convert


@pytest.mark.parametrize("method,metric", [("random", "l2"), ("contiguous", "l2"), ("kmeans", "l2"), ("kmeans", "cos"),
                                           ("graph", "l2")])
def test_all_experts_unweighted_reproduce_dense_logits(assets, tmp_path, method, metric):
    toks = A.tokens()
    dense = _load(assets["meta3"]).logits(toks)
    full = _load(_split_convert(assets, str(tmp_path), method, 8, metric=metric)).logits(toks)
    assert np.abs(full - dense).max() <= 1e-5
    part = _load(_split_convert(assets, str(tmp_path), method, 2, out=str(tmp_path / "k2"))).logits(toks)
    assert np.abs(part - dense).max() > 1e-3          # the check above would notice a wrong expert


def test_relu_ffn_model_is_exact_at_k_equals_E(assets, tmp_path):
    d = str(tmp_path / "relu")
    args, state = A.write_dense(d, assets["tok"], "meta", "llama3", gated=False, act="relu")
    a = dict(assets, meta3=d, args=args, state=state)
    conv = _load(_split_convert(a, str(tmp_path / "w"), "kmeans", 8))
    assert conv.llama.layers[0].feed_forward.experts.w3 is None
    assert np.abs(conv.logits(A.tokens()) - _load(d).logits(A.tokens())).max() <= 1e-5


def test_permuting_neurons_changes_nothing(assets, tmp_path):
    from Models.moefication.convert import read_info
    from Models.moefication.selectors import use_selection
    perm_dir = str(tmp_path / "perm")
    args, state = A.write_dense(perm_dir, assets["tok"], "meta", "llama3")
    pstate = A.permute_ffn(state, args.n_layers)
    from Utils.checkpoint_io import write_torch_pth
    write_torch_pth(os.path.join(perm_dir, "consolidated.00.pth"), pstate)
    toks = A.tokens()
    assert np.abs(_load(perm_dir).logits(toks) - _load(assets["meta3"]).logits(toks)).max() <= 1e-5
    a_conv = _split_convert(assets, str(tmp_path / "a"), "kmeans", 2)
    b_conv = _split_convert(dict(assets, meta3=perm_dir), str(tmp_path / "b"), "kmeans", 2, state=pstate)
    outs = {}
    for name, conv in (("a", a_conv), ("b", b_conv)):
        model = _load(conv)
        for method in ("ground_truth", "similarity"):
            with use_selection(model.llama, method, 2, read_info(conv)):
                outs[name, method] = model.logits(toks)
    for method in ("ground_truth", "similarity"):
        assert np.abs(outs["a", method] - outs["b", method]).max() <= 1e-5, method


def test_feature_shards_are_what_the_hooks_saw_without_padding(assets, tmp_path):
    from Models.moefication.collect import collect_features, load_features
    from Models.moefication.hooks import FFNCapture
    model = _load(assets["meta3"])
    batches = _batches(assets["val"], assets["tok"], seq_len=300, batch_size=3, mode="padded")[:3]
    assert any((~b["token_mask"]).any() for b in batches)           # there is padding to leave out
    import jittor as jt
    seen, logits = {0: [], 1: []}, []
    with jt.no_grad():
        for b in batches:
            with FFNCapture(model.llama, [0, 1], "gate") as cap:
                out = model.llama(jt.array(b["tokens"])).numpy()
                got = cap.pop()
            logits.append(np.abs(out - model.llama(jt.array(b["tokens"])).numpy()).max())
            for i in (0, 1):
                x, h = got[i][0]
                seen[i].append((x[b["token_mask"]], h[b["token_mask"]]))
    assert max(logits) <= 1e-5                                        # capturing does not change the model
    collect_features(model, batches, str(tmp_path), [0, 1], "gate", shard_rows=37, dtype="float32", progress=False)
    for i in (0, 1):
        x, h = load_features(str(tmp_path), i)
        assert np.array_equal(x, np.concatenate([s[0] for s in seen[i]]))
        assert np.array_equal(h, np.concatenate([s[1] for s in seen[i]]))
        assert x.shape[0] == sum(int(b["token_mask"].sum()) for b in batches)


def _features_cmd(a, work, extra=(), data="train"):
    return [sys.executable, os.path.join(ROOT, "moefy.py"), "features", "--model", a["meta3"], "--work_dir", work,
            "--data", a[data], "--seq_len", "32", "--batch_size", "2", "--max_tokens", "3000", "--shard_rows",
            "64", "--dtype", "float32", "--progress", "false"] + list(extra)


# Jittor's SIGCHLD handler ends a process whose child dies of a signal ("Caught SIGCHLD ... quick exit"), so the
# kill happens in a plain Python process between the test and the features run.
KILLER = r"""
import json, os, signal, subprocess, sys, time
cmd, index = json.loads(sys.argv[1]), sys.argv[2]
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.time() + 300
while time.time() < deadline and proc.poll() is None:
    try:
        with open(index) as f:
            if len(json.load(f)["shards"]) >= 3:
                break
    except (OSError, ValueError):
        pass
    time.sleep(0.02)
proc.send_signal(signal.SIGKILL)
print(proc.wait())
"""


def test_killed_features_run_resumes_to_the_same_store(assets, tmp_path):
    import moefy
    from Models.moefication.collect import load_features
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    extra = ["--batch_size", "8"]     # 12 forwards of 256 tokens, 4 shards each: the kill lands after the first
    moefy.main(_features_cmd(assets, whole, extra)[2:])              # the same CLI in this process (no start-up)
    index = os.path.join(killed, "features", "layer_001", "rank_000", "index.json")
    r = subprocess.run([sys.executable, "-c", KILLER, json.dumps(_features_cmd(assets, killed, extra)), index],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.stdout.strip() == str(-signal.SIGKILL), r.stdout + r.stderr
    with open(index) as f:
        assert not json.load(f)["complete"]                          # it really died half-way
    moefy.main(_features_cmd(assets, killed, extra)[2:])             # resume
    for i in (0, 1):
        for a, b in zip(load_features(whole, i), load_features(killed, i)):
            assert a.shape[0] == 3000 and np.array_equal(a, b)


@pytest.mark.parametrize("fmt,shape", [("hf", "llama2"), ("meta", "llama3")])
def test_moefy_all_on_meta_and_hf_checkpoints(assets, tmp_path, fmt, shape):
    import moefy
    model_dir, work = str(tmp_path / "dense"), str(tmp_path / "w")
    A.write_dense(model_dir, assets["tok"], fmt, shape)
    moefy.main(["all", "--model", model_dir, "--work_dir", work, "--data", assets["train"], "--eval_data",
                assets["val"], "--num_experts", "8", "--num_selects", "2", "--method", "kmeans", "--seq_len", "32",
                "--max_tokens", "4000", "--epochs", "2", "--max_eval_rows", "8", "--fractions", "0.25,1",
                "--progress", "false"])
    conv = os.path.join(work, "converted")
    model = _load(conv)
    with np.load(os.path.join(work, "gate", "layer_001.npz")) as g:
        router = model.llama.layers[1].feed_forward.router
        assert np.array_equal(router.w1.weight.numpy(), g["w1"]) and np.array_equal(router.w2.weight.numpy(), g["w2"])
    with open(os.path.join(work, "eval", "results.json")) as f:
        res = json.load(f)
    assert os.path.getsize(os.path.join(work, "eval", "moefication.png")) > 1000
    full = [r for r in res["rows"] if r["k"] == 8]
    assert len(full) == 4 and all(abs(r["retained"] - 1.0) < 1e-5 for r in full)     # k = E is the dense model
    assert set(res["gate"]) == {"0", "1"} and 0.0 <= res["gate"]["0"]["val_recall"] <= 1.0


def test_features_under_mpirun_share_the_rows(assets, tmp_path):
    from Models.moefication.collect import load_features
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = ["--max_tokens", "1000000", "--batch_size", "4"]        # the whole file: both runs store every row
    import moefy
    moefy.main(_features_cmd(assets, one, extra, "val")[2:])        # one process: this one
    # one OpenMP thread per rank: two ranks of two spinning threads each on a 2-core machine wait on each other
    r = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"] + _features_cmd(
        assets, two, extra, "val"), env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(two, "features", "features.json")) as f:
        rows = json.load(f)["rows"]["0"]
    assert len(rows) == 2 and min(rows) > 0                           # each rank stored its share
    for i in (0, 1):
        x1, h1 = load_features(one, i)
        x2, h2 = load_features(two, i)
        assert x1.shape == x2.shape and h1.shape == h2.shape
        # the same rows in another order (batch composition moves the last bits of a GEMM: compare rounded keys)
        order = lambda x: np.lexsort(np.round(x[:, :8], 3).T)
        assert np.allclose(x1[order(x1)], x2[order(x2)], atol=1e-5)
        assert np.allclose(h1[order(x1)], h2[order(x2)], atol=1e-5)


def test_bad_inputs_are_one_line_errors_naming_the_file(assets, tmp_path, capsys):
    m, w = assets["meta3"], str(tmp_path / "w")
    common = ["--model", m, "--work_dir", w, "--progress", "false"]
    assert "--num_experts" in moefy_error(capsys, ["split"] + common + ["--num_experts", "7"])       # 7 ∤ 192
    assert os.path.join(w, "split", "split.json") in moefy_error(capsys, ["gate"] + common)
    assert os.path.join(w, "split", "split.json") in moefy_error(capsys, ["convert"] + common)
    assert os.path.join(w, "converted", "moefication.json") in moefy_error(
        capsys, ["evaluate"] + common + ["--data", assets["val"]])
    # a split of one model, used with another
    other = str(tmp_path / "other")
    A.write_dense(other, assets["tok"], "meta", "llama3", seed=5)
    import moefy
    moefy.main(["split"] + common + ["--num_experts", "8"])
    err = moefy_error(capsys, ["convert", "--model", other, "--work_dir", w, "--use_gate", "false",
                               "--num_selects", "2"])
    assert os.path.join(w, "split", "split.json") in err and "other weights" in err
    # features of another model, and a gate stage without features
    assert os.path.join(w, "features", "features.json") in moefy_error(capsys, ["gate"] + common)
    moefy.main(["features"] + common + ["--data", assets["train"], "--max_tokens", "500", "--seq_len", "16"])
    err = moefy_error(capsys, ["features", "--model", other, "--work_dir", w, "--data", assets["train"], "--progress",
                          "false"])
    assert os.path.join(w, "features", "features.json") in err
    # a damaged label file
    np.save(os.path.join(w, "split", "layer_000.npy"), np.zeros(192, np.int64))
    err = moefy_error(capsys, ["gate"] + common)
    assert os.path.join(w, "split", "layer_000.npy") in err
    # a gate trained on another split is refused by convert
    moefy.main(["split"] + common + ["--num_experts", "8", "--seed", "1"])
    moefy.main(["gate"] + common + ["--epochs", "1", "--num_selects", "2"])
    moefy.main(["split"] + common + ["--num_experts", "8", "--seed", "2"])
    assert os.path.join(w, "gate", "gate.json") in moefy_error(capsys, ["convert"] + common)


def test_every_moefy_boolean_flag_takes_both_forms_and_bad_values_are_one_line():
    """moefy.py's subcommands and the demo keep the project's flag form (Utils/cli.py): no store_true switches."""
    import argparse
    import moefy
    import moefy_demo
    from Utils.cli import is_bool_action
    from Utils.errors import UserError
    base = ["--model", "m", "--work_dir", "w"]
    need = {"split": base, "gate": base, "convert": base, "features": base + ["--data", "d"],
            "evaluate": base + ["--data", "d"], "all": base + ["--data", "d", "--eval_data", "e"]}
    parser = moefy.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for stage, extra in need.items():
        for action in sub.choices[stage]._actions:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                raise AssertionError("%s %s is a switch" % (stage, action.option_strings[0]))
            if not is_bool_action(action):
                continue
            flag, dest = action.option_strings[0], action.dest
            seen.add((stage, flag))
            assert getattr(parser.parse_args([stage] + extra + [flag]), dest) is True
            for word, value in (("true", True), ("false", False), ("1", True), ("0", False), ("no", False)):
                assert getattr(parser.parse_args([stage] + extra + [flag, word]), dest) is value, (stage, flag)
            with pytest.raises(UserError, match=flag):
                parser.parse_args([stage] + extra + [flag, "maybe"])
    assert {("split", "--progress"), ("features", "--overwrite"), ("convert", "--use_gate"),
            ("all", "--use_gate"), ("all", "--overwrite")} <= seen
    with pytest.raises(UserError, match="--num_experts"):
        parser.parse_args(["split"] + base + ["--num_experts", "many"])
    demo = moefy_demo.build_parser()
    assert not [a for a in demo._actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
    with pytest.raises(UserError, match="--steps"):
        demo.parse_args(["--steps", "x"])
