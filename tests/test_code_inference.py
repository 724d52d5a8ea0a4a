"""inference.py on code sets (issue 19) with a stub generator over hand-written HumanEval / MBPP files: the answers
are a correct, a wrong and a looping program, so pass@1 = 1/3; the loop is killed within its timeout; nothing runs
in the evaluating process (Jittor imported, as in a real run); resuming generates only what is missing; pass@k
with several samples; --score_only; set detection. The real model on a code set under mpirun: test_qwen3_moa.py."""
import builtins
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import ROOT
from Utils.errors import UserError

MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
# Executed anywhere but in a sandbox, this line would mark the evaluating process.
MARK = "import builtins\nbuiltins.MOA_RAN_HERE = True\n"
TASKS = [
    {"task_id": "T/0", "entry_point": "add", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "T/1", "entry_point": "mul", "prompt": 'def mul(a, b):\n    """Return a * b."""\n',
     "canonical_solution": "    return a * b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 6\n"},
    {"task_id": "T/2", "entry_point": "halt", "prompt": 'def halt():\n    """Return 1."""\n',
     "canonical_solution": "    return 1\n", "test": "def check(candidate):\n    assert candidate() == 1\n"},
]
ANSWERS = {  # entry point: what the "model" says (fenced, as instruction-tuned models answer)
    "add": "Here it is:\n```python\n%sdef add(a, b):\n    return a + b\n```\nDone." % MARK,
    "mul": "```python\n%sdef mul(a, b):\n    return a + b\n```" % MARK,
    "halt": "```python\n%sdef halt():\n    while True:\n        pass\n```" % MARK,
}
TIMEOUT = 3.0


class StubModel:
    """What inference.Runner needs of a model: args.max_seq_len, a tokenizer, generate(). The answer is looked up
    from the entry point named in the prompt; `wrong_after` answers wrongly from that call on for a task."""

    def __init__(self, answers=ANSWERS, wrong_after=None):
        from Models.hf_tokenizer import HFTokenizer
        self.tokenizer = HFTokenizer(MINIMIND)
        self.args = SimpleNamespace(max_seq_len=1024)
        self.answers, self.wrong_after, self.asked, self.prompts = answers, wrong_after, [], []

    def generate(self, prompts, max_gen_len, **kw):
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            self.prompts.append(list(p))
            entry = next(e for e in self.answers if "%s(" % e in text)
            self.asked.append(entry)
            answer = self.answers[entry]
            if self.wrong_after is not None and self.asked.count(entry) > self.wrong_after:
                answer = answer.replace("return a + b", "return a - b")
            out.append(self.tokenizer.encode(answer, False, False))
        return out


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _sandbox_pids():
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if b"sandbox_child.py" in f.read():
                    found.add(int(pid))
        except OSError:
            pass
    return found


def run_inference(monkeypatch, model, *argv):
    """inference.run in this process with `model` in place of the checkpoint (jittor imported, as in a real run)."""
    import inference
    a = inference.build_parser().parse_args(["--ckpt_dir", "unused", "--max_gen_len", "200", "--temperature", "0",
                                             "--code_timeout", str(TIMEOUT)] + list(argv))
    inference.check_args(a)
    monkeypatch.setattr(inference, "load_model", lambda args: model)
    inference.run(a)


@pytest.fixture(scope="module")
def humaneval(tmp_path_factory):
    d = tmp_path_factory.mktemp("code")
    return _write_jsonl(d / "HumanEval.jsonl", TASKS)


@pytest.fixture(scope="module")
def first_run(humaneval, tmp_path_factory, jt):
    out = str(tmp_path_factory.mktemp("run") / "HumanEval.jsonl")
    before = _sandbox_pids()
    mp = pytest.MonkeyPatch()
    model = StubModel()
    try:
        t0 = time.monotonic()
        run_inference(mp, model, "--data_path", humaneval, "--save_path", out, "--max_batch_size", "2")
        seconds = time.monotonic() - t0
    finally:
        mp.undo()
    return {"out": out, "seconds": seconds, "left": _sandbox_pids() - before, "model": model}


def test_the_model_is_asked_the_code_prompt(first_run):
    from Dataset.code_tasks import code_prompt
    tok = first_run["model"].tokenizer
    assert first_run["model"].prompts == [tok.encode(code_prompt(t), bos=True, eos=False) for t in TASKS]


def test_pass_at_1_is_one_third(first_run):
    recs = _lines(first_run["out"])
    assert [r["task_id"] for r in recs] == ["T/0", "T/1", "T/2"]
    assert all(list(r) == ["task_id", "sample", "prompt", "generation", "program", "status", "passed", "error"]
               for r in recs)
    assert [r["status"] for r in recs] == ["passed", "failed", "timeout"]
    assert [r["passed"] for r in recs] == [True, False, False]
    assert recs[0]["program"].startswith(MARK) and "Done." not in recs[0]["program"]   # extracted, prose cut
    assert recs[1]["error"] == "AssertionError" and recs[0]["error"] == ""
    assert recs[0]["prompt"] == TASKS[0]["prompt"] and recs[0]["generation"] == ANSWERS["add"]
    d = os.path.dirname(first_run["out"])
    summary = open(os.path.join(d, "HumanEval_summary.txt")).read()
    assert summary.startswith("HumanEval pass@1: 1/3 = 0.3333 (3 tasks × 1 sample; passed 1, failed 1, timeout 1")
    score = json.load(open(os.path.join(d, "acc_score.json")))
    assert score["HumanEval"] == pytest.approx(1 / 3) and score["details"]["HumanEval"]["pass_at"] == {"1": 1 / 3}


def test_the_loop_dies_with_its_timeout_and_nothing_runs_here(first_run):
    assert not hasattr(builtins, "MOA_RAN_HERE")       # every program ran elsewhere
    assert first_run["left"] == set()                   # no sandbox outlived the run
    # the loop costs its timeout once (the three programs run two at a time), plus start-up and set-up
    assert first_run["seconds"] < TIMEOUT + 25


def test_resume_generates_only_what_is_missing(humaneval, first_run, tmp_path, monkeypatch):
    out = str(tmp_path / "HumanEval.jsonl")
    with open(first_run["out"]) as f:
        first = f.readline()
    with open(out, "w") as f:
        f.write(first + '{"task_id": "T/1", "sam')       # killed in the middle of a line
    model = StubModel()
    run_inference(monkeypatch, model, "--data_path", humaneval, "--save_path", out, "--max_batch_size", "2")
    assert model.asked == ["mul", "halt"]
    assert open(out).read() == open(first_run["out"]).read()
    model = StubModel()                                  # complete: nothing left to do
    run_inference(monkeypatch, model, "--data_path", humaneval, "--save_path", out)
    assert model.asked == []
    os.makedirs(tmp_path / "other")
    other = _write_jsonl(tmp_path / "other" / "HumanEval.jsonl",
                         [dict(TASKS[0], prompt=TASKS[0]["prompt"] + "# v2\n")] + TASKS[1:])
    with pytest.raises(UserError, match="written for other data"):
        run_inference(monkeypatch, StubModel(), "--data_path", other, "--save_path", out)


def test_samples_give_pass_at_k(humaneval, tmp_path, monkeypatch):
    out = str(tmp_path / "k" / "HumanEval.jsonl")
    run_inference(monkeypatch, StubModel(wrong_after=1), "--data_path", humaneval, "--save_path", out,
                  "--num_samples", "5", "--temperature", "0.7", "--max_examples", "1")
    recs = _lines(out)
    assert [(r["task_id"], r["sample"], r["passed"]) for r in recs] == \
        [("T/0", 0, True)] + [("T/0", s, False) for s in range(1, 5)]
    score = json.load(open(tmp_path / "k" / "acc_score.json"))["details"]["HumanEval"]
    assert score["pass_at"] == {"1": pytest.approx(0.2), "5": 1.0}     # unbiased estimator, n = 5, c = 1
    assert open(tmp_path / "k" / "HumanEval_summary.txt").read().startswith(
        "HumanEval pass@1 = 0.2000, pass@5 = 1.0000 (1 task × 5 samples;")
    with pytest.raises(UserError, match="identical samples"):
        run_inference(monkeypatch, StubModel(), "--data_path", humaneval, "--save_path", out, "--num_samples", "2")


def test_mbpp_and_completion_prompts(tmp_path, monkeypatch):
    mbpp = _write_jsonl(tmp_path / "mbpp.jsonl", [{
        "task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": ""}])
    model = StubModel({"add": "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"})
    run_inference(monkeypatch, model, "--data_path", mbpp, "--save_path", str(tmp_path / "out") + os.sep,
                  "--prompt_template", "completion")
    rec = _lines(tmp_path / "out" / "mbpp.jsonl")[0]
    assert rec["passed"] and rec["program"] == "def add(a, b):\n    return a + b\n" and rec["task_id"] == 11
    with pytest.raises(UserError, match="code sets only"):
        run_inference(monkeypatch, model, "--data_path", os.path.join(ROOT, "data", "math", "AddSub", "test.json"),
                      "--save_path", str(tmp_path / "m.jsonl"), "--prompt_template", "completion")


def test_set_detection(humaneval, tmp_path):
    from inference import resolve_sets
    addsub = os.path.join(ROOT, "data", "math", "AddSub", "test.json")
    assert resolve_sets([humaneval + "," + addsub]) == [("HumanEval", humaneval, "humaneval"),
                                                         ("AddSub", addsub, "math")]
    with pytest.raises(UserError, match="not a HumanEval or MBPP"):
        resolve_sets([addsub], "code")
    assert resolve_sets([humaneval], "math")[0][2] == "math"


def test_score_only_reads_the_stored_outcomes(first_run, tmp_path):
    path = tmp_path / "HumanEval_rerun.jsonl"
    recs = _lines(first_run["out"])
    recs[1].update(passed=True, status="passed")
    _write_jsonl(path, recs)
    r = subprocess.run([sys.executable, "inference.py", "--score_only", "--save_path", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HumanEval_rerun pass@1: 2/3 = 0.6667" in r.stdout
    assert json.load(open(tmp_path / "acc_score.json"))["HumanEval_rerun"] == pytest.approx(2 / 3)
