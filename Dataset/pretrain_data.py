"""Pretraining data: raw-text corpora read, tokenised once (cached on disk), and cut into packed or padded rows.

Sources (one file):
* jsonl, one object per line with a string field "text" (other fields, e.g. the "source" written by
  `python -m Dataset.text_corpus`, are ignored); a blank line between records, a line that is not a JSON object,
  a missing, non-string or empty "text" is a one-line `UserError` naming the file and the line;
* `.txt`: one document per paragraph (paragraphs are separated by blank lines).

Every document is encoded as bos + text + eos (bos/eos only if the tokenizer has them) and the documents are
concatenated in file order into one token stream. Two modes turn the stream into rows (see `Dataset.lm_batches`
for the row/batch conventions and the data protocol):

* `packed` (default): the stream is cut into consecutive blocks of max_seq_len + 1 tokens; the tail that does not
  fill a block is dropped (validation keeps it as one shorter row). Each row is tokens = labels = the block, i.e.
  labels are NOT pre-shifted: the model compares logits[:, :-1] with labels[:, 1:], so it reads block[:-1] and
  predicts block[1:] — max_seq_len targets per row, every one supervised, no padding, documents separated by
  eos/bos inside a block (attention crosses document boundaries, as in minimind/GPT-style packing). The rows are
  max_seq_len + 1 long; the last position's logits are not used. The first token of each block is never a target.
* `padded`: one document per row, truncated to max_seq_len tokens (the end is cut, so bos survives), right-padded
  per micro-batch with labels IGNORE_INDEX = -100 (not minimind's 0, which is a real token id).

Cache: the token stream of a source is written once as `<name>.<tokenizer hash>.tokens.npy` and `.offsets.npy`
(document boundaries) beside the source (or in `cache_dir`), plus a small `.json` key holding the source's size and
mtime and the tokenizer's identity (class, vocabulary size, special ids, sha256 of its files). The stream does not
depend on the mode or max_seq_len, so changing either reuses the cache. Only the process with `writer=True` (the
caller passes rank 0) encodes and writes — each file to a temporary name then `os.replace`, the key last —; the
others wait for a key that matches theirs (up to `wait_timeout` seconds) and memory-map the arrays.
"""
import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np

from Dataset.lm_batches import EvalLMData, LMData
from Utils.errors import UserError

MODES = ("packed", "padded")
CACHE_VERSION = 1
WAIT_POLL_SECONDS = 0.5

# tokens: int32 [N] (the stream); offsets: int64 [n_documents + 1], document d is tokens[offsets[d]:offsets[d+1]].
Corpus = namedtuple("Corpus", ["tokens", "offsets", "source", "from_cache"])


# ----------------------------------------------------------------------------------------------------- reading

def check_source(path, expected="a jsonl file of {\"text\": ...} lines or a .txt file"):
    if not os.path.exists(path):
        raise UserError("%s: file not found (expected %s)" % (path, expected))
    if os.path.isdir(path):
        raise UserError("%s: is a directory (expected %s)" % (path, expected))


def read_lines(path):
    """(line number, decoded line, bytes read so far); binary reading so only '\\n' ends a line (U+2028 in a
    JSON string stays inside its record) and progress can count bytes."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError("%s: line %d: not UTF-8 text (byte %d of the line)" % (path, lineno, e.start))
            if lineno == 1:
                line = line.lstrip("\ufeff")  # byte-order mark written by some editors
            yield lineno, line.rstrip("\r\n"), len(raw)


def _jsonl_texts(path):
    blank = None  # a blank line is an error only if a record follows it (trailing blank lines are harmless)
    for lineno, line, nbytes in read_lines(path):
        if not line.strip():
            blank = blank or lineno
            yield None, nbytes
            continue
        if blank:
            raise UserError("%s: line %d: empty line (expected one JSON object per line)" % (path, blank))
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("%s: line %d: invalid JSON at column %d: %s" % (path, lineno, e.colno, e.msg))
        if not isinstance(rec, dict):
            raise UserError("%s: line %d: a JSON %s, expected an object {\"text\": ...}" % (path, lineno,
                                                                                           type(rec).__name__))
        text = rec.get("text")
        if "text" not in rec:
            raise UserError("%s: line %d: field 'text' missing" % (path, lineno))
        if not isinstance(text, str):
            raise UserError("%s: line %d: field 'text' is %s, expected a string" % (path, lineno,
                                                                                   type(text).__name__))
        if not text.strip():
            raise UserError("%s: line %d: field 'text' is empty" % (path, lineno))
        yield text, nbytes


def _paragraphs(path):
    para = []
    for _, line, nbytes in read_lines(path):
        if line.strip():
            para.append(line)
            yield None, nbytes
        elif para:
            yield "\n".join(para).strip(), nbytes
            para = []
        else:
            yield None, nbytes
    if para:
        yield "\n".join(para).strip(), 0


def read_documents(path):
    """Yield (document text or None, bytes consumed) in file order; None entries only advance the progress."""
    check_source(path)
    return _paragraphs(path) if path.endswith(".txt") else _jsonl_texts(path)


def encode_documents(path, tokenizer, progress=True):
    """(tokens int32 [N], offsets int64 [D+1]) of the documents of `path`, each bos + text + eos."""
    from tqdm import tqdm

    chunks, offsets = [], [0]
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, disable=not progress,
              desc="tokenising %s" % os.path.basename(path)) as bar:
        for text, nbytes in read_documents(path):
            bar.update(nbytes)
            if text is None:
                continue
            ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32)
            chunks.append(ids)
            offsets.append(offsets[-1] + len(ids))
    if not chunks:
        raise UserError("%s: no documents (expected {\"text\": ...} lines, or paragraphs in a .txt file)" % path)
    return np.concatenate(chunks), np.asarray(offsets, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------- cache

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tokenizer):
    """What decides the ids a tokenizer gives: class, vocabulary size, special ids and the sha256 of its files
    (for a tokenizer.json also of the tokenizer_config.json beside it, whose added tokens change ids)."""
    ident = {"class": type(tokenizer).__name__, "n_words": int(getattr(tokenizer, "n_words", -1)),
             "bos_id": int(getattr(tokenizer, "bos_id", -1)), "eos_id": int(getattr(tokenizer, "eos_id", -1))}
    path = getattr(tokenizer, "model_path", None)
    if isinstance(path, str) and os.path.isfile(path):
        ident["sha256"] = _sha256(path)
        config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(config):
            ident["config_sha256"] = _sha256(config)
    return ident


def cache_paths(path, tokenizer_ident, cache_dir=None):
    """{"tokens", "offsets", "key"} file paths of the cache of `path` for one tokenizer."""
    tag = hashlib.sha256(json.dumps(tokenizer_ident, sort_keys=True).encode()).hexdigest()[:12]
    base = os.path.join(cache_dir or os.path.dirname(os.path.abspath(path)), "%s.%s" % (os.path.basename(path), tag))
    return {"tokens": base + ".tokens.npy", "offsets": base + ".offsets.npy", "key": base + ".json"}


def cache_key(path, tokenizer_ident):
    st = os.stat(path)
    return {"version": CACHE_VERSION, "source": os.path.abspath(path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "tokenizer": tokenizer_ident,
            "contents": "documents as bos + text + eos, concatenated in file order"}


def _read_key(key_path):
    try:
        with open(key_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent or being replaced: treated as "no cache yet"


def _load_cached(paths, key):
    saved = _read_key(paths["key"])
    if not saved or saved.get("key") != key:
        return None
    try:
        tokens = np.load(paths["tokens"], mmap_mode="r")
        offsets = np.load(paths["offsets"])
    except (OSError, ValueError):
        return None
    if len(tokens) != saved.get("n_tokens") or len(offsets) != saved.get("n_documents", -2) + 1:
        return None
    return tokens, offsets


def _atomic_save(path, write, mode):
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; the cache is exactly as readable as its source
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_cache(paths, key, tokens, offsets):
    directory = os.path.dirname(paths["key"])
    mode = stat.S_IMODE(os.stat(key["source"]).st_mode) & 0o666
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(paths["key"]):
            os.remove(paths["key"])  # a stale key must never describe the arrays being replaced
        _atomic_save(paths["tokens"], lambda f: np.save(f, tokens), mode)
        _atomic_save(paths["offsets"], lambda f: np.save(f, offsets), mode)
        meta = {"key": key, "n_tokens": int(len(tokens)), "n_documents": int(len(offsets) - 1)}
        _atomic_save(paths["key"], lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")), mode)
    except OSError as e:
        raise UserError("%s: cannot write the token cache (%s); pass another cache_dir" % (directory, e.strerror))


def load_corpus(path, tokenizer, cache=True, cache_dir=None, writer=True, wait_timeout=3600.0, progress=True):
    """The `Corpus` of `path`: from the cache when its key matches, else encoded (and cached by the writer).

    With cache=False every process encodes for itself and nothing is written.
    """
    check_source(path)
    if not cache:
        tokens, offsets = encode_documents(path, tokenizer, progress and writer)
        return Corpus(tokens, offsets, path, False)
    ident = tokenizer_identity(tokenizer)
    paths, key = cache_paths(path, ident, cache_dir), cache_key(path, ident)
    found = _load_cached(paths, key)
    if found is None and not writer:
        began = time.monotonic()
        told = False
        while found is None:
            waited = time.monotonic() - began
            if waited > wait_timeout:
                raise UserError("%s: waited %gs for the writer (rank 0) to write the token cache %s"
                                % (path, wait_timeout, paths["key"]))
            if waited > 10 and not told:  # say why this process is idle while the writer encodes
                print("waiting for the writer (rank 0) to tokenise %s" % path, file=sys.stderr, flush=True)
                told = True
            time.sleep(WAIT_POLL_SECONDS)
            found = _load_cached(paths, key)
    if found is not None:
        return Corpus(found[0], found[1], path, True)
    tokens, offsets = encode_documents(path, tokenizer, progress)
    _write_cache(paths, key, tokens, offsets)
    return Corpus(tokens, offsets, path, False)


def split_corpus(corpus, val_fraction):
    """(training Corpus, validation Corpus): the last ceil(val_fraction · D) documents in file order are held out,
    whole (no document is cut between the two), at least one on each side. Both are views of the stream (no copy),
    so the split is the same on every rank and for every mode / max_seq_len."""
    n_docs = len(corpus.offsets) - 1
    n_val = int(np.ceil(val_fraction * n_docs))
    if not 0.0 < val_fraction < 1.0 or n_val >= n_docs:
        raise UserError("%s: --val_split %g of %d documents leaves no training document"
                        % (corpus.source, val_fraction, n_docs))
    k = n_docs - n_val
    cut = int(corpus.offsets[k])
    train = Corpus(corpus.tokens[:cut], corpus.offsets[:k + 1], corpus.source, corpus.from_cache)
    val = Corpus(corpus.tokens[cut:], corpus.offsets[k:] - cut, corpus.source, corpus.from_cache)
    return train, val


# ----------------------------------------------------------------------------------------------------- rows

class StreamRows:
    """Rows as (start, length) windows of the token stream; labels are the ids themselves (all supervised)."""

    def __init__(self, tokens, starts, lengths):
        self.tokens, self.starts, self.lengths = tokens, starts, lengths

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, j):
        s = int(self.starts[j])
        ids = np.asarray(self.tokens[s:s + int(self.lengths[j])], dtype=np.int32)
        return ids, ids


def corpus_rows(corpus, max_seq_len, mode="packed", keep_tail=False):
    """(StreamRows, stats dict) of a corpus in `mode`; keep_tail keeps the packed remainder as a shorter row."""
    if mode not in MODES:
        raise UserError("pretraining mode %r: expected one of %s" % (mode, ", ".join(MODES)))
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise UserError("max_seq_len %r: expected a positive integer" % (max_seq_len,))
    n = len(corpus.tokens)
    stats = {"mode": mode, "documents": len(corpus.offsets) - 1, "tokens": n, "from_cache": corpus.from_cache}
    if mode == "packed":
        block = max_seq_len + 1
        n_blocks = n // block
        starts, lengths = np.arange(n_blocks, dtype=np.int64) * block, np.full(n_blocks, block, np.int64)
        tail = n - n_blocks * block
        if keep_tail and tail >= 2:  # one token alone has no target
            starts, lengths = np.append(starts, n_blocks * block), np.append(lengths, tail)
            tail = 0
        stats.update(rows=len(starts), dropped_tokens=int(tail))
    else:
        doc_len = np.diff(corpus.offsets)
        keep = doc_len >= 2  # a one-token document (no bos/eos tokenizer) has nothing to predict
        starts, lengths = corpus.offsets[:-1][keep], np.minimum(doc_len[keep], max_seq_len)
        stats.update(rows=len(starts), truncated=int((doc_len[keep] > max_seq_len).sum()),
                     skipped=int((~keep).sum()), dropped_tokens=int(doc_len.sum() - lengths.sum()))
    return StreamRows(corpus.tokens, starts, lengths), stats


def describe(path, stats, max_seq_len):
    """One line for the log: documents, tokens, rows, what was cut."""
    head = "%s: %d documents, %d tokens%s" % (path, stats["documents"], stats["tokens"],
                                              " (token cache)" if stats["from_cache"] else "")
    if stats["mode"] == "packed":
        return "%s -> %d packed rows of %d tokens (%d tail tokens dropped)" % (
            head, stats["rows"], max_seq_len + 1, stats["dropped_tokens"])
    return "%s -> %d padded rows of <= %d tokens (%d truncated, %d tokens cut)" % (
        head, stats["rows"], max_seq_len, stats["truncated"], stats["dropped_tokens"])


def _eos_check(tokenizer, mode):
    if mode == "packed" and getattr(tokenizer, "eos_id", -1) < 0:
        raise UserError("packed pretraining needs an end-of-text token between documents, and this tokenizer has "
                        "no eos token; use mode 'padded' or a tokenizer with eos")


class PretrainData(LMData):
    """Training rows of one pretraining corpus, served by the data protocol (`Dataset.lm_batches.LMData`).

    `writer` defaults to rank == 0. `stats` and `summary` say what the corpus gave (log them on rank 0).
    """

    def __init__(self, path, tokenizer, max_seq_len, batch_size, mode="packed", data_seed=0, rank=0, world_size=1,
                 cache=True, cache_dir=None, writer=None, wait_timeout=3600.0, progress=True):
        _eos_check(tokenizer, mode)
        writer = rank == 0 if writer is None else writer
        corpus = load_corpus(path, tokenizer, cache, cache_dir, writer, wait_timeout, progress)
        rows, self.stats = corpus_rows(corpus, max_seq_len, mode)
        super().__init__(rows, batch_size, data_seed, rank, world_size)
        self.mode, self.max_seq_len = mode, max_seq_len
        self.summary = describe(path, self.stats, max_seq_len)
        if len(self) == 0:
            raise UserError("%s: %d %s rows do not fill one global micro-batch of batch_size x world_size = %d x %d"
                            % (path, len(rows), mode, batch_size, world_size))


def pretrain_eval_data(path, tokenizer, max_seq_len, batch_size, mode="packed", rank=0, world_size=1, cache=True,
                       cache_dir=None, writer=None, wait_timeout=3600.0, progress=True):
    """Validation `EvalLMData` of a corpus; nothing is dropped (the packed tail becomes one shorter row)."""
    _eos_check(tokenizer, mode)
    writer = rank == 0 if writer is None else writer
    corpus = load_corpus(path, tokenizer, cache, cache_dir, writer, wait_timeout, progress)
    rows, stats = corpus_rows(corpus, max_seq_len, mode, keep_tail=True)
    data = EvalLMData(rows, batch_size, rank, world_size)
    data.stats, data.summary = stats, describe(path, stats, max_seq_len)
    return data
