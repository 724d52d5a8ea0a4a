"""Generated instruction/answer conversations with checkable answers, for the MoE-LLM demo's SFT stage.

    python -m Dataset.instruction_generator --out_dir D [--n_train 2000] [--n_val 200] [--n_test 200] [--seed 0]
                                            [--kinds arithmetic,reverse_words,...]

writes D/train.jsonl, D/validation.jsonl and D/test.jsonl in minimind's conversations format (readable by
`Dataset.sft_data`), one record per line:

    {"conversations": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
     "task": kind, "answer": the exact answer as a string}

Task kinds (templated, so every answer is exact and `score_answer` can check a generation):
* arithmetic — the word problems of `Dataset.math_generator` (both families), answered with the worked steps and
  "The answer is N.";
* reverse_words — "Reverse the order of these words: ..." → the words in reverse order;
* sort_numbers — "Sort these numbers from smallest to largest: ..." → the sorted list;
* count_capitals — "How many capital letters are in ...?" → "There are N capital letters.";
* uppercase — "Write these words in capital letters: ..." → the words in upper case.

Kinds alternate in order, so every split is balanced. User prompts are pairwise distinct over all three splits.
The stream is drawn test first, then validation, then train, from `random.Random` seeded with a string (stable
across Python versions): the same seed always gives the same files, and changing --n_train leaves the test and
validation sets unchanged.
"""
import argparse
import json
import os
import random
import re
import tempfile

from Dataset.math_generator import TEMPLATES as MATH_TEMPLATES
from Utils.errors import UserError, cli_main

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "bread", "horse", "paper",
         "garden", "window", "orange", "silver", "winter", "forest", "candle", "rocket", "pencil", "yellow",
         "bridge", "island", "tiger", "lemon", "chair", "ocean", "planet", "summer", "dragon", "castle", "mirror"]
KINDS = ("arithmetic", "reverse_words", "sort_numbers", "count_capitals", "uppercase")
SPLITS = (("test", "test.jsonl"), ("validation", "validation.jsonl"), ("train", "train.jsonl"))


# Each task returns (question, assistant answer text, canonical answer string).

def _arithmetic(rng):
    templates = MATH_TEMPLATES["base"] + MATH_TEMPLATES["task"]
    question, restatement, steps = rng.choice(templates)(rng)
    answer = steps[-1][3]
    work = " ".join("%d %s %d = %d." % step for step in steps)
    return question, "%s %s The answer is %d." % (restatement, work, answer), str(answer)


def _reverse_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 6))
    answer = " ".join(reversed(words))
    return "Reverse the order of these words: %s" % " ".join(words), answer, answer


def _sort_numbers(rng):
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    answer = ", ".join(str(n) for n in sorted(numbers))
    return ("Sort these numbers from smallest to largest: %s" % ", ".join(str(n) for n in numbers), answer, answer)


def _count_capitals(rng):
    # Random letters upper-cased (each with probability 1/4), so the count has to be read off the text.
    words = rng.sample(WORDS, rng.randint(2, 4))
    text = " ".join("".join(c.upper() if rng.random() < 0.25 else c for c in w) for w in words)
    n = sum(c.isupper() for c in text)
    return ('How many capital letters are in "%s"?' % text,
            "There %s %d capital letter%s." % ("is" if n == 1 else "are", n, "" if n == 1 else "s"), str(n))


def _uppercase(rng):
    words = " ".join(rng.sample(WORDS, rng.randint(2, 5)))
    return "Write these words in capital letters: %s" % words, words.upper(), words.upper()


TASKS = {"arithmetic": _arithmetic, "reverse_words": _reverse_words, "sort_numbers": _sort_numbers,
         "count_capitals": _count_capitals, "uppercase": _uppercase}


def make_record(kind, question, reply, answer):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            "task": kind, "answer": answer}


def generate_instructions(n, seed=0, kinds=KINDS):
    """`n` records with distinct prompts; kinds alternate in the given order. Same arguments → same list."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in TASKS]
    if unknown or not kinds:
        raise UserError("--kinds %s: expected a comma-separated list of %s" % (",".join(kinds), ", ".join(KINDS)))
    rng = random.Random("instructions:%d" % seed)
    records, seen = [], set()
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(1000):
            question, reply, answer = TASKS[kind](rng)
            if question not in seen:  # distinct prompts keep the splits disjoint
                break
        else:
            raise UserError("task %s cannot produce %d distinct prompts with seed %d" % (kind, n, seed))
        seen.add(question)
        records.append(make_record(kind, question, reply, answer))
    return records


def generate_splits(n_train, n_val, n_test, seed=0, kinds=KINDS):
    """{"train": [...], "validation": [...], "test": [...]} with pairwise distinct prompts."""
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 0:
            raise UserError("--n_%s %r: expected a number >= 0" % ({"validation": "val"}.get(name, name), v))
    records = generate_instructions(n_train + n_val + n_test, seed, kinds)
    out, at = {}, 0
    for name, _ in SPLITS:  # test first: its records do not depend on n_train or n_val
        out[name] = records[at:at + sizes[name]]
        at += sizes[name]
    return out


# --------------------------------------------------------------------------------------------------- scoring

_INT = re.compile(r"-?\d+")


def _first_line(text):
    line = text.strip().split("\n", 1)[0].strip()
    return re.sub(r"\s+", " ", line).rstrip(".").strip()


def _arithmetic_value(text):
    # The stated result ("The answer is N") wins; a generation without it is judged by its last number.
    stated = re.findall(r"answer is\s*(-?\d+)", text)
    numbers = stated or _INT.findall(text)
    return numbers[-1] if numbers else None


def score_answer(record, generated_text):
    """True when `generated_text` (the assistant's reply, prompt excluded) answers `record` exactly.

    arithmetic: the number after the last "answer is" (else the last number) equals the answer;
    sort_numbers: the integers of the first line are the sorted list; count_capitals: the first integer is the
    count; reverse_words / uppercase: the first line equals the answer (spaces collapsed, final period ignored,
    case-sensitive).
    """
    kind, answer = record.get("task"), record.get("answer")
    if kind not in TASKS or not isinstance(answer, str):
        raise UserError("score_answer: record has task %r and answer %r (expected a record of "
                        "Dataset.instruction_generator)" % (kind, answer))
    if not isinstance(generated_text, str):
        return False
    if kind == "arithmetic":
        return _arithmetic_value(generated_text) == answer
    if kind == "sort_numbers":
        return _INT.findall(_first_line(generated_text)) == _INT.findall(answer)
    if kind == "count_capitals":
        found = _INT.findall(generated_text)
        return bool(found) and found[0] == answer
    return _first_line(generated_text) == answer


def prompt_messages(record):
    """The messages to generate from: the conversation without its final assistant turn."""
    return record["conversations"][:-1]


# --------------------------------------------------------------------------------------------------- files

def _write_jsonl(path, records):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_splits(out_dir, n_train, n_val, n_test, seed=0, kinds=KINDS):
    """Write train/validation/test jsonl files into `out_dir`; returns {file name: number of records}."""
    splits = generate_splits(n_train, n_val, n_test, seed, kinds)
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    for name, fname in SPLITS:
        _write_jsonl(os.path.join(out_dir, fname), splits[name])
        counts[fname] = len(splits[name])
    return counts


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m Dataset.instruction_generator",
                                description="Write generated instruction/answer conversations with checkable "
                                            "answers (train/validation/test jsonl).")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated task kinds (default: all)")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    counts = write_splits(a.out_dir, a.n_train, a.n_val, a.n_test, a.seed, kinds)
    print("wrote %s to %s (kinds %s, seed %d)" % (counts, a.out_dir, ",".join(kinds), a.seed))


if __name__ == "__main__":
    main()
