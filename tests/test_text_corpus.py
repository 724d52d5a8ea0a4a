"""The standard-library docstring corpus: deterministic, clean, non-empty documents, disjoint stable split."""
import json
import os
import subprocess
import sys

from Dataset.text_corpus import build_corpus, clean_docstring

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "Dataset.text_corpus"] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_cli_output_is_deterministic(tmp_path):
    outs = []
    for k in range(2):
        r = run_cli("--out", tmp_path / ("c%d.jsonl" % k), "--max_docs", 150, "--val_percent", 20)
        assert r.returncode == 0, r.stderr
        assert "150 documents" in r.stdout and "characters" in r.stdout
        outs.append([(tmp_path / ("c%d.%s.jsonl" % (k, split))).read_bytes() for split in ("train", "validation")])
    assert outs[0] == outs[1]


def test_documents_are_clean_unique_and_split_disjointly(tmp_path):
    s = build_corpus(str(tmp_path / "c.jsonl"), max_docs=300, min_chars=120, val_percent=20)
    train, val = read(s["train_path"]), read(s["validation_path"])
    assert len(train) + len(val) == s["documents"] == 300 and train and val
    texts = [d["text"] for d in train + val]
    assert len(set(texts)) == len(texts)  # deduplicated, hence train and validation are disjoint
    assert not {d["text"] for d in train} & {d["text"] for d in val}
    for d in train + val:
        assert len(d["text"]) >= 120 and d["text"] == d["text"].strip()
        assert not any(line.lstrip().startswith(">>>") for line in d["text"].splitlines())
        assert d["source"].split(":")[0].endswith(".py") and "/test/" not in "/" + d["source"]
    assert s["chars"] == sum(len(t) for t in texts)
    # the split depends on the text only: a larger corpus puts the same documents in the same files
    s2 = build_corpus(str(tmp_path / "d.jsonl"), max_docs=600, min_chars=120, val_percent=20)
    val2 = {d["text"] for d in read(s2["validation_path"])}
    train2 = {d["text"] for d in read(s2["train_path"])}
    assert {d["text"] for d in val} <= val2 and {d["text"] for d in train} <= train2


def test_cleaning_and_file_selection_on_a_small_tree(tmp_path):
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    long = "A long explanation of what the function does. " * 5
    (lib / "pkg" / "mod.py").write_text(
        '"""Module doc.\n\n' + long + '\n\n>>> example(1)\n2\n\nAfter the example.\n"""\n'
        "class Outer:\n"
        '    """' + long + '"""\n'
        "    def method(self):\n"
        '        """    Indented first line.\n\n        ' + long + '\n        """\n'
        "def copy_one():\n"
        '    """' + long + '"""\n'
        "def short():\n"
        '    """Too short."""\n')
    (lib / "test" / "test_x.py").write_text('"""' + long + 'in test dir"""\n')
    (lib / "test_y.py").write_text('"""' + long + 'test file"""\n')
    (lib / "py2.py").write_text('print "hello"\n')
    s = build_corpus(str(tmp_path / "o.jsonl"), min_chars=100, val_percent=0, root=str(lib))
    docs = read(s["train_path"])
    assert [d["source"] for d in docs] == ["pkg/mod.py", "pkg/mod.py:Outer", "pkg/mod.py:Outer.method"]
    assert docs[0]["text"] == "Module doc.\n\n" + long.rstrip() + "\n\nAfter the example."
    assert docs[2]["text"].startswith("Indented first line.\n\nA long")
    assert (s["files"], s["skipped_files"], read(s["validation_path"])) == (1, 1, [])


def test_clean_docstring_rules():
    assert clean_docstring("Text.\n\n\n\n>>> x = 1\n>>> x\n1\n\nMore.   \n\n") == "Text.\n\nMore."
    assert clean_docstring(">>> only()\nan example") == ""


def test_bad_flags_are_one_line_errors(tmp_path):
    for flags, message in ((["--min_chars", 0], "--min_chars 0"), (["--max_docs", 0], "--max_docs 0"),
                           (["--stdlib", tmp_path / "none"], "not a directory")):
        r = run_cli("--out", tmp_path / "c.jsonl", *flags)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
