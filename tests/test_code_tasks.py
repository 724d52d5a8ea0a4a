"""HumanEval / MBPP records, code prompts and `extract_code` (issue 19), checked end to end: every extracted
answer is run in the sandbox against the task's tests."""
import gzip
import json

import pytest

from Dataset.code_tasks import (code_prompt, extract_code, load_humaneval, load_mbpp, reference_solution,
                                task_kind, _mbpp_entry)
from Dataset.records import load_records
from Utils.code_eval import score_humaneval, score_mbpp
from Utils.errors import UserError

RUNNING_MAX = {
    "task_id": "Toy/0",
    "prompt": 'from typing import List\n\n\ndef running_max(values: List[int]) -> List[int]:\n'
              '    """Return the running maximum of values.\n    >>> running_max([1, 3, 2])\n'
              '    [1, 3, 3]\n    """\n',
    "canonical_solution": "    out, best = [], None\n    for v in values:\n"
                          "        best = v if best is None else max(best, v)\n"
                          "        out.append(best)\n    return out\n",
    "test": "def check(candidate):\n    assert candidate([]) == []\n    assert candidate([1, 3, 2]) == [1, 3, 3]\n"
            "    assert candidate([5, 4]) == [5, 5]\n",
    "entry_point": "running_max"}
COUNT_VOWELS = {   # the prompt brings a helper the answer may rely on without repeating it
    "task_id": "Toy/1",
    "prompt": 'def is_vowel(c: str) -> bool:\n    return c.lower() in "aeiou"\n\n\n'
              'def count_vowels(s: str) -> int:\n    """Count the vowels of s with is_vowel."""\n',
    "canonical_solution": "    return sum(1 for c in s if is_vowel(c))\n",
    "test": "def check(candidate):\n    assert candidate('') == 0\n    assert candidate('Banana') == 3\n",
    "entry_point": "count_vowels"}
DIGITS = {"task_id": 7, "text": "Write a function to return the product of the digits of a non-negative integer.",
          "code": "def digit_product(n):\n    p = 1\n    for ch in str(n):\n        p *= int(ch)\n    return p",
          "test_list": ["assert digit_product(123) == 6", "assert digit_product(0) == 0",
                        "assert digit_product(99) == 81"],
          "test_setup_code": ""}


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


# ---------------------------------------------------------------------------- loading
def test_load_humaneval_and_mbpp(tmp_path):
    he = load_humaneval(write_jsonl(tmp_path / "he.jsonl", [RUNNING_MAX, COUNT_VOWELS]))
    assert [r["task_id"] for r in he] == ["Toy/0", "Toy/1"] and task_kind(he[0]) == "humaneval"
    gz = tmp_path / "he.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(RUNNING_MAX) + "\n")
    assert load_humaneval(str(gz))[0]["entry_point"] == "running_max"
    no_setup = {k: v for k, v in DIGITS.items() if k != "test_setup_code"}
    mb = load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", [no_setup]))
    assert mb[0]["test_setup_code"] == "" and task_kind(mb[0]) == "mbpp"
    # MBPP in HumanEval's layout (empty prompt, no canonical_solution) loads as HumanEval
    alt = {"task_id": 11, "prompt": "", "entry_point": "digit_product",
           "test": "def check(candidate):\n    assert candidate(12) == 2\n"}
    assert load_humaneval(write_jsonl(tmp_path / "alt.jsonl", [alt]))[0]["canonical_solution"] == ""


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "A", "prompt": "def f():\\n", "test": "", "entry_point": "f"', r"he.jsonl:2: invalid JSON"),
    ('{"task_id": "A", "prompt": "def f():\\n", "entry_point": "f"}', r"he.jsonl:2: field 'test' missing"),
    ('{"task_id": "A", "prompt": 3, "test": "", "entry_point": "f"}', r"he.jsonl:2: field 'prompt' is int"),
    ('[1, 2]', r"he.jsonl:2: a JSON list, not an object"),
    ('{"task_id": "Toy/0", "prompt": "def f():\\n", "test": "", "entry_point": "f"}', r"he.jsonl:2: .*repeats line 1"),
    ('{"task_id": "A", "prompt": "def g():\\n", "test": "", "entry_point": "f"}', r"does not define entry_point"),
])
def test_malformed_humaneval_lines_are_one_line_errors(tmp_path, line, message):
    path = write_jsonl(tmp_path / "he.jsonl", [RUNNING_MAX], [line])
    with pytest.raises(UserError, match=message) as e:
        load_humaneval(path)
    assert "\n" not in str(e.value)


def test_malformed_mbpp_lines(tmp_path):
    bad = dict(DIGITS, task_id=8, test_list="assert digit_product(1) == 1")
    with pytest.raises(UserError, match=r"mbpp.jsonl:2: field 'test_list' is str \(expected a list of strings\)"):
        load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", [DIGITS, bad]))
    with pytest.raises(UserError, match=r"mbpp.jsonl:1: field 'code' missing"):
        load_mbpp(write_jsonl(tmp_path / "mbpp.jsonl", [{k: v for k, v in DIGITS.items() if k != "code"}]))
    with pytest.raises(UserError, match="no records"):
        load_mbpp(write_jsonl(tmp_path / "empty.jsonl", []))


def test_code_instructions_go_through_load_records(tmp_path):
    path = tmp_path / "codealpaca.json"
    path.write_text(json.dumps([{"instruction": "Reverse a list in Python.", "input": "",
                                 "output": "def rev(x):\n    return x[::-1]"}]))
    recs = load_records(str(path))
    assert recs[0]["output"].startswith("def rev") and recs[0]["answer"] == ""


# ---------------------------------------------------------------------------- prompts
def test_prompts():
    inst = code_prompt(RUNNING_MAX)
    assert inst.startswith("Below is an instruction") and inst.endswith("### Response:")
    assert "def running_max(values: List[int])" in inst
    assert code_prompt(RUNNING_MAX, style="completion") == RUNNING_MAX["prompt"]
    mb = code_prompt(DIGITS, style="completion")
    assert DIGITS["text"] in mb and all(t in mb for t in DIGITS["test_list"])
    assert code_prompt(DIGITS).endswith("### Response:")
    with pytest.raises(UserError, match="style"):
        code_prompt(DIGITS, style="chat")


# ---------------------------------------------------------------------------- extraction, scored in the sandbox
GOOD_ANSWERS = {
    "fenced, prose around, example usage and a wrong assert after it":
        (RUNNING_MAX, "Here is a solution:\n```python\ndef running_max(values):\n    out = []\n"
                      "    for v in values:\n"
                      "        out.append(v if not out else max(out[-1], v))\n    return out\n\n"
                      "print(running_max([1, 3, 2]))\nassert running_max([1]) == [2]\n```\nIt keeps the maximum."),
    "body continuation followed by another def and a print":
        (RUNNING_MAX, "    result = []\n    for v in values:\n"
                      "        result.append(max(result[-1], v) if result else v)\n"
                      "    return result\n\n\ndef unrelated():\n    return 0\n\nprint(running_max([9]))\n"),
    "unfenced whole function after prose, with a __main__ block that exits":
        (RUNNING_MAX, "Sure!\n\nfrom typing import List\n\ndef running_max(values: List[int]) -> List[int]:\n"
                      "    acc = []\n    for v in values:\n        acc.append(max([v] + acc[-1:]))\n    return acc\n\n"
                      "if __name__ == '__main__':\n    print(running_max([3]))\n    raise SystemExit(0)\n"),
    "unclosed fence relying on the prompt's helper":
        (COUNT_VOWELS, "```python\ndef count_vowels(s):\n    return sum(is_vowel(c) for c in s)\n"),
    "fenced body without its def line":
        (COUNT_VOWELS, "```python\n    return len([c for c in s if is_vowel(c)])\n```"),
    "MBPP fenced with an import, a constant before the def and a wrong assert after it":
        (DIGITS, "```python\nimport math\nBASE = 10\n\ndef digit_product(n):\n"
                 "    return math.prod(int(c) for c in str(n)) if n else 0\n\nassert digit_product(5) == 6\n```"),
}


def test_extracted_answers_pass_and_wrong_ones_fail():
    he = [(t, g) for t, g in GOOD_ANSWERS.values() if "entry_point" in t]
    progs = [extract_code(g, t) for t, g in he]
    assert progs[1] == RUNNING_MAX["prompt"] + GOOD_ANSWERS[
        "body continuation followed by another def and a print"][1].split("\n\n\ndef")[0] + "\n"
    wrong = extract_code("```python\ndef running_max(values):\n    return values\n```", RUNNING_MAX)
    score = score_humaneval([t for t, _ in he] + [RUNNING_MAX], progs + [wrong], timeout_s=5)
    statuses = [t.results[0].status for t in score.tasks]
    assert statuses == ["passed"] * len(he) + ["failed"], [t.results[0].stderr for t in score.tasks]
    mb_task, mb_answer = GOOD_ANSWERS["MBPP fenced with an import, a constant before the def and a wrong assert "
                                      "after it"]
    code = extract_code(mb_answer, mb_task)
    assert "assert digit_product(5)" not in code and code.startswith("import math\nBASE = 10")
    assert score_mbpp([mb_task], [code]).pass_at[1] == 1.0


def test_reference_solutions_pass():
    score = score_humaneval([RUNNING_MAX, COUNT_VOWELS], [reference_solution(RUNNING_MAX),
                                                        reference_solution(COUNT_VOWELS)])
    assert score.pass_at[1] == 1.0
    assert score_mbpp([DIGITS], [reference_solution(DIGITS)]).pass_at[1] == 1.0


def test_mbpp_entry_is_the_function_the_tests_call():
    task = {"code": "def helper(t):\n    return set(t)\n\ndef similar(a, b):\n    return helper(a) & helper(b)",
            "test_list": ["assert set(similar((1, 2), (2, 3))) == {2}"]}
    assert _mbpp_entry(task) == "similar"
    with pytest.raises(UserError, match="generation must be a string"):
        extract_code(None, DIGITS)
