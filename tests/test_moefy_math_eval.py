"""`moefy.py evaluate --math_sets` (issue 17): accuracy on test sets of the dense model and of every (method, k) run,
with inference.py's generation, answer extraction and scorer (Dataset/test_runner.py). On a tiny converted model:
k = E with the unweighted sum gives the dense model's predictions exactly, for every selection; the accuracies equal
`inference.py --score_only` on the written prediction files; the picture gains its accuracy panel; bad flags are
one-line errors."""
import json
import os

import pytest

from tests import moefy_assets as A
from tests.moefy_assets import moefy_error
from tests.conftest import DATA, run_script

METHODS = ("ground_truth", "router", "similarity", "random")
N_TOY = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return A.build_assets(str(tmp_path_factory.mktemp("moefy_math")))


def _write_set(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def _candidates(tok_dir, n=32, lengths=(198, 202)):
    """The first `n` records of the shipped AddSub, SingleEq and MultiArith sets whose prompt is 198-202 tokens long
    with the toy tokenizer: different problems, but prompts of nearly one length, so generating a batch takes
    hardly more steps than its answers (a batch is decoded from its shortest prompt on)."""
    from Dataset.prompts import prompt_ids
    from Dataset.records import load_records
    from Models.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    out = []
    for name in ("AddSub", "SingleEq", "MultiArith"):
        for r in load_records(os.path.join(DATA, "math", name, "test.json"), require_output=False,
                              require_answer=True):
            if lengths[0] <= len(prompt_ids(r, tok, 2048, 30, None)) <= lengths[1]:
                out.append({"instruction": r["instruction"], "input": r["input"], "answer": r["answer"]})
                if len(out) == n:
                    return out
    return out


def _toy_sets(a, root):
    """Two numeric test sets of N_TOY records on which the dense model is right some of the time. A random tiny
    model rarely writes a digit, so the dense model first answers 32 shipped problems (greedy, with the evaluate
    stage's own generation); "toy_a" holds those where it wrote a number, with that number as the answer, and
    others, "toy_b" N_TOY of the rest with their true answers. Returns (paths, dense accuracy on toy_a)."""
    import moefy
    probe = _write_set(os.path.join(root, "probe_set", "test.json"), _candidates(a["tok"]))
    opts = moefy.build_parser().parse_args([
        "evaluate", "--model", a["meta3"], "--work_dir", root, "--data", a["val"], "--math_sets", probe,
        "--math_examples", "32", "--max_gen_len", "8", "--progress", "false"])
    moefy.math_eval(opts).evaluate(A.load(a["meta3"]), os.path.join(root, "probe"))
    with open(os.path.join(root, "probe", "probe_set.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    numbers = [i for i, r in enumerate(lines) if r["pred"] is not None][:N_TOY // 2]
    assert numbers, "the dense model wrote no number at all: choose other problems for the toy sets"
    rest = [i for i in range(len(lines)) if i not in numbers]
    first, second = numbers + rest[:N_TOY - len(numbers)], rest[N_TOY - len(numbers):][:N_TOY]
    rec = lambda i, answer: {"instruction": lines[i]["instruction"], "input": "", "answer": answer}
    a_path = _write_set(os.path.join(root, "toy_a", "test.json"),
                        [rec(i, str(lines[i]["pred"]) if i in numbers else lines[i]["answer"]) for i in first])
    b_path = _write_set(os.path.join(root, "toy_b", "test.json"), [rec(i, lines[i]["answer"]) for i in second])
    return a_path, b_path, len(numbers) / N_TOY


@pytest.fixture(scope="module")
def evaluated(assets, tmp_path_factory):
    import moefy
    root = str(tmp_path_factory.mktemp("moefy_math_run"))
    work = os.path.join(root, "w")
    A.split_convert(assets, work, "kmeans", 2)                       # E = 8, unweighted sum, centroid routers
    toy_a, toy_b, dense_acc = _toy_sets(assets, root)
    moefy.main(["evaluate", "--model", assets["meta3"], "--work_dir", work, "--data", assets["val"], "--seq_len", "32",
                "--max_eval_rows", "2", "--fractions", "0.25,1", "--math_sets", toy_a + "," + toy_b,
                "--math_examples", str(N_TOY), "--max_gen_len", "8", "--progress", "false"])
    with open(os.path.join(work, "eval", "results.json")) as f:
        res = json.load(f)
    return dict(work=work, res=res, pred=os.path.join(work, "eval", "predictions"), toy_dense=dense_acc, toy_b=toy_b)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_all_experts_give_the_dense_predictions_for_every_method(evaluated):
    res, pred = evaluated["res"], evaluated["pred"]
    dense = res["dense"]["math"]
    assert set(dense) == {"toy_a", "toy_b", "mean"}
    assert dense["toy_a"] == evaluated["toy_dense"] > 0              # the dense model's own answers count as right
    full = [r for r in res["rows"] if r["k"] == r["num_experts"]]
    assert sorted(r["method"] for r in full) == sorted(METHODS)
    for r in full:
        assert r["math"] == dense, r["method"]
        for s in ("toy_a", "toy_b"):
            got = _lines(os.path.join(pred, "%s_k%d" % (r["method"], r["k"]), s + ".jsonl"))
            want = _lines(os.path.join(pred, "dense", s + ".jsonl"))
            assert len(got) == N_TOY and got == want, (r["method"], s)
    # the comparison would notice another model: with 2 of 8 groups the random selection writes other answers
    part = _lines(os.path.join(pred, "random_k2", "toy_b.jsonl"))
    assert [x["generate"] for x in part] != [x["generate"] for x in _lines(os.path.join(pred, "dense", "toy_b.jsonl"))]


def test_accuracy_equals_inference_score_only_on_the_written_files(evaluated, capsys):
    import inference
    res, pred = evaluated["res"], evaluated["pred"]
    runs = {"dense": res["dense"]["math"]}
    runs.update({"%s_k%d" % (r["method"], r["k"]): r["math"] for r in res["rows"]})
    assert sorted(os.listdir(pred)) == sorted(runs)                 # one directory per run, nothing else
    for run, acc in runs.items():
        d = os.path.join(pred, run)
        assert sorted(os.listdir(d)) == ["toy_a.jsonl", "toy_b.jsonl"]
        for s in ("toy_a", "toy_b"):   # --dataset: a set without a known name would be named after its directory
            inference.main(["--score_only", "--save_path", os.path.join(d, s + ".jsonl"), "--dataset", s])
        with open(os.path.join(d, "acc_score.json")) as f:
            scored = json.load(f)
        assert scored["toy_a"] == acc["toy_a"] and scored["toy_b"] == acc["toy_b"], run
        assert scored["average"] == pytest.approx(acc["mean"], abs=1e-12)
        assert scored["details"]["toy_a"]["total"] == N_TOY
    capsys.readouterr()
    table = res["accuracy"]
    assert set(table) == set(METHODS) and all(len(v) == 2 for v in table.values())
    assert res["math"]["sets"]["toy_b"] == evaluated["toy_b"]
    assert res["math"]["generation"]["temperature"] == 0.0 and res["math"]["max_examples"] == N_TOY


def test_picture_gains_an_accuracy_panel(evaluated, tmp_path):
    from Utils.moefy_plot import accuracy_series, plot_moefication
    res = evaluated["res"]
    assert os.path.getsize(os.path.join(evaluated["work"], "eval", "moefication.png")) > 1000
    fig, drawn = plot_moefication({"tiny": res}, str(tmp_path / "with.png"))
    assert len(fig.axes) == 3 and "accuracy" in fig.axes[1].get_title()
    acc = accuracy_series(res)
    assert set(acc) == set(METHODS)
    for m, (xs, ys) in acc.items():
        rows = sorted((r for r in res["rows"] if r["method"] == m), key=lambda r: r["fraction"])
        assert xs == [100.0 * r["fraction"] for r in rows] and ys == [100.0 * r["math"]["mean"] for r in rows]
    plain = dict(res, rows=[{k: v for k, v in r.items() if k != "math"} for r in res["rows"]])
    fig2, drawn2 = plot_moefication({"tiny": plain}, str(tmp_path / "without.png"))
    assert len(fig2.axes) == 2 and drawn2 == drawn                   # without accuracy: the picture as before
    assert os.path.getsize(str(tmp_path / "with.png")) > 1000


def test_bad_math_flags_are_one_line_errors(tmp_path, capsys):
    w = str(tmp_path / "w")
    ev = ["evaluate", "--model", "m", "--work_dir", w, "--data", "d"]
    err = moefy_error(capsys, ev + ["--math_sets", "gsm8k,nosuchset"])
    assert err.startswith("error: --math_sets:") and "'nosuchset'" in err and "gsm8k" in err
    missing = str(tmp_path / "nowhere" / "test.json")
    assert moefy_error(capsys, ev + ["--math_sets", missing]) == "error: --math_sets: %s: data file not found" % missing
    bad = tmp_path / "bad" / "test.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([{"instruction": "2+2?", "input": ""}]))      # no answer
    err = moefy_error(capsys, ev + ["--math_sets", str(bad)])
    assert err.startswith("error: --math_sets:") and str(bad) in err
    for n in ("0", "-3"):
        err = moefy_error(capsys, ev + ["--math_sets", "AddSub", "--math_examples", n])
        assert "--math_examples must be >= 1" in err
    assert "--max_gen_len" in moefy_error(capsys, ev + ["--math_sets", "AddSub", "--max_gen_len", "0"])
    assert "--prompt_template" in moefy_error(capsys, ev + ["--math_sets", "AddSub", "--prompt_template", "completion"])
    # `all` checks them before its first stage, and the command line prints one line with status 2
    r = run_script("moefy.py", ["all", "--model", "m", "--work_dir", w, "--data", "d", "--eval_data", "e",
                                "--math_sets", "AddSub", "--math_examples", "0"], timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --math_examples must be >= 1 (the first N records of every set), got 0"], r.stderr
    assert not os.path.exists(w)


def test_set_names_resolve_to_the_shipped_files():
    from Dataset.test_runner import resolve_named_sets
    sets = resolve_named_sets("gsm8k, addsub,BoolQ", "--math_sets")
    assert sets == [("gsm8k", os.path.join(DATA, "math", "gsm8k", "test.json"), "math"),
                    ("AddSub", os.path.join(DATA, "math", "AddSub", "test.json"), "math"),
                    ("boolq", os.path.join(DATA, "commonsense", "boolq", "test.json"), "math")]
    assert [n for n, _, _ in resolve_named_sets("math", "--math_sets")] == sorted(
        ["AQuA", "AddSub", "MultiArith", "SVAMP", "SingleEq", "gsm8k"])
    path = os.path.join(DATA, "math", "SVAMP", "test.json")
    assert resolve_named_sets(path, "--math_sets") == [("SVAMP", path, "math")]
