"""Answer extraction and scoring for the math and commonsense test sets (docs/moa.md §8, decision D9 in docs/moa.md
§10)."""
import math
import os
import re

NUMERIC_SETS = ("AddSub", "gsm8k", "MultiArith", "SingleEq", "SVAMP")
MATH_SETS = ("AddSub", "AQuA", "gsm8k", "MultiArith", "SingleEq", "SVAMP")
COMMONSENSE_SETS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy",
                    "openbookqa")
# Commonsense label patterns (docs/moa.md §8.2): first match, case-sensitive.
_COMMONSENSE_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
_KNOWN = {name.lower(): name for name in MATH_SETS + COMMONSENSE_SETS}
# Reference numeric rule: an optional minus, digits, an optional point and more digits ("576." matches).
_NUMBER = re.compile(r"-?\d+\.?\d*")
# D9 option: the letter after the LAST "answer is" (any case), allowing ":" and "(" before it, e.g.
# "The answer is (D)." or "answer is: B". The letter must be A-E and not start a longer word.
_ANSWER_IS = re.compile(r"(?i:answer is)\s*:?\s*\(?([A-E])(?![A-Za-z])")
AQUA_RULES = ("first", "answer_is")
TOLERANCE = 0.001


def dataset_name_from_path(path):
    """The canonical dataset name a path refers to, e.g. ".../gsm8k/test.json" -> "gsm8k".

    Looks at the path's parts from the last one back; a part matches a known set when it equals its name
    (any case) or starts with it followed by "_" or "." (prediction files such as
    "AddSub_predict_mingen120.jsonl"). Unknown sets get the name of the file's directory (the
    `<name>/test.json` layout), or the file's stem without one; they are scored as numeric sets.
    """
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    longest_first = sorted(_KNOWN, key=len, reverse=True)  # so "arc-challenge" is tried before shorter names
    for part in reversed(parts):
        low = part.lower()
        for key in longest_first:
            if low == key or low.startswith(key + "_") or low.startswith(key + "."):
                return _KNOWN[key]
    if len(parts) >= 2:
        return parts[-2]
    return os.path.splitext(parts[-1])[0] if parts else ""


def canonical_name(dataset):
    """Canonical spelling of a dataset given as a name (any case) or a path; unknown names pass through."""
    if "/" in dataset or os.sep in dataset or dataset.lower().endswith((".json", ".jsonl")):
        return dataset_name_from_path(dataset)
    return _KNOWN.get(dataset.lower(), dataset)


def _kind(dataset):
    name = canonical_name(dataset)
    if name == "AQuA":
        return "aqua", name
    if name in _COMMONSENSE_PATTERNS:
        return "commonsense", name
    return "numeric", name  # the five numeric sets and any set we do not know


def extract_answer(dataset, text, aqua_rule="first"):
    """The prediction in a generated text: a float for numeric sets (inf if none), else a label string.

    AQuA rule "first" (reference, default): the first capital A-E anywhere in the stripped text; rule
    "answer_is" (D9): the letter matched by `_ANSWER_IS` at its last match. Either gives "" when nothing fits.
    """
    kind, name = _kind(dataset)
    if kind == "numeric":
        matches = _NUMBER.findall(text.replace(",", ""))
        return float(matches[-1]) if matches else math.inf
    if kind == "aqua":
        if aqua_rule == "first":
            for ch in text.strip():
                if ch in "ABCDE":
                    return ch
            return ""
        if aqua_rule == "answer_is":
            matches = _ANSWER_IS.findall(text)
            return matches[-1] if matches else ""
        raise ValueError("unknown aqua_rule %r (expected one of %s)" % (aqua_rule, ", ".join(AQUA_RULES)))
    match = re.search(_COMMONSENSE_PATTERNS[name], text.strip())
    return match.group(0) if match else ""


def is_correct(dataset, pred, answer):
    """Numeric sets: |float(answer) - pred| <= 0.001 (inf never matches); other sets: pred == answer."""
    kind, _ = _kind(dataset)
    if kind == "numeric":
        try:
            label = float(answer)
        except (TypeError, ValueError):
            raise ValueError("answer %r is not a number" % (answer,))
        return abs(label - pred) <= TOLERANCE
    return pred == answer


def score_records(dataset, records, aqua_rule="first"):
    """Score records holding `generate` and `answer`; returns (scored records, accuracy).

    Each scored record is a copy with `pred` and `correct` added, plus `flag` (= correct, the reference's
    key in its *_checkanswer.jsonl side files).
    """
    if not records:
        raise ValueError("no records to score for %s" % dataset)
    scored = []
    for i, rec in enumerate(records):
        for field in ("generate", "answer"):
            if not isinstance(rec.get(field), str):
                raise ValueError("record %d: field '%s' missing or not a string" % (i, field))
        pred = extract_answer(dataset, rec["generate"], aqua_rule)
        try:
            ok = is_correct(dataset, pred, rec["answer"])
        except ValueError as e:
            raise ValueError("record %d: %s" % (i, e))
        scored.append(dict(rec, pred=pred, correct=ok, flag=ok))
    return scored, sum(r["correct"] for r in scored) / len(scored)


def summary_line(name, k, n):
    """One log line, e.g. "gsm8k Accuracy: 12/20 = 0.6000"."""
    acc = "%.4f" % (k / n) if n else "n/a"
    return "%s Accuracy: %d/%d = %s" % (name, k, n, acc)
