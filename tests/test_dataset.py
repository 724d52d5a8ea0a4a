"""Tests for docs/moa.md §6 (prompts, records, encoding) and decisions D4, D5, D6."""
import glob
import json
import os

import numpy as np
import pytest

from Dataset import IGNORE_INDEX, encode_dataset, encode_example, format_prompt, load_records, pad_batch
from Dataset.encoding import encode_example_info
from Utils.errors import UserError

REC = {"instruction": "What is 2+2?", "input": "", "output": "\nA: 2 + 2 = 4. The answer is 4.", "answer": "4.0"}


def _math_files(shared_data):
    files = sorted(glob.glob(os.path.join(shared_data, "math", "*", "test.json")))
    assert len(files) == 6
    return files + [os.path.join(shared_data, "math_14k", "validation.json")]


# ---- templates (golden strings, no tokenizer) ----

def test_template_no_input_golden():
    assert format_prompt(REC) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:")


def test_template_with_input_golden():
    rec = dict(REC, input="x = {y}")  # braces in user text must not be treated as format fields
    assert format_prompt(rec) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nWhat is 2+2?"
        "\n\n### Input:\nx = {y}\n\n### Response:")


# ---- encoding ----

def test_no_input_ids_equal_joint_encoding_and_prompt_masked(tokenizer):
    ids, labels = encode_example(REC, tokenizer, 512)
    prompt = format_prompt(REC)
    assert ids == tokenizer.encode(prompt + REC["output"], bos=True, eos=True)  # D6: one string
    n = len(tokenizer.encode(prompt, bos=True, eos=False))
    assert len(labels) == len(ids)
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:]  # aligned, not shifted
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id


def test_colon_newline_merge_reproduced(tokenizer):
    ids, _ = encode_example(REC, tokenizer, 512)
    prompt_ids = tokenizer.encode(format_prompt(REC), bos=True, eos=False)
    colon_nl = tokenizer.encode(":\n", bos=False, eos=False)
    assert len(colon_nl) == 1
    k = len(prompt_ids) - 1
    assert prompt_ids[k] == tokenizer.encode(":", bos=False, eos=False)[0]
    assert ids[k] == colon_nl[0] and ids[:k] == prompt_ids[:k]


def test_token_zero_in_answer_is_supervised(tokenizer):
    rec = dict(REC, output="\nA: Wow! The answer is 4.")
    ids, labels = encode_example(rec, tokenizer, 512)
    bang = [t for t, l in enumerate(labels) if ids[t] == 0]
    assert bang and all(labels[t] == 0 for t in bang)  # D4: "!" (id 0) is a real target
    assert IGNORE_INDEX < 0  # cannot collide with a token id


def test_truncation_drops_answer_tail_and_keeps_mask(tokenizer):
    full_ids, full_labels = encode_example(REC, tokenizer, 512)
    n_prompt = full_labels.count(IGNORE_INDEX)
    L = n_prompt + 3
    enc = encode_example_info(REC, tokenizer, L)
    assert enc.input_ids == full_ids[:L] and enc.labels == full_labels[:L]
    assert enc.n_dropped == len(full_ids) - L and enc.n_prompt == n_prompt
    assert tokenizer.eos_id not in enc.input_ids


def test_truncation_inside_prompt_gives_unsupervised_row(tokenizer):
    enc = encode_example_info(REC, tokenizer, 5)
    assert len(enc.input_ids) == 5 and enc.input_ids[0] == tokenizer.bos_id
    assert enc.labels == [IGNORE_INDEX] * 5 and enc.n_dropped > 0


def test_input_case_pieces(tokenizer):
    rec = dict(REC, input="Numbers: 2 and 2")
    ids, labels = encode_example(rec, tokenizer, 512)
    head = format_prompt(rec).split("Numbers: 2 and 2")[0]
    expect_prompt = (tokenizer.encode(head, True, False) + tokenizer.encode(rec["input"], False, False)
                     + tokenizer.encode("\n\n### Response:", False, False))
    expect = expect_prompt + tokenizer.encode(rec["output"], False, True)
    assert ids == expect
    assert labels == [IGNORE_INDEX] * len(expect_prompt) + expect[len(expect_prompt):]


def test_input_case_truncates_input_first(tokenizer):
    rec = dict(REC, input="word " * 200)
    enc = encode_example_info(rec, tokenizer, 120)
    assert len(enc.input_ids) == 120 and enc.n_dropped > 0
    # the response header survived and at least one answer token is supervised
    resp = tokenizer.encode("\n\n### Response:", False, False)
    assert enc.input_ids[enc.n_prompt - len(resp):enc.n_prompt] == resp
    assert enc.labels[enc.n_prompt] != IGNORE_INDEX


def test_encode_dataset_counts_truncated_and_pad_batch(tokenizer):
    long_rec = dict(REC, output="\nA: " + "1 + 1 = 2. " * 40 + "The answer is 2.")
    examples, n_trunc = encode_dataset([REC, long_rec], tokenizer, 80)
    assert n_trunc == 1 and len(examples[1][0]) == 80
    x, y = pad_batch(examples)
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (2, 80)
    n0 = len(examples[0][0])
    assert (x[0, n0:] == 0).all() and (y[0, n0:] == IGNORE_INDEX).all()
    assert x[0, :n0].tolist() == examples[0][0] and y[0, :n0].tolist() == examples[0][1]
    assert pad_batch(examples, pad_to=96)[0].shape == (2, 96)
    with pytest.raises(ValueError):
        pad_batch(examples, pad_to=10)


def test_round_trip_and_encoding_on_shared_sets(tokenizer, shared_data):
    for path in _math_files(shared_data):
        for rec in load_records(path):
            text = format_prompt(rec) + rec["output"]
            ids = tokenizer.encode(text, bos=False, eos=False)
            assert tokenizer.decode(ids) == text, (path, rec["instruction"][:60])
            got, labels = encode_example(rec, tokenizer, 4096)
            assert got == [tokenizer.bos_id] + ids + [tokenizer.eos_id]
            assert len(labels) == len(got) and labels[-1] == tokenizer.eos_id


# ---- records validation ----

def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_load_json_array_and_jsonl(tmp_path):
    arr = _write(tmp_path, "a.json", json.dumps([REC, REC]))
    assert load_records(arr) == [REC, REC]
    jl = _write(tmp_path, "b.jsonl", json.dumps(REC) + "\n\n" + json.dumps(dict(REC, generate="4")) + "\n")
    recs = load_records(jl)
    assert len(recs) == 2 and recs[1]["generate"] == "4"


def test_output_optional_at_test_time(tmp_path):
    p = _write(tmp_path, "t.json", json.dumps([{"instruction": "q", "input": "", "answer": "1"}]))
    assert load_records(p, require_output=False)[0]["output"] == ""
    with pytest.raises(UserError, match=r"t\.json: record 0: field 'output' missing"):
        load_records(p)


@pytest.mark.parametrize("name,text,pattern", [
    ("corrupt.json", '[{"instruction": "q",\n "input": ""', r"corrupt\.json: invalid JSON at line 2"),
    ("corrupt.jsonl", json.dumps(REC) + "\n{bad\n", r"corrupt\.jsonl: invalid JSON at line 2"),
    ("missing.json", json.dumps([REC, {k: v for k, v in REC.items() if k != "output"}]),
     r"missing\.json: record 1: field 'output' missing \(expected a string\)"),
    ("number.json", json.dumps([REC, REC, dict(REC, answer=12)]),
     r"number\.json: record 2: field 'answer' is a number \(12\) \(expected a string\)"),
    ("notobj.jsonl", json.dumps(REC) + "\n[1, 2]\n", r"notobj\.jsonl: record 1 \(line 2\): is a JSON list"),
    ("empty.json", "[]", r"empty\.json: no records"),
    ("blank.jsonl", "\n\n", r"blank\.jsonl: no records"),
])
def test_bad_files_raise_one_line_user_error(tmp_path, name, text, pattern):
    p = _write(tmp_path, name, text)
    with pytest.raises(UserError, match=pattern) as exc:
        load_records(p, require_answer=True)
    assert "\n" not in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.json: file not found"):
        load_records(str(tmp_path / "nope.json"))


def test_shared_sets_load_strictly(shared_data):
    counts = {"AddSub": 395, "AQuA": 254, "gsm8k": 1319, "MultiArith": 600, "SingleEq": 508, "SVAMP": 1000,
              "math_14k": 486}                                         # data/README.md
    got = {os.path.basename(os.path.dirname(p)): len(load_records(p)) for p in _math_files(shared_data)}
    assert got == counts
    for path in _math_files(shared_data):
        recs = load_records(path, require_output=True, require_answer=True)
        assert recs and all(r["input"] == "" for r in recs)
