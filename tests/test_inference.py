"""inference.py end to end on a tiny checkpoint + random sparse-MoA adapter: scoring, resume after SIGKILL,
2-rank mpirun = 1 rank, routing dumps (schema, len(words) == T_total), --score_only.

All runs share one shape set (batch size 1, the same 3 AddSub records, 12 new tokens, greedy) so Jittor's
compiled kernels are reused between them.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from Utils import safe_pickle  # the project's own dumps must pass the restricted loader

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
COMMON = ["--max_examples", "3", "--max_batch_size", "1", "--max_gen_len", "12", "--temperature", "0",
          "--dump_type_weight", "--dump_token_weight", "1"]
FIELDS = ["instruction", "input", "output", "answer", "generate", "pred", "correct"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, shared_data):
    from Utils.runtime import import_jittor, seed_everything
    jt = import_jittor()
    from Models.adapter_io import save_adapter
    from Models.llama_adapter import LLaMA_adapter
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = tmp_path_factory.mktemp("inference")
    ckpt, adapter = str(d / "ckpt"), str(d / "adapter")
    make_tiny_checkpoint(ckpt)
    seed_everything(0)
    model = LLaMA_adapter.from_pretrained(ckpt, routing="sparse_moa", lora_layers="0-2",
                                          lora_targets="Q,K,V,O,FFN_DOWN", p_adapter_layers="0-2", swi_x=4,
                                          max_seq_len=300)
    rng = np.random.default_rng(0)
    for _, p in model.trainable_parameters():  # LoRA B is zero at init: perturb so routing matters
        p.update(jt.array((p.numpy() + 0.5 * rng.standard_normal(p.shape)).astype(np.float32)))
    save_adapter(model, adapter)
    data = os.path.join(shared_data, "math", "AddSub", "test.json")
    return {"dir": d, "ckpt": ckpt, "adapter": adapter, "data": data}


def _cmd(assets, save_path, *extra):
    return [sys.executable, "inference.py", "--ckpt_dir", assets["ckpt"], "--adapter_path", assets["adapter"],
            "--data_path", assets["data"], "--save_path", save_path] + COMMON + list(extra)


def _run(cmd, timeout=240):
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(assets):
    out = str(assets["dir"] / "full" / "AddSub.jsonl")
    res = _run(_cmd(assets, out, "--time_gen"))
    return {"out": out, "stdout": res.stdout}


def test_scoring_end_to_end(full_run):
    from Utils.evaluate import score_records
    out = full_run["out"]
    recs = _lines(out)
    assert len(recs) == 3 and all(list(r) == FIELDS for r in recs)
    assert all(r["generate"] for r in recs)
    scored, acc = score_records("AddSub", recs)
    assert [s["correct"] for s in scored] == [r["correct"] for r in recs]
    k = sum(r["correct"] for r in recs)
    line = "AddSub Accuracy: %d/3 = %.4f" % (k, acc)
    assert line in full_run["stdout"]
    d = os.path.dirname(out)
    assert open(os.path.join(d, "AddSub_summary.txt")).read().strip() == line
    score = json.load(open(os.path.join(d, "acc_score.json")))
    assert score["AddSub"] == pytest.approx(acc) and score["average"] == pytest.approx(acc)
    t = _lines(os.path.join(d, "AddSub_bs1_time.jsonl"))[-1]
    assert t["total_ex"] == 3 and len(t["batches"]) == 3
    assert t["mean_all_cost"] == pytest.approx(t["all_cost"] / 3)
    assert 0 < t["inference_cost"] <= t["all_cost"]


def test_dump_schema(assets, full_run):
    from Dataset.prompts import format_prompt
    from Dataset.records import load_records
    from Models.tokenizer import Tokenizer
    d = os.path.dirname(full_run["out"])
    tw = safe_pickle.load(os.path.join(d, "AddSub_type_weight.pkl"))
    assert set(tw) >= {"routing", "labels", "layers", "token_num", "expert_sums"}
    assert tw["routing"] == "sparse_moa" and sorted(tw["layers"]) == [0, 1]
    labels = ["LoRA-Q", "LoRA-K", "LoRA-V", "LoRA-O", "LoRA-DOWN", "PAdapter"]
    tok = Tokenizer()
    records = load_records(assets["data"], require_output=False)[:3]
    prompt_lens = [len(tok.encode(format_prompt(r), bos=True, eos=False)) for r in records]
    for layer, st in tw["layers"].items():
        assert tw["labels"][layer] == labels and st["sum_weights"].shape == (6,)
        assert st["sum_threshold"] > 0 and st["sum_experts"] > 0
        mean = st["sum_weights"] / tw["token_num"]
        assert np.all(mean >= 0) and np.all(mean <= 1)
    # tokens read: the prompt plus all generated tokens but the last one (its own position is never read)
    assert sum(prompt_lens) <= tw["token_num"] <= sum(prompt_lens) + 3 * 11
    cases = safe_pickle.load(os.path.join(d, "AddSub_token_weight.pkl"))
    assert len(cases) == 1
    e = cases[0]
    assert set(e) >= {"layers", "words", "labels", "experts"} and e["index"] == 0
    T = len(e["words"])
    assert prompt_lens[0] + 1 <= T <= prompt_lens[0] + 12  # prompt + generation cut at the first stop token
    assert "".join(e["words"][1:prompt_lens[0]]) == format_prompt(records[0])
    for layer, w in e["layers"].items():
        assert w.shape == (T, 7) and e["labels"][layer] == labels + ["Threshold"]
        assert not np.isnan(w).any()


def test_plot_from_real_dump(full_run, tmp_path):
    """The heatmaps show the dump's numbers: per layer the mean type weight (sum / tokens, then the mean Γ), and one
    example's per-token weights exactly as dumped; the PNGs are real images."""
    from Utils.plot import load_pickle, plot_token_weight, plot_type_weight
    d = os.path.dirname(full_run["out"])
    tw = load_pickle(os.path.join(d, "AddSub_type_weight.pkl"), "type")
    fig, ax, m = plot_type_weight(tw, str(tmp_path / "h.png"))
    want = np.array([list(np.asarray(tw["layers"][l]["sum_weights"]) / tw["token_num"])
                     + [tw["layers"][l]["sum_threshold"] / tw["token_num"]] for l in sorted(tw["layers"])])
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), want, rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == tw["labels"][0] + ["Threshold"]
    cases = load_pickle(os.path.join(d, "AddSub_token_weight.pkl"), "token")
    fig, ax, m = plot_token_weight(cases, 0, 1, str(tmp_path / "t.png"))
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), np.asarray(cases[0]["layers"][1]))
    assert len(ax.get_yticklabels()) == len(cases[0]["words"])
    for png in ("h.png", "t.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_pictures_from_real_dump(full_run, tmp_path):
    """demo.py's last stage: the README's three pictures from an inference dump and a training log dir."""
    from tensorboardX import SummaryWriter
    import demo
    eval_dir = os.path.dirname(full_run["out"])
    w = SummaryWriter(log_dir=str(tmp_path / "ft"))
    for step in range(1, 4):
        w.add_scalar("c_train_loss", 3.0 - step, step)
    w.close()
    made = demo.draw_plots(str(tmp_path / "out"), str(tmp_path / "ft"), eval_dir, stem="AddSub")
    assert [os.path.basename(m) for m in made] == ["type_weight.png", "token_weight_layer1.png", "loss_curves.png"]
    # Each picture decodes to an image of the size matplotlib was asked for, and is not blank.
    import matplotlib.image as mpimg
    for path in made:
        img = mpimg.imread(path)
        assert img.ndim == 3 and min(img.shape[:2]) > 100 and float(img[..., :3].std()) > 0.01, path
    from Utils.plot import read_scalars
    assert read_scalars(str(tmp_path / "ft"))["c_train_loss"] == ([1, 2, 3], [2.0, 1.0, 0.0])


def test_kill_and_resume_gives_same_file(assets, full_run):
    out = str(assets["dir"] / "killed" / "AddSub.jsonl")
    # Jittor (imported by this process) quits on SIGCHLD from a child killed by a signal: default handler here.
    old = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        _kill_after_first_line(assets, out)
    finally:
        signal.signal(signal.SIGCHLD, old)
    n_before = open(out).read().count("\n")
    assert n_before >= 1
    with open(out, "a") as f:  # as if the kill had hit in the middle of a write
        f.write('{"instruction": "There are 7 cray')
    _run(_cmd(assets, out))
    assert open(out).read() == open(full_run["out"]).read()
    assert not os.path.exists(out + ".pending")


def _kill_after_first_line(assets, out):
    proc = subprocess.Popen(_cmd(assets, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(out) and open(out).read().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)


def test_two_ranks_equal_one(assets, full_run):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed (run.sh installs openmpi-bin)")
    out = str(assets["dir"] / "mpi" / "AddSub.jsonl")
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"] + _cmd(assets, out)
    res = _run(cmd)
    assert res.stdout.count("AddSub Accuracy") == 1  # only rank 0 prints
    assert [r["generate"] for r in _lines(out)] == [r["generate"] for r in _lines(full_run["out"])]
    assert open(out).read() == open(full_run["out"]).read()
    one = safe_pickle.load(os.path.join(os.path.dirname(full_run["out"]), "AddSub_type_weight.pkl"))
    two = safe_pickle.load(os.path.join(os.path.dirname(out), "AddSub_type_weight.pkl"))
    assert two["token_num"] == one["token_num"]
    for layer in one["layers"]:
        np.testing.assert_allclose(two["layers"][layer]["sum_weights"], one["layers"][layer]["sum_weights"],
                                   rtol=1e-4)


def test_default_sampling_runs_at_the_real_vocabulary(assets, full_run):
    """inference.py's own sampling defaults (temperature 0.1, top_p 0.75) with the 128,256-token tokenizer: this
    died in sample_top_p ("probabilities do not sum to 1"). Determinism under a seed: tests/test_generation.py."""
    out = str(assets["dir"] / "sampled" / "AddSub.jsonl")
    _run([sys.executable, "inference.py", "--ckpt_dir", assets["ckpt"], "--adapter_path", assets["adapter"],
          "--data_path", assets["data"], "--save_path", out, "--max_examples", "3", "--max_batch_size", "1",
          "--max_gen_len", "12"])
    sampled = [r["generate"] for r in _lines(out)]
    assert len(sampled) == 3 and all(sampled)
    assert sampled != [r["generate"] for r in _lines(full_run["out"])]   # sampled, not greedy


def test_score_only(assets, full_run, tmp_path):
    src = tmp_path / "AddSub_predict.jsonl"
    recs = _lines(full_run["out"])
    recs[0]["generate"] = "The answer is %s." % recs[0]["answer"]
    with open(src, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    res = _run([sys.executable, "inference.py", "--score_only", "--save_path", str(src)])
    k = 1 + sum(r["correct"] for r in recs[1:])
    assert "AddSub Accuracy: %d/3" % k in res.stdout
    assert json.load(open(tmp_path / "acc_score.json"))["AddSub"] == pytest.approx(k / 3)
    assert (tmp_path / "AddSub_predict_summary.txt").read_text().startswith("AddSub Accuracy")
    # --dataset overrides the name found in the path
    renamed = tmp_path / "preds.jsonl"
    shutil.copy(src, renamed)
    res = _run([sys.executable, "inference.py", "--score_only", "--save_path", str(renamed), "--dataset", "addsub"])
    assert "AddSub Accuracy: %d/3" % k in res.stdout


def test_user_errors_are_one_line(assets, tmp_path):
    (tmp_path / "taken").write_text("a file where the output directory should go\n")
    for cmd in ([sys.executable, "inference.py", "--score_only", "--save_path", str(tmp_path / "nope.jsonl")],
                _cmd(assets, str(tmp_path / "o.jsonl"), "--max_seq_len", "100"),
                _cmd(assets, str(tmp_path / "taken") + os.sep)):
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert (tmp_path / "taken").read_text().startswith("a file")  # nothing on disk was lost


def test_prediction_writer_keeps_out_of_order_results(tmp_path):
    """Results of later shards (other ranks) wait in .pending; a restart picks them up and skips them."""
    from inference import PredictionWriter
    records = [{"instruction": "q%d" % i, "input": ""} for i in range(4)]
    out = str(tmp_path / "s.jsonl")
    rec = lambda i: {"instruction": "q%d" % i, "input": "", "generate": "g%d" % i}  # noqa: E731
    w = PredictionWriter(out, records)
    w.add({0: rec(0), 2: rec(2)})            # 2 arrives before 1
    assert len(_lines(out)) == 1 and os.path.exists(out + ".pending")
    w = PredictionWriter(out, records)       # as after a kill
    assert w.completed(4).tolist() == [1, 0, 1, 0]
    w.add({1: rec(1), 3: rec(3)})
    assert [r["generate"] for r in _lines(out)] == ["g0", "g1", "g2", "g3"]
    assert not os.path.exists(out + ".pending")
    with pytest.raises(Exception, match="other data"):
        PredictionWriter(out, [{"instruction": "x", "input": ""}] * 4)
