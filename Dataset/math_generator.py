"""Synthetic arithmetic word problems in the LLM-Adapters record format (docs/moa.md §6.1), for tiny-model demos.

Not part of the paper: our own deterministic generator, so a demo can pre-train a tiny base model on one
family ("base": one-step addition/subtraction, in sentences that already use most of the task's words) and
fine-tune adapters on an unseen one ("task": new sentence templates, multiplication, exact division and two-step
problems). Numbers stay small (sums and differences of numbers up to 40, products of one-digit numbers) so
a tiny model can learn the arithmetic itself, not only the sentence patterns.
"""
import argparse
import json
import os
import random
import tempfile

from Utils.errors import UserError, cli_main

PEOPLE = [("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Mia", "she"),
          ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Ella", "she")]
OBJECTS = ["apples", "pens", "books", "cards", "eggs", "stickers", "marbles", "cookies", "balls", "shells",
           "stamps", "flowers"]
PLACES = ["shop", "bakery", "school", "farm", "library", "market"]
FAMILIES = ("base", "task")


def _pick(rng):
    """A person, a second person (different), an object and a place."""
    (name, he), (other, _) = rng.sample(PEOPLE, 2)
    return name, he, other, rng.choice(OBJECTS), rng.choice(PLACES)


# Each template returns (question, restatement, [(a, op, b, result), ...]); the last result is the answer.
# The rationale spells out every step so a small model can learn the computation, not just the answer.

def _buy_more(rng):
    name, he, _, obj, _ = _pick(rng)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return ("%s has %d %s. %s buys %d more. How many %s does %s have now?" % (name, a, obj, he.capitalize(),
            b, obj, name), "%s has %d %s and buys %d more." % (name, a, obj, b), [(a, "+", b, a + b)])


def _give_away(rng):
    name, he, other, obj, _ = _pick(rng)
    a = rng.randint(2, 40)
    b = rng.randint(1, a - 1)
    return ("%s has %d %s. %s gives %d to %s. How many %s does %s have left?" % (name, a, obj, he.capitalize(),
            b, other, obj, name), "%s has %d %s and gives away %d." % (name, a, obj, b), [(a, "-", b, a - b)])


def _shop_sells(rng):
    _, _, _, obj, place = _pick(rng)
    a = rng.randint(5, 40)
    b = rng.randint(1, a - 1)
    return ("A %s has %d %s. It sells %d of them. How many %s are left?" % (place, a, obj, b, obj),
            "The %s had %d %s and sold %d." % (place, a, obj, b), [(a, "-", b, a - b)])


def _together(rng):
    name, _, other, obj, _ = _pick(rng)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return ("%s has %d %s and %s has %d %s. How many %s do they have together?" % (name, a, obj, other, b, obj,
            obj), "%s has %d and %s has %d." % (name, a, other, b), [(a, "+", b, a + b)])


def _earn_and_spend(rng):
    name, _, _, _, _ = _pick(rng)
    a = rng.randint(3, 40)
    b = rng.randint(1, a - 1)
    return ("%s earns %d dollars and spends %d dollars. How many dollars does %s have left?" % (name, a, b, name),
            "%s earns %d dollars and spends %d." % (name, a, b), [(a, "-", b, a - b)])


def _bag_and_find(rng):
    name, _, _, obj, _ = _pick(rng)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return ("%s puts %d %s into a bag and finds %d more. How many %s are in the bag now?" % (name, a, obj, b, obj),
            "%s puts %d %s into a bag and finds %d more." % (name, a, obj, b), [(a, "+", b, a + b)])


def _share_some(rng):
    name, _, _, obj, _ = _pick(rng)
    a = rng.randint(3, 40)
    b = rng.randint(1, a - 1)
    return ("%s has %d %s and shares %d of them with friends. How many %s does %s have left?" % (name, a, obj, b,
            obj, name), "%s has %d %s and shares %d." % (name, a, obj, b), [(a, "-", b, a - b)])


def _boxes_arrive(rng):
    _, _, _, obj, place = _pick(rng)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return ("A %s has %d boxes of %s. It gets %d more boxes. How many boxes does it have now?" % (place, a, obj, b),
            "The %s had %d boxes and got %d more." % (place, a, b), [(a, "+", b, a + b)])


def _groups(rng):
    name, _, _, obj, _ = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return ("%s buys %d bags with %d %s in each bag. How many %s does %s buy?" % (name, a, b, obj, obj, name),
            "%d bags with %d %s each." % (a, b, obj), [(a, "*", b, a * b)])


def _share(rng):
    name, _, _, obj, _ = _pick(rng)
    b, q = rng.randint(2, 9), rng.randint(2, 9)
    a = b * q  # built from the quotient so the division is exact
    return ("%s shares %d %s equally among %d friends. How many %s does each friend get?" % (name, a, obj, b,
            obj), "%d %s are shared by %d friends." % (a, obj, b), [(a, "/", b, q)])


def _boxes_then_sell(rng):
    _, _, _, obj, place = _pick(rng)
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    c = rng.randint(1, a * b - 1)
    return ("A %s gets %d boxes of %s with %d in each box. It sells %d %s. How many %s are left?" % (place, a,
            obj, b, c, obj, obj), "The %s got %d boxes of %d and sold %d." % (place, a, b, c),
            [(a, "*", b, a * b), (a * b, "-", c, a * b - c)])


def _buy_then_split(rng):
    name, he, _, obj, _ = _pick(rng)
    c, q = rng.randint(2, 5), rng.randint(2, 8)
    a = rng.randint(1, c * q - 1)
    b = c * q - a  # the sum is a multiple of c so the split is exact
    return ("%s has %d %s and finds %d more. %s puts them equally into %d bags. How many %s are in each bag?"
            % (name, a, obj, b, he.capitalize(), c, obj), "%s has %d %s and finds %d more." % (name, a, obj, b),
            [(a, "+", b, a + b), (a + b, "/", c, q)])


def _earn_then_spend(rng):
    name, _, _, _, _ = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 4)
    c = rng.randint(2, a * b - 1)
    return ("%s earns %d dollars a day for %d days and spends %d dollars. How many dollars does %s have left?"
            % (name, a, b, c, name), "%s earns %d dollars for %d days and spends %d." % (name, a, b, c),
            [(a, "*", b, a * b), (a * b, "-", c, a * b - c)])


TEMPLATES = {
    "base": [_buy_more, _give_away, _shop_sells, _together, _earn_and_spend, _bag_and_find, _share_some,
             _boxes_arrive],
    "task": [_groups, _share, _boxes_then_sell, _buy_then_split, _earn_then_spend],
}


def _record(question, restatement, steps):
    answer = steps[-1][3]
    work = " ".join("%d %s %d = %d." % step for step in steps)
    return {"instruction": question, "input": "",
            # A leading space, not "\n": tiktoken would merge the prompt's final ":" with a newline into one token
            # (":\n", docs/moa.md §6.3), so the answer's first token would follow a prompt end never seen at inference.
            "output": " %s %s The answer is %d." % (restatement, work, answer),
            "answer": str(float(answer))}  # "12.0", the form the shared numeric test sets use


def generate_math_dataset(n, family, seed):
    """`n` records with distinct questions; the same (n, family, seed) always gives the same list."""
    if family not in TEMPLATES:
        raise UserError("unknown math family %r (expected one of %s)" % (family, ", ".join(FAMILIES)))
    rng = random.Random("%s:%d" % (family, seed))  # a string seed is stable across Python versions
    templates = TEMPLATES[family]
    records, seen, tries = [], set(), 0
    while len(records) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise UserError("family %r cannot produce %d distinct questions" % (family, n))
        rec = _record(*rng.choice(templates)(rng))
        if rec["instruction"] not in seen:  # distinct questions make disjoint splits possible
            seen.add(rec["instruction"])
            records.append(rec)
    return records


def _atomic_write_json(path, data):
    # Temp file in the same directory then os.replace, so a reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_splits(out_dir, family, n_train, n_val, n_test, seed):
    """Write train.json, validation.json and test.json (JSON arrays) with pairwise distinct questions."""
    for flag, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if v < 0:
            raise UserError("--%s must be >= 0, got %d" % (flag, v))
    records = generate_math_dataset(n_train + n_val + n_test, family, seed)
    os.makedirs(out_dir, exist_ok=True)
    splits = {"train.json": records[:n_train], "validation.json": records[n_train:n_train + n_val],
              "test.json": records[n_train + n_val:]}
    for fname, recs in splits.items():
        _atomic_write_json(os.path.join(out_dir, fname), recs)
    return {fname: len(recs) for fname, recs in splits.items()}


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(description="Write synthetic arithmetic word problems (train/validation/test).")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--family", choices=FAMILIES, default="task")
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = write_splits(a.out_dir, a.family, a.n_train, a.n_val, a.n_test, a.seed)
    print("wrote %s to %s (family %s, seed %d)" % (counts, a.out_dir, a.family, a.seed))


if __name__ == "__main__":
    main()
