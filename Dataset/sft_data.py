"""SFT data: chat conversations read from jsonl, encoded with the tokenizer's chat template, loss on answers only.

Two record formats, recognised per line (a file may mix them):
* minimind: {"conversations": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]} — used as is
  (other keys of a message, e.g. "reasoning_content", reach the template unchanged);
* wyf3 / Alpaca: {"instruction", "input", "output", "history": [[question, answer], ...]} — the history turns
  come first (user question, assistant answer), then the user turn instruction + "\\n" + input (just the
  instruction when input is empty or absent), then the assistant turn output. "input" and "history" are optional.
Other keys of a record (e.g. "task", "answer" of `Dataset.instruction_generator`) are ignored.

Encoding: `tokenizer.encode_chat(messages)` gives the ids and the assistant mask (each assistant turn's content and
its end-of-turn token); labels are the ids there and IGNORE_INDEX = -100 elsewhere, so every assistant turn,
history included, is trained, and prompts, role headers and template scaffolding are not. Labels are not
shifted (see `Dataset.lm_batches`). A conversation longer than max_seq_len loses its END; one left with no
supervised target is skipped and counted (`stats`, `summary`); if none is left that is a one-line error.

Bad input is a one-line `UserError` naming the file, the line and the field: blank lines between records,
malformed JSON, a record of neither format, unknown roles, non-string content, a conversation without an
assistant turn.
"""
import json

import numpy as np

from Dataset.encoding import IGNORE_INDEX
from Dataset.lm_batches import EvalLMData, LMData
from Dataset.pretrain_data import check_source, read_lines
from Utils.errors import UserError

ROLES = ("system", "user", "assistant")


def _type_name(v):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _minimind_messages(rec, where):
    conv = rec["conversations"]
    if not isinstance(conv, list) or not conv:
        raise UserError("%s: field 'conversations' is %s, expected a non-empty array of {\"role\", \"content\"}"
                        % (where, "empty" if conv == [] else _type_name(conv)))
    for k, m in enumerate(conv):
        field = "conversations[%d]" % k
        if not isinstance(m, dict):
            raise UserError("%s: %s is %s, expected an object {\"role\", \"content\"}" % (where, field,
                                                                                          _type_name(m)))
        if "role" not in m or "content" not in m:
            raise UserError("%s: %s.%s missing" % (where, field, "role" if "role" not in m else "content"))
        if m["role"] not in ROLES:
            raise UserError("%s: %s.role %s is not one of %s" % (where, field, json.dumps(m["role"]),
                                                                 ", ".join(ROLES)))
        if not isinstance(m["content"], str):
            raise UserError("%s: %s.content is %s, expected a string" % (where, field, _type_name(m["content"])))
    if not any(m["role"] == "assistant" for m in conv):
        raise UserError("%s: field 'conversations' has no assistant turn (nothing to learn)" % where)
    return [dict(m) for m in conv]


def _string_field(rec, name, where, required):
    if name not in rec or rec[name] is None:
        if required:
            raise UserError("%s: field '%s' missing" % (where, name))
        return ""
    if not isinstance(rec[name], str):
        raise UserError("%s: field '%s' is %s, expected a string" % (where, name, _type_name(rec[name])))
    return rec[name]


def _instruction_messages(rec, where):
    instruction = _string_field(rec, "instruction", where, True)
    inp = _string_field(rec, "input", where, False)
    output = _string_field(rec, "output", where, True)
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise UserError("%s: field 'history' is %s, expected an array of [question, answer] pairs"
                        % (where, _type_name(history)))
    messages = []
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise UserError("%s: field 'history'[%d] is not a [question, answer] pair of strings" % (where, k))
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    question = instruction + "\n" + inp if inp else instruction
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": output}]


def record_messages(rec, where):
    """The chat messages of one parsed record (either format); `where` ("file: line N") prefixes errors."""
    if not isinstance(rec, dict):
        raise UserError("%s: the record is %s, expected an object with 'conversations' or 'instruction'"
                        % (where, _type_name(rec)))
    if "conversations" in rec:
        return _minimind_messages(rec, where)
    if "instruction" in rec:
        return _instruction_messages(rec, where)
    raise UserError("%s: neither field 'conversations' (minimind format) nor 'instruction' (instruction/input/"
                    "output/history format)" % where)


def read_conversations(path):
    """[(messages, line number)] of a jsonl file of conversations, every record checked."""
    check_source(path, "a jsonl file of conversations")
    out, blank = [], None
    for lineno, line, _ in read_lines(path):
        if not line.strip():
            blank = blank or lineno
            continue
        if blank:  # a blank line between records; trailing blank lines at the end of the file are harmless
            raise UserError("%s: line %d: empty line (expected one JSON object per line)" % (path, blank))
        where = "%s: line %d" % (path, lineno)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("%s: invalid JSON at column %d: %s" % (where, e.colno, e.msg))
        out.append((record_messages(rec, where), lineno))
    if not out:
        raise UserError("%s: no conversations (expected jsonl lines with 'conversations' or 'instruction')" % path)
    return out


def encode_conversation(messages, tokenizer, max_seq_len):
    """(ids int32, labels int32, n_cut): labels = ids on assistant tokens, IGNORE_INDEX elsewhere, end cut off."""
    ids, mask = tokenizer.encode_chat(messages, add_generation_prompt=False)
    ids = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.asarray(mask, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
    n_cut = max(0, len(ids) - max_seq_len)
    return ids[:max_seq_len], labels[:max_seq_len], n_cut


def encode_conversations(conversations, tokenizer, max_seq_len, path="<conversations>", progress=False):
    """(rows [(ids, labels)], stats) for [(messages, line number)]; skips conversations with no target left."""
    from tqdm import tqdm

    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError("max_seq_len %r: expected an integer >= 2" % (max_seq_len,))
    rows, n_truncated, skipped = [], 0, []
    for messages, lineno in tqdm(conversations, disable=not progress, desc="encoding %s" % path):
        ids, labels, n_cut = encode_conversation(messages, tokenizer, max_seq_len)
        n_truncated += n_cut > 0
        if not (labels[1:] != IGNORE_INDEX).any():  # labels[0] is never a target
            skipped.append(lineno)
            continue
        rows.append((ids, labels))
    stats = {"conversations": len(conversations), "rows": len(rows), "truncated": n_truncated,
             "skipped": len(skipped), "skipped_lines": skipped[:20]}
    if not rows:
        raise UserError("%s: none of the %d conversations has an answer token within max_seq_len=%d (each is cut "
                        "before its first assistant token); raise max_seq_len" % (path, len(conversations),
                                                                                  max_seq_len))
    return rows, stats


def describe(path, stats, max_seq_len):
    line = "%s: %d conversations -> %d rows (%d truncated to %d tokens" % (
        path, stats["conversations"], stats["rows"], stats["truncated"], max_seq_len)
    if stats["skipped"]:
        line += ", %d skipped with no answer token left, lines %s%s" % (
            stats["skipped"], ",".join(map(str, stats["skipped_lines"])), ",..." if stats["skipped"] > 20 else "")
    return line + ")"


class SFTData(LMData):
    """Training conversations of one jsonl file, served by the data protocol (`Dataset.lm_batches.LMData`)."""

    def __init__(self, path, tokenizer, max_seq_len, batch_size, data_seed=0, rank=0, world_size=1, progress=False):
        rows, self.stats = encode_conversations(read_conversations(path), tokenizer, max_seq_len, path, progress)
        super().__init__(rows, batch_size, data_seed, rank, world_size)
        self.max_seq_len = max_seq_len
        self.summary = describe(path, self.stats, max_seq_len)
        if len(self) == 0:
            raise UserError("%s: %d conversations do not fill one global micro-batch of batch_size x world_size = "
                            "%d x %d" % (path, len(rows), batch_size, world_size))


def sft_eval_data(path, tokenizer, max_seq_len, batch_size, rank=0, world_size=1):
    """Validation `EvalLMData` of a conversations file (skipped conversations are left out, as in training)."""
    rows, stats = encode_conversations(read_conversations(path), tokenizer, max_seq_len, path)
    data = EvalLMData(rows, batch_size, rank, world_size)
    data.stats, data.summary = stats, describe(path, stats, max_seq_len)
    return data
