"""Tests for the synthetic arithmetic generator (our own demo data in the docs/moa.md §6.1 record format)."""
import json
import re
import subprocess
import sys

import pytest

from Dataset import generate_math_dataset, load_records, write_splits
from Dataset.math_generator import main
from Utils.errors import UserError
from Utils.evaluate import extract_answer, is_correct

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


@pytest.mark.parametrize("family", ["base", "task"])
def test_records_are_consistent(family):
    recs = generate_math_dataset(500, family, seed=3)
    assert len({r["instruction"] for r in recs}) == 500
    for r in recs:
        assert set(r) == {"instruction", "input", "output", "answer"} and r["input"] == ""
        assert r["output"].startswith(" ") and not r["output"].startswith("  ")
        m = re.search(r"The answer is (\d+)\.$", r["output"])
        assert m and r["answer"] == str(float(int(m.group(1))))
        assert is_correct("gsm8k", extract_answer("gsm8k", r["output"]), r["answer"])
        steps = STEP.findall(r["output"])
        assert steps and int(steps[-1][3]) == int(m.group(1))
        for a, op, b, c in steps:
            assert OPS[op](int(a), int(b)) == int(c), r["output"]
            assert 0 <= int(c) < 1000
        assert len(r["instruction"]) < 160
        ops = {s[1] for s in steps}
        if family == "base":
            assert len(steps) == 1 and ops <= {"+", "-"}
        else:
            assert ops & {"*", "/"}


def test_families_use_different_templates():
    def skeleton(q):
        return re.sub(r"\d+", "N", q.split(" ", 1)[1])
    base = {skeleton(r["instruction"]) for r in generate_math_dataset(300, "base", 0)}
    task = {skeleton(r["instruction"]) for r in generate_math_dataset(300, "task", 0)}
    assert not base & task


def test_deterministic_and_seed_dependent():
    assert generate_math_dataset(50, "task", 7) == generate_math_dataset(50, "task", 7)
    assert generate_math_dataset(50, "task", 7) != generate_math_dataset(50, "task", 8)
    with pytest.raises(UserError, match="unknown math family"):
        generate_math_dataset(5, "algebra", 0)


def test_write_splits_disjoint_and_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    counts = write_splits(str(a), "task", 120, 30, 40, seed=1)
    write_splits(str(b), "task", 120, 30, 40, seed=1)
    assert counts == {"train.json": 120, "validation.json": 30, "test.json": 40}
    questions = []
    for name, n in counts.items():
        assert (a / name).read_bytes() == (b / name).read_bytes()
        recs = load_records(str(a / name), require_answer=True)
        assert len(recs) == n
        questions.append({r["instruction"] for r in recs})
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    assert sorted(p.name for p in a.iterdir()) == ["test.json", "train.json", "validation.json"]


def test_cli(tmp_path, capsys):
    main(["--out_dir", str(tmp_path), "--family", "base", "--n_train", "5", "--n_val", "2", "--n_test", "3"])
    assert len(json.loads((tmp_path / "test.json").read_text())) == 3
    assert "wrote" in capsys.readouterr().out


def test_cli_module_entry(tmp_path):
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    subprocess.run([sys.executable, "-m", "Dataset.math_generator", "--out_dir", str(tmp_path), "--n_train",
                    "4", "--n_val", "1", "--n_test", "1", "--seed", "0"], cwd=root, check=True,
                   capture_output=True)
    assert len(json.loads((tmp_path / "train.json").read_text())) == 4


def test_prompt_tokens_are_a_prefix_of_the_training_example(tokenizer):
    """Training tokenises prompt + output as one string (docs/moa.md §6.3, D6); for the generated data the prompt's
    tokens must come out unchanged, so a trained model sees at inference the same prompt end as in training."""
    from Dataset import encode_example, format_prompt
    for family in ("base", "task"):
        for r in generate_math_dataset(50, family, seed=0):
            prompt = tokenizer.encode(format_prompt(r), bos=True, eos=False)
            ids, labels = encode_example(r, tokenizer, 256)
            assert ids[:len(prompt)] == prompt
            assert labels[len(prompt) - 1] < 0 and labels[len(prompt)] == ids[len(prompt)]
