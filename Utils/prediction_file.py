"""The predictions file of inference.py: `<set>.jsonl`, one record per line in data order, fsync'ed after every batch
and resumable — a partial last line (a kill mid-write) is dropped, and results that arrive ahead of the in-order
prefix (other ranks' shards, or code programs that finish out of order) wait in `<set>.jsonl.pending`."""
import json
import os

import numpy as np

from Utils.errors import UserError

PENDING_SUFFIX = ".pending"
MATH_FIELDS = ("instruction", "input", "output", "answer", "generate", "pred", "correct")


def read_lines(path):
    """Complete JSON lines of a file and the byte length they take; a partial (killed) last line is left out."""
    if not os.path.isfile(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    out, offset = [], 0
    for raw in data.splitlines(keepends=True):
        if not raw.endswith(b"\n"):
            break  # the line a kill interrupted
        try:
            out.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if offset + len(raw) == len(data):
                break
            raise UserError("%s: line %d is not valid JSON; delete the file or choose another --save_path"
                            % (path, len(out) + 1))
        offset += len(raw)
    return out, offset


def same_math_record(rec, saved):
    return isinstance(saved, dict) and saved.get("instruction") == rec["instruction"] \
        and saved.get("input", "") == rec["input"]


class PredictionWriter:
    """Rank 0's view of `<set>.jsonl`: the in-order prefix of finished records, plus early results kept pending.

    `records` are the set's records in data order; `same(record, saved line)` says whether a saved line belongs to
    a record (so a file written for other data is refused); `fields` are the keys kept from a pending line."""

    def __init__(self, path, records, same=same_math_record, fields=MATH_FIELDS):
        self.path = path
        self.pending_path = path + PENDING_SUFFIX
        saved, size = read_lines(path)
        for i, s in enumerate(saved):
            if i >= len(records) or not same(records[i], s):
                raise UserError("%s: line %d does not match record %d of the data; it was written for other data "
                                "(delete it or choose another --save_path)" % (path, i + 1, i))
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        if os.path.isfile(path) and size != os.path.getsize(path):
            with open(path, "r+b") as f:
                f.truncate(size)
        self.done = len(saved)
        self.pending = {}
        for s in read_lines(self.pending_path)[0]:
            i = s.get("index") if isinstance(s, dict) else None
            if isinstance(i, int) and self.done <= i < len(records) and same(records[i], s):
                self.pending[i] = {k: s[k] for k in fields if k in s}
        if not self.pending and os.path.exists(self.pending_path):
            os.remove(self.pending_path)

    def completed(self, n):
        mask = np.zeros(n, dtype=np.int32)
        mask[:min(self.done, n)] = 1
        for i in self.pending:
            mask[i] = 1
        return mask

    def add(self, results):
        """results: {record index: output record}. Appends what extends the in-order prefix, parks the rest."""
        self.pending.update(results)
        lines = []
        while self.done in self.pending:
            lines.append(json.dumps(self.pending.pop(self.done), ensure_ascii=False) + "\n")
            self.done += 1
        _append(self.path, lines)
        early = [dict(index=i, **results[i]) for i in sorted(results) if i in self.pending]
        if early:
            _append(self.pending_path, [json.dumps(r, ensure_ascii=False) + "\n" for r in early])
        if not self.pending and os.path.exists(self.pending_path):
            os.remove(self.pending_path)


def _append(path, lines):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def write_predictions(path, records):
    """A whole predictions file at once, in the format above (one JSON line per record, in order): written to a
    temporary name in the same directory, fsync'ed and renamed, so a reader or a kill never leaves half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
