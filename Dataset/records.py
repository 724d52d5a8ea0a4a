"""Loading and validating instruction records {instruction, input, output, answer} (docs/moa.md §6.1)."""
import json
import os

from Utils.errors import UserError

FIELDS = ("instruction", "input", "output", "answer")


def _read_text(path):
    if not os.path.exists(path):
        raise UserError("%s: file not found (expected a JSON array or JSONL file of records)" % path)
    if os.path.isdir(path):
        raise UserError("%s: is a directory (expected a JSON array or JSONL file of records)" % path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError("%s: not UTF-8 text (byte %d): expected a JSON array or JSONL file" % (path, e.start))


def _parse(path, text):
    """Return [(record, where)] where `where` says how to point at the record in a message."""
    body = text.lstrip("\ufeff")  # tolerate a UTF-8 byte-order mark written by some editors
    if body.lstrip().startswith("["):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise UserError("%s: invalid JSON at line %d column %d: %s" % (path, e.lineno, e.colno, e.msg))
        if not isinstance(data, list):
            raise UserError("%s: top level is not a JSON array" % path)
        return [(r, "record %d" % i) for i, r in enumerate(data)]
    # JSONL: one record per non-empty line; line numbers in messages are 1-based like an editor's.
    out = []
    for lineno, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("%s: invalid JSON at line %d column %d: %s (expected one JSON object per line)"
                            % (path, lineno, e.colno, e.msg))
        out.append((rec, "record %d (line %d)" % (len(out), lineno)))
    return out


def load_records(path, require_output=True, require_answer=False):
    """Read a JSON array or JSONL file of records and check every field.

    `instruction` and `input` are always required (the template needs them). `output` is required for
    training (`require_output=True`, default) and may be absent at test time; `answer` is required only for
    scoring. Absent optional fields become "". Every present field must be a string: the shared math and
    commonsense sets store numbers as strings ("576.0"), so a JSON number is a sign of a different format.
    Extra keys (e.g. `generate` in prediction files) are kept. Record indices in messages are 0-based.
    """
    parsed = _parse(path, _read_text(path))
    if not parsed:
        raise UserError("%s: no records (expected a non-empty JSON array or JSONL file of objects)" % path)
    required = {"instruction": True, "input": True, "output": require_output, "answer": require_answer}
    records = []
    for rec, where in parsed:
        if not isinstance(rec, dict):
            raise UserError("%s: %s: is a JSON %s (expected an object with fields %s)"
                            % (path, where, type(rec).__name__, ", ".join(FIELDS)))
        rec = dict(rec)
        for field in FIELDS:
            if field not in rec:
                if required[field]:
                    raise UserError("%s: %s: field '%s' missing (expected a string)" % (path, where, field))
                rec[field] = ""
            elif not isinstance(rec[field], str):
                raise UserError("%s: %s: field '%s' is %s (expected a string)"
                                % (path, where, field, _json_type(rec[field])))
        records.append(rec)
    return records


def _json_type(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number (%r)" % (v,)
    return "an array" if isinstance(v, list) else "an object"
