"""Tests for docs/moa.md §8 answer extraction and scoring (and the D9 AQuA option)."""
import glob
import math
import os
import re

import pytest

from Dataset import load_records
from Utils.evaluate import (canonical_name, dataset_name_from_path, extract_answer, is_correct, score_records,
                            summary_line)


@pytest.mark.parametrize("text,expected", [
    ("The answer is 1,234.", 1234.0),
    ("So 3 - 10 = -7. The answer is -7.", -7.0),
    ("It costs 9.8 dollars.", 9.8),
    ("24 * 24 = 576. The answer is 576.", 576.0),
    ("first 12 then 0.5", 0.5),
    ("3.14.15", 15.0),  # last match of the reference regex
    ("no number here", math.inf),
    ("", math.inf),
])
def test_numeric_extraction(text, expected):
    assert extract_answer("gsm8k", text) == expected


def test_numeric_correctness():
    assert is_correct("SVAMP", 1234.0, "1234.0")
    assert is_correct("AddSub", 0.333, "0.3333333333333333")
    assert not is_correct("AddSub", 0.33, "0.3333333333333333")
    assert not is_correct("gsm8k", math.inf, "5.0")
    assert is_correct("gsm8k", -7.0, "-7.0")
    assert is_correct("my_own_set", 7.0, "7.0")  # unknown names are numeric


def test_aqua_first_letter_rule():
    assert extract_answer("AQuA", "  Each apple costs 2. The answer is (D).") == "E"  # reference quirk
    assert extract_answer("aqua", "the answer is (D).") == "D"
    assert extract_answer("AQuA", "no capital letters") == ""


def test_aqua_answer_is_rule():
    text = "Each apple costs 2, so answer is not A. The answer is (D)."
    assert extract_answer("AQuA", text, aqua_rule="answer_is") == "D"  # last "answer is"
    assert extract_answer("AQuA", "The Answer is: B", aqua_rule="answer_is") == "B"
    assert extract_answer("AQuA", "The answer is Dogs", aqua_rule="answer_is") == ""
    assert extract_answer("AQuA", "A B C", aqua_rule="answer_is") == ""
    with pytest.raises(ValueError):
        extract_answer("AQuA", "A", aqua_rule="last")


@pytest.mark.parametrize("name,text,expected", [
    ("boolq", "the answer is false, not true", "false"),
    ("boolq", "True", ""),  # case-sensitive
    ("piqa", "solution2", "solution2"),
    ("social_i_qa", "answer3 or answer1", "answer3"),
    ("ARC-Challenge", "answer5", "answer5"),
    ("arc-easy", "answer6", ""),
    ("openbookqa", "answer2", "answer2"),
    ("hellaswag", "ending4", "ending4"),
    ("winogrande", "option1", "option1"),
])
def test_commonsense_extraction(name, text, expected):
    assert extract_answer(name, text) == expected
    assert is_correct(name, expected, expected)


def test_dataset_names_from_paths():
    assert dataset_name_from_path("/x/math/gsm8k/test.json") == "gsm8k"
    assert dataset_name_from_path("out/AddSub_predict_mingen120.jsonl") == "AddSub"
    assert dataset_name_from_path("d/arc-challenge/test.json") == "ARC-Challenge"
    assert dataset_name_from_path("d/social_i_qa/test.json") == "social_i_qa"
    assert dataset_name_from_path("d/mine/test.json") == "mine"
    assert canonical_name("GSM8K") == "gsm8k" and canonical_name("x/AQuA/test.json") == "AQuA"


def test_score_records_and_summary():
    recs = [{"generate": "The answer is 4.", "answer": "4.0"}, {"generate": "I think 5", "answer": "4"}]
    scored, acc = score_records("AddSub", recs)
    assert [r["correct"] for r in scored] == [True, False] and acc == 0.5
    assert scored[1]["pred"] == 5.0 and "pred" not in recs[0]
    assert summary_line("AddSub", 1, 2) == "AddSub Accuracy: 1/2 = 0.5000"
    with pytest.raises(ValueError, match="record 0"):
        score_records("AddSub", [{"generate": "4", "answer": "four"}])


# ---- independent re-implementation of the rules, used as an oracle on the shared sets ----

def _last_number_by_scan(text):
    """Last number by a character scan (not the module's regex): [-]digits[.digits*]."""
    s = text.replace(",", "")
    last, i = None, 0
    while i < len(s):
        if s[i] in "0123456789":
            j = i
            while j < len(s) and s[j] in "0123456789":
                j += 1
            if j < len(s) and s[j] == ".":
                j += 1
                while j < len(s) and s[j] in "0123456789":
                    j += 1
            start = i - 1 if i > 0 and s[i - 1] == "-" else i
            last, i = s[start:j], j
        else:
            i += 1
    return float(last) if last is not None else math.inf


def _letter_after_last_answer_is(text):
    """D9 rule by string methods: skip spaces, one ':' and one '(' after the last "answer is"."""
    k = text.lower().rfind("answer is")
    if k < 0:
        return ""
    rest = text[k + len("answer is"):].lstrip()
    rest = rest[1:].lstrip() if rest.startswith(":") else rest
    rest = rest[1:] if rest.startswith("(") else rest
    if rest[:1] in ("A", "B", "C", "D", "E") and rest[:1] and not rest[1:2].isalpha():
        return rest[0]
    return ""


def _oracle_correct(name, generation, answer, aqua_rule):
    if name == "AQuA" and aqua_rule == "first":
        m = re.search("[ABCDE]", generation)
        return (m.group(0) if m else "") == answer
    if name == "AQuA":
        return _letter_after_last_answer_is(generation) == answer
    return abs(float(answer) - _last_number_by_scan(generation)) <= 0.001


@pytest.mark.parametrize("aqua_rule", ["first", "answer_is"])
def test_own_outputs_score_as_the_rules_imply(shared_data, aqua_rule):
    # The `output` fields are model-written rationales, not gold, so accuracy is below 1 (SVAMP ~0.80).
    for path in sorted(glob.glob(os.path.join(shared_data, "math", "*", "test.json"))):
        name = dataset_name_from_path(path)
        recs = [dict(r, generate=r["output"]) for r in load_records(path, require_answer=True)]
        scored, acc = score_records(name, recs, aqua_rule=aqua_rule)
        expected = [_oracle_correct(name, r["output"], r["answer"], aqua_rule) for r in recs]
        assert [r["correct"] for r in scored] == expected, name
        assert acc == sum(expected) / len(recs)
        assert 0.3 < acc < 1.0, (name, acc)


COMMONSENSE_COUNTS = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "winogrande": 1267, "ARC-Challenge": 1172,
                      "ARC-Easy": 2376, "openbookqa": 500}


def test_commonsense_sets_ship_and_score_their_gold_outputs(shared_data):
    """data/commonsense (data/README.md counts): each set loads strictly, is recognised by its directory name, and
    its `output` ("the correct answer is X") scores 100%: the answer word is what the extraction rule finds."""
    paths = sorted(glob.glob(os.path.join(shared_data, "commonsense", "*", "test.json")))
    found = {dataset_name_from_path(p): p for p in paths}
    assert {n: len(load_records(p, require_output=True, require_answer=True)) for n, p in found.items()} \
        == COMMONSENSE_COUNTS
    for name, path in found.items():
        recs = [dict(r, generate=r["output"]) for r in load_records(path, require_answer=True)]
        scored, acc = score_records(name, recs)
        assert acc == 1.0, (name, [r["output"] for r in scored if not r["correct"]][:3])
