"""Pretraining and SFT data (issue 15 §4): packing, padding, the data protocol, the token cache, chat masking,
bad input, and the generated instruction set with its scorer."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from Dataset import pretrain_data
from Dataset.encoding import IGNORE_INDEX, PAD_ID
from Dataset.instruction_generator import KINDS, generate_splits, score_answer, write_splits
from Dataset.lm_batches import EvalLMData, LMData
from Dataset.pretrain_data import PretrainData, load_corpus, pretrain_eval_data
from Dataset.sft_data import SFTData, read_conversations, record_messages, sft_eval_data
from Utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
DOCS = ["The quick brown fox jumps over the lazy dog number %d." % i + " More words follow here." * (i % 5)
        for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    from Models.tokenizer import load_tokenizer
    return load_tokenizer(MINIMIND)


class Spy:
    """The real tokenizer, counting encode calls (to see whether a corpus was re-encoded)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def encode(self, s, bos, eos):
        self.calls += 1
        return self.inner.encode(s, bos, eos)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t, "source": "x"} for t in DOCS])


def stream_of(tok, texts):
    return np.concatenate([tok.encode(t, bos=True, eos=True) for t in texts]).astype(np.int32)


# ------------------------------------------------------------------------------------------------ pretraining

def test_packed_blocks_are_the_document_stream(tok, corpus):
    T = 15
    data = PretrainData(corpus, tok, T, batch_size=2, cache=False)
    stream = stream_of(tok, DOCS)
    assert (stream == tok.eos_id).sum() == (stream == tok.bos_id).sum() == len(DOCS)
    n_blocks = len(stream) // (T + 1)
    rows = [data.rows[j] for j in range(len(data.rows))]
    assert len(rows) == n_blocks and data.stats["dropped_tokens"] == len(stream) - n_blocks * (T + 1)
    assert np.array_equal(np.concatenate([ids for ids, _ in rows]), stream[:n_blocks * (T + 1)])
    for ids, labels in rows:  # labels are not pre-shifted: the model compares logits[:, :-1] with labels[:, 1:]
        assert np.array_equal(ids, labels) and len(ids) == T + 1
    assert len(data) == n_blocks // 2
    for i, b in data.batches(0):
        assert b["tokens"].shape == b["labels"].shape == b["token_mask"].shape == (2, T + 1)
        assert b["tokens"].dtype == b["labels"].dtype == np.int32 and b["token_mask"].dtype == bool
        assert b["token_mask"].all() and (b["labels"] != IGNORE_INDEX).all()


def test_padded_rows_are_truncated_documents_with_masked_padding(tok, corpus):
    T = 20
    data = PretrainData(corpus, tok, T, batch_size=4, mode="padded", cache=False)
    docs = [np.asarray(tok.encode(t, bos=True, eos=True), np.int32) for t in DOCS]
    assert len(data.rows) == len(DOCS)
    for j, d in enumerate(docs):
        ids, labels = data.rows[j]
        assert np.array_equal(ids, d[:T]) and np.array_equal(labels, ids) and ids[0] == tok.bos_id
    assert data.stats["truncated"] == sum(len(d) > T for d in docs)
    for _, b in data.batches(1):
        n = b["token_mask"].sum(1)
        for r in range(4):
            assert (b["labels"][r, n[r]:] == IGNORE_INDEX).all() and (b["tokens"][r, n[r]:] == PAD_ID).all()
            assert (b["labels"][r, :n[r]] == b["tokens"][r, :n[r]]).all() and b["token_mask"][r, :n[r]].all()
        assert b["tokens"].shape[1] == n.max() <= T  # padded to the micro-batch's longest row


def test_txt_source_is_one_document_per_paragraph(tok, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph\nstill first.\n\n\n  Second one.  \n\nThird.\n", encoding="utf-8")
    corpus = load_corpus(str(path), tok, cache=False)
    want = stream_of(tok, ["First paragraph\nstill first.", "Second one.", "Third."])
    assert np.array_equal(corpus.tokens, want) and len(corpus.offsets) == 4


def shards(make, world, epoch, i):
    return [make(r).indices(epoch, i) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shards_are_disjoint_and_cover_each_global_batch(tok, corpus, world):
    def make(r):
        return PretrainData(corpus, tok, 7, batch_size=2, data_seed=5, rank=r, world_size=world, cache=False)
    data = [make(r) for r in range(world)]
    assert len({len(d) for d in data}) == 1 and len(data[0]) == len(data[0].rows) // (2 * world)
    perm = data[0].permutation(3)
    for i in range(len(data[0])):
        got = np.concatenate([d.indices(3, i) for d in data])
        assert np.array_equal(got, perm[i * 2 * world:(i + 1) * 2 * world])
    for r, d in enumerate(data):  # the batches really hold this rank's rows
        i, b = next(d.batches(3, 1))
        assert i == 1 and np.array_equal(b["tokens"][0], d.rows[int(d.indices(3, 1)[0])][0])


def test_order_depends_on_seed_and_epoch_only_and_resume_is_exact(tok, corpus):
    a = PretrainData(corpus, tok, 7, batch_size=3, data_seed=1, cache=False)
    b = PretrainData(corpus, tok, 7, batch_size=3, data_seed=1, cache=False)
    assert np.array_equal(a.permutation(2), b.permutation(2))
    assert not np.array_equal(a.permutation(2), a.permutation(3))
    assert not np.array_equal(a.permutation(2), PretrainData(corpus, tok, 7, 3, data_seed=2, cache=False)
                              .permutation(2))
    full = list(a.batches(2))
    resumed = list(b.batches(2, start=4))
    assert [i for i, _ in resumed] == list(range(4, len(a)))
    for (i, x), (k, y) in zip(full[4:], resumed):
        assert i == k and all(np.array_equal(x[n], y[n]) for n in x)
    assert list(a.batches(2, start=len(a))) == []


def test_eval_shards_cover_every_row_once_and_keep_the_packed_tail(tok, corpus):
    stream = stream_of(tok, DOCS)
    T = 15
    evals = [pretrain_eval_data(corpus, tok, T, batch_size=2, rank=r, world_size=3, cache=False) for r in range(3)]
    assert sum(len(e.shard) for e in evals) == len(evals[0].rows) == -(-len(stream) // (T + 1))
    seen = []
    for e in evals:
        for batch, n in e.batches():
            assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            seen += [batch["tokens"][r, :batch["token_mask"][r].sum()] for r in range(len(batch["tokens"]))]
    assert sum(len(s) for s in seen) == len(stream)  # nothing dropped, the tail is a shorter row
    total = sum(n for e in evals for _, n in e.batches())
    assert total == len(stream) - len(evals[0].rows)  # every token but the first of each row is a target


def test_cache_is_reused_and_invalidated_by_a_changed_source(tok, corpus):
    first = Spy(tok)
    a = PretrainData(corpus, first, 15, batch_size=2)
    assert first.calls == len(DOCS) and not a.stats["from_cache"]
    second = Spy(tok)
    b = PretrainData(corpus, second, 31, batch_size=2, mode="padded", writer=False)  # other mode and length too
    assert second.calls == 0 and b.stats["from_cache"] and "(token cache)" in b.summary
    assert np.array_equal(np.asarray(load_corpus(corpus, second).tokens), stream_of(tok, DOCS))
    with open(corpus, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "A new document."}) + "\n")
    third = Spy(tok)
    c = PretrainData(corpus, third, 15, batch_size=2)
    assert third.calls == len(DOCS) + 1 and not c.stats["from_cache"]
    assert c.stats["tokens"] == a.stats["tokens"] + len(tok.encode("A new document.", True, True))


def test_non_writer_waits_for_the_writer_and_times_out_alone(tok, corpus, monkeypatch):
    monkeypatch.setattr(pretrain_data, "WAIT_POLL_SECONDS", 0.02)
    with pytest.raises(UserError, match="waited 0.2s for the writer"):
        load_corpus(corpus, Spy(tok), writer=False, wait_timeout=0.2)
    reader, got = Spy(tok), {}
    thread = threading.Thread(target=lambda: got.update(c=load_corpus(corpus, reader, writer=False, wait_timeout=60)))
    thread.start()
    load_corpus(corpus, Spy(tok), writer=True)  # same tokenizer identity (class included) as the reader's
    thread.join(60)
    assert reader.calls == 0 and got["c"].from_cache
    assert np.array_equal(np.asarray(got["c"].tokens), stream_of(tok, DOCS))


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', "", '{"text": "b"}'], r"corpus.jsonl: line 2: empty line"),
    (['{"text": "a"}', '{"text": "b"'], r"line 2: invalid JSON"),
    (['{"text": "a"}', '["text"]'], r"line 2: .*expected an object"),
    (['{"txt": "a"}'], r"line 1: field 'text' missing"),
    (['{"text": "a"}', '{"text": 3}'], r"line 2: field 'text' is int"),
    (['{"text": "a"}', '{"text": "  "}'], r"line 2: field 'text' is empty"),
    ([], r"no documents"),
])
def test_bad_pretraining_input_is_a_one_line_error(tok, tmp_path, lines, message):
    path = write_jsonl(tmp_path / "corpus.jsonl", lines)
    with pytest.raises(UserError, match=message) as e:
        PretrainData(path, tok, 8, batch_size=1, cache=False)
    assert "\n" not in str(e.value) and "corpus.jsonl" in str(e.value)


def test_trailing_blank_lines_are_harmless_and_too_small_corpora_are_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ['{"text": "a b c"}', "", ""])
    assert load_corpus(path, tok, cache=False).offsets.tolist() == [0, len(tok.encode("a b c", True, True))]
    with pytest.raises(UserError, match="do not fill one global micro-batch"):
        PretrainData(path, tok, 2, batch_size=8, cache=False)
    with pytest.raises(UserError, match="mode 'stacked'"):
        PretrainData(path, tok, 2, batch_size=1, mode="stacked", cache=False)
    with pytest.raises(UserError, match="file not found"):
        PretrainData(str(tmp_path / "missing.jsonl"), tok, 2, batch_size=1)


# ------------------------------------------------------------------------------------------------ SFT

CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6, of course."}]


def supervised_spans(ids, labels):
    """Runs of consecutive supervised positions, as token lists."""
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def test_minimind_format_trains_exactly_the_assistant_contents_and_end_of_turn(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CONV}])
    data = SFTData(path, tok, 512, batch_size=1)
    ids, labels = data.rows[0]
    assert ids.tolist() == tok.encode(tok.apply_chat_template(CONV), False, False)
    end = tok.encode("<|im_end|>", False, False)
    spans = supervised_spans(ids, labels)
    assert [tok.decode(s) for s in spans] == [m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant"]
    assert all(s[-1:] == end for s in spans)
    _, b = next(data.batches(0))
    assert b["labels"].dtype == np.int32 and b["token_mask"].all()


def test_instruction_format_with_input_and_history(tok, tmp_path):
    rec = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7",
           "history": [["Hi", "Hello!"], ["Ready?", "Yes."]]}
    want = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Ready?"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Add the numbers.\n3 and 4"}, {"role": "assistant", "content": "7"}]
    assert record_messages(rec, "x") == want
    assert record_messages({"instruction": "Q", "input": "", "output": "A"}, "x") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", [rec, {"conversations": want}])  # formats mix per line
    data = SFTData(path, tok, 512, batch_size=1)
    (a_ids, a_lab), (b_ids, b_lab) = data.rows
    assert np.array_equal(a_ids, b_ids) and np.array_equal(a_lab, b_lab)
    assert [tok.decode(s) for s in supervised_spans(a_ids, a_lab)] == ["Hello!<|im_end|>", "Yes.<|im_end|>",
                                                                       "7<|im_end|>"]


def test_truncation_keeps_the_start_and_conversations_with_nothing_left_are_skipped(tok, tmp_path):
    long_answer = {"conversations": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"conversations": [{"role": "user", "content": "word " * 200},
                                     {"role": "assistant", "content": "ok"}]}
    short = {"instruction": "Hi", "output": "ok"}
    path = write_jsonl(tmp_path / "sft.jsonl", [long_answer, long_prompt, short])
    data = SFTData(path, tok, 40, batch_size=1)
    assert data.stats == {"conversations": 3, "rows": 2, "truncated": 2, "skipped": 1, "skipped_lines": [2]}
    assert "1 skipped" in data.summary and "lines 2" in data.summary
    ids, labels = data.rows[0]
    full_ids, _ = tok.encode_chat(long_answer["conversations"])
    assert len(ids) == 40 and ids.tolist() == full_ids[:40] and (labels[-5:] != IGNORE_INDEX).all()
    only_long = write_jsonl(tmp_path / "long.jsonl", [long_prompt])
    with pytest.raises(UserError, match="none of the 1 conversations has an answer token within max_seq_len=40"):
        SFTData(only_long, tok, 40, batch_size=1)
    val = sft_eval_data(path, tok, 40, batch_size=2, rank=1, world_size=2)
    assert len(val) == 2 and len(val.shard) == 1


@pytest.mark.parametrize("line,message", [
    ('{"conversations": [{"role": "bot", "content": "x"}]}', r"line 2: conversations\[0\]\.role \"bot\" is not "
                                                             r"one of system, user, assistant"),
    ('{"conversations": [{"role": "user", "content": ["x"]}]}', r"line 2: conversations\[0\]\.content is an array"),
    ('{"conversations": [{"role": "user", "content": "x"}]}', r"line 2: field 'conversations' has no assistant"),
    ('{"conversations": []}', r"line 2: field 'conversations' is empty"),
    ('{"conversations": [{"role": "user"}]}', r"line 2: conversations\[0\]\.content missing"),
    ('{"instruction": "q"}', r"line 2: field 'output' missing"),
    ('{"instruction": "q", "output": 4}', r"line 2: field 'output' is a number"),
    ('{"instruction": "q", "output": "a", "history": [["q"]]}', r"line 2: field 'history'\[0\] is not a"),
    ('{"prompt": "q"}', r"line 2: neither field 'conversations'"),
    ('{"instruction": "q", "output": "a"', r"line 2: invalid JSON"),
    ('"just a string"', r"line 2: the record is a string"),
    ('', r"line 2: empty line"),
])
def test_bad_sft_input_is_a_one_line_error_with_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "sft.jsonl", ['{"instruction": "q", "output": "a"}', line,
                                                '{"instruction": "q", "output": "a"}'])
    with pytest.raises(UserError, match=message) as e:
        read_conversations(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(path)


# ------------------------------------------------------------------------------------------------ generator

def test_generator_is_deterministic_disjoint_and_balanced():
    a, b = generate_splits(50, 10, 10, seed=3), generate_splits(50, 10, 10, seed=3)
    assert a == b and a != generate_splits(50, 10, 10, seed=4)
    prompts = [r["conversations"][0]["content"] for s in a.values() for r in s]
    assert len(set(prompts)) == len(prompts) == 70
    assert {r["task"] for r in a["test"]} == set(KINDS)
    bigger = generate_splits(80, 10, 10, seed=3)  # more training data leaves the held-out sets unchanged
    assert bigger["test"] == a["test"] and bigger["validation"] == a["validation"]


def test_score_answer_accepts_the_reference_and_rejects_wrong_answers():
    recs = generate_splits(0, 0, 50, seed=0)["test"]
    for r in recs:
        assert score_answer(r, r["conversations"][-1]["content"]), r
    wrong = {"arithmetic": "The answer is 999.", "reverse_words": "apple", "sort_numbers": "1, 2",
             "count_capitals": "There are 99 capital letters.", "uppercase": "apple"}
    for r in recs:
        assert not score_answer(r, wrong[r["task"]]) and not score_answer(r, "")
    sort = next(r for r in recs if r["task"] == "sort_numbers")
    assert score_answer(sort, " %s.\nmore text 1 2 3" % sort["answer"])  # first line decides
    rev = next(r for r in recs if r["task"] == "reverse_words")
    assert not score_answer(rev, " ".join(reversed(rev["answer"].split())))


def test_generator_cli_writes_files_sft_data_reads(tok, tmp_path):
    out = tmp_path / "ins"
    r = subprocess.run([sys.executable, "-m", "Dataset.instruction_generator", "--out_dir", str(out), "--n_train",
                        "30", "--n_val", "5", "--n_test", "5", "--seed", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    write_splits(str(tmp_path / "again"), 30, 5, 5, seed=1)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    data = SFTData(str(out / "train.jsonl"), tok, 128, batch_size=4)
    assert data.stats["rows"] == 30 and data.stats["skipped"] == 0
    bad = subprocess.run([sys.executable, "-m", "Dataset.instruction_generator", "--out_dir", str(out),
                          "--kinds", "poetry"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "poetry" in bad.stderr


def test_lm_data_rejects_bad_shards():
    rows = [(np.arange(3), np.arange(3))] * 4
    with pytest.raises(ValueError):
        LMData(rows, 1, rank=2, world_size=2)
    with pytest.raises(ValueError):
        EvalLMData(rows, 0)
