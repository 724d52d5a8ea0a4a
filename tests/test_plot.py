"""Routing-dump accumulators (Models/routing_dump.py) on hand-made routing records, and the Utils.plot figures/CLI."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

LABELS = ["LoRA-Q", "LoRA-K", "LoRA-V", "LoRA-O", "LoRA-DOWN", "PAdapter"]


@pytest.fixture(scope="module")
def args():
    from Models.model_args import ModelArgs
    return ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, routing="sparse_moa", lora_layers="0-3",
                     lora_targets="Q,K,V,O,FFN_DOWN", p_adapter_layers="0-2")


NS = (6, 6, 5)  # types per layer of `args`: layer 2 has no parallel adapter


def _stacked(B, P, rng):
    """Records shaped like RoutingCollector.stacked(): [B, P, n] weights, Γ, active counts."""
    recs = {}
    for layer, n in enumerate(NS):
        t = rng.random((B, P, n)).astype(np.float32)
        recs[layer] = {"type": t, "threshold": np.full((B, P, 1), 0.25, np.float32),
                       "active": (t > 0.5).sum(-1), "experts": {}}
    return recs, P


def test_real_lengths_counts_read_positions():
    from Models.routing_dump import real_lengths
    # prompt 5, budget 4, no stop: positions 0..7 read (the 4th new token is never fed back) -> 8
    assert real_lengths([5], [[1, 2, 3, 4]], 4, 100).tolist() == [8]
    # stop token produced as the 3rd new token (cut from the output): read 5 + 3 - 1 = 7
    assert real_lengths([5], [[1, 2]], 4, 100).tolist() == [7]
    # batch: the shorter prompt's budget ends earlier in absolute positions
    assert real_lengths([3, 5], [[1, 2, 3, 4], [1]], 4, 100).tolist() == [6, 6]
    # max_seq_len caps the budget
    assert real_lengths([5], [[1, 2]], 4, 7).tolist() == [6]


def test_type_weight_stats_mask_and_merge(args):
    from Models.routing_dump import TypeWeightStats
    rng = np.random.default_rng(0)
    recs, P = _stacked(2, 6, rng)
    real = np.array([6, 4])
    st = TypeWeightStats(args)
    st.add((recs, P), real)
    s = st.state()
    assert s["token_num"] == 10 and s["labels"][0] == LABELS and sorted(s["layers"]) == [0, 1, 2]
    for layer in range(3):
        t = recs[layer]["type"]
        want = t[0].sum(0) + t[1, :4].sum(0)
        np.testing.assert_allclose(s["layers"][layer]["sum_weights"], want, rtol=1e-6)
        assert s["layers"][layer]["sum_threshold"] == pytest.approx(2.5)
        assert s["layers"][layer]["sum_experts"] == int((t[0] > 0.5).sum() + (t[1, :4] > 0.5).sum())
    merged = TypeWeightStats.merge([s, s])
    assert merged["token_num"] == 20
    np.testing.assert_allclose(merged["layers"][1]["sum_weights"], 2 * s["layers"][1]["sum_weights"])


def test_token_weight_entry_rows_match_words(args, tokenizer):
    from Models.routing_dump import TokenWeightDump
    rng = np.random.default_rng(1)
    prompt, output = tokenizer.encode("Hello there", bos=True, eos=False), [11, 22, 33]
    T = len(prompt) + len(output)
    recs, P = _stacked(1, T, rng)  # the extra decoding step read the last kept token too
    e = TokenWeightDump(args, tokenizer).entry(7, (recs, P), prompt, output)
    assert e["index"] == 7 and len(e["words"]) == T and e["words"][1] == "Hello"
    assert e["layers"][0].shape == (T, 7) and e["labels"][0] == LABELS + ["Threshold"]
    np.testing.assert_allclose(e["layers"][2][:, :5], recs[2]["type"][0])
    assert e["layers"][2].shape == (T, 6) and e["labels"][2] == LABELS[:5] + ["Threshold"]
    short = {k: dict(v, type=v["type"][:, :T - 1], threshold=v["threshold"][:, :T - 1]) for k, v in recs.items()}
    e = TokenWeightDump(args, tokenizer).entry(0, (short, T - 1), prompt, output)
    assert e["layers"][0].shape == (T, 7) and np.isnan(e["layers"][0][-1]).all()  # never read: NaN row


@pytest.fixture(scope="module")
def dumps(args, tokenizer, tmp_path_factory):
    from Models.routing_dump import TokenWeightDump, TypeWeightStats, save_pickle
    rng = np.random.default_rng(2)
    d = tmp_path_factory.mktemp("plots")
    st = TypeWeightStats(args)
    st.add(_stacked(2, 5, rng), np.array([5, 5]))
    save_pickle(st.state(), str(d / "type_weight.pkl"))
    prompt = tokenizer.encode("A\nB", bos=True, eos=False)
    T = len(prompt) + 2
    cases = [TokenWeightDump(args, tokenizer).entry(i, _stacked(1, T, rng), prompt, [1, 2]) for i in range(2)]
    save_pickle(cases, str(d / "token_weight.pkl"))
    return d


def test_type_weight_heatmap_rows_layers_columns_types(dumps):
    from Utils.plot import load_pickle, plot_type_weight
    data = load_pickle(str(dumps / "type_weight.pkl"), "type")
    out = str(dumps / "heat.png")
    fig, ax, m = plot_type_weight(data, out)
    assert ax.images[0].get_array().shape == (3, 7)  # 3 layers x (6 types + Threshold)
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS + ["Threshold"]
    np.testing.assert_allclose(m[1, :6], data["layers"][1]["sum_weights"] / data["token_num"])
    assert np.isnan(m[2, 5]) and not np.isnan(m[2, 6])  # layer 2 has no PAdapter column value
    assert m[0, 6] == pytest.approx(0.25)
    assert os.path.getsize(out) > 1000


def test_token_weight_heatmap_words_on_axis(dumps):
    from Utils.plot import load_pickle, plot_token_weight
    data = load_pickle(str(dumps / "token_weight.pkl"), "token")
    out = str(dumps / "tok.png")
    fig, ax, m = plot_token_weight(data, 1, 1, out)
    T = len(data[1]["words"])
    assert ax.images[0].get_array().shape == (T, 7)
    assert [t.get_text() for t in ax.get_yticklabels()][:3] == ["<|begin_of_text|>", "A", "\\n"]
    assert os.path.getsize(out) > 1000


def test_inter_expert_std(dumps):
    from Utils.plot import inter_expert_std, load_pickle
    data = load_pickle(str(dumps / "token_weight.pkl"), "token")
    want = np.mean([np.mean([np.std(w[:, :-1], axis=1).mean() for w in e["layers"].values()]) for e in data])
    got, per = inter_expert_std(data)
    assert got == pytest.approx(want) and len(per) == 2
    res = subprocess.run([sys.executable, "-m", "Utils.plot", "std", "--pkl", str(dumps / "token_weight.pkl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and ("inter-expert std: %.4f" % want) in res.stdout


def test_curves_from_event_files(tmp_path):
    from tensorboardX import SummaryWriter
    from Utils.plot import plot_curves
    w = SummaryWriter(log_dir=str(tmp_path))
    for step in range(1, 6):
        w.add_scalar("c_train_loss", 5.0 - step, step)
        w.add_scalar("lr", 0.01, step)
    w.add_scalar("val_loss", 2.5, 5)
    w.close()
    out = str(tmp_path / "loss.png")
    fig, ax, series = plot_curves(str(tmp_path), out)
    assert sorted(series) == ["c_train_loss", "val_loss"] and len(ax.lines) == 2
    assert series["c_train_loss"] == ([1, 2, 3, 4, 5], [4.0, 3.0, 2.0, 1.0, 0.0])
    assert os.path.getsize(out) > 1000


@pytest.mark.parametrize("content", [b"", b"not a pickle", pickle.dumps({"x": 1}), pickle.dumps([])])
def test_malformed_pkl_is_one_line_error(tmp_path, content):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(content)
    for cmd in (["type_weight", "--pkl", str(bad), "--out", str(tmp_path / "x.png")],
                ["token_weight", "--pkl", str(bad), "--layer", "0", "--out", str(tmp_path / "y.png")]):
        res = subprocess.run([sys.executable, "-m", "Utils.plot"] + cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / "x.png")


def test_expert_load_heatmap_rows_are_each_layers_shares(tmp_path):
    from Utils import plot
    from Utils.errors import UserError
    load = {3: np.array([2.0, 6.0, 0.0, 2.0]), 1: np.array([5, 5, 5, 5])}
    out = str(tmp_path / "load.png")
    fig, ax, m = plot.plot_expert_load(load, out)
    np.testing.assert_allclose(m, [[0.25, 0.25, 0.25, 0.25], [0.2, 0.6, 0.0, 0.2]])    # layers ascending
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layer 1", "layer 3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["E0", "E1", "E2", "E3"]
    assert os.path.getsize(out) > 0
    with pytest.raises(UserError):
        plot.expert_load_matrix({0: np.zeros(4)})
    plot._plt().close("all")


def test_runs_share_one_picture(tmp_path):
    from Utils import plot
    from Utils.errors import UserError
    runs = {"MoE": ([10, 20, 30], [5.0, 4.0, 3.5]), "dense": ([10, 20, 30], [5.1, 4.3, 3.9])}
    fig, ax, drawn = plot.plot_runs(runs, str(tmp_path / "val.png"))
    assert drawn == {k: (list(s), list(v)) for k, (s, v) in runs.items()}
    assert [l.get_label() for l in ax.get_lines()] == ["MoE", "dense"]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [5.1, 4.3, 3.9])
    with pytest.raises(UserError):
        plot.plot_runs({"x": ([1, 2], [1.0])}, str(tmp_path / "bad.png"))
    plot._plt().close("all")
