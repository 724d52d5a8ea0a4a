"""Code-generation tasks (issue 19): loading HumanEval and MBPP records, the prompts a model is given, and
`extract_code`, which turns a model's answer into the program that `Utils.code_eval` scores.

Code *instructions* for fine-tuning (LLM-Adapters / codealpaca-20k style: instruction, input, output) are ordinary
records: read them with `Dataset.load_records`; the Alpaca template of `Dataset.prompts` applies unchanged.
"""
import gzip
import json
import os
import re

from Dataset.prompts import format_prompt
from Utils.errors import UserError

# (field, accepted types, required). HumanEval's canonical_solution may be absent: MBPP rewritten in HumanEval's
# layout (as MoA_Transformers ships it) has none; task ids are strings in HumanEval and integers in MBPP.
HUMANEVAL_FIELDS = (("task_id", (str, int), True), ("prompt", str, True), ("canonical_solution", str, False),
                    ("test", str, True), ("entry_point", str, True))
MBPP_FIELDS = (("task_id", (str, int), True), ("text", str, True), ("code", str, True), ("test_list", list, True),
               ("test_setup_code", str, False))

# Our own wording (the instruction is the same text; only the framing differs between the two styles).
MBPP_TASK = ("You are an experienced Python programmer. Write a Python function for the task below; "
             "it will be checked by the tests that follow.\n\nTask: {text}\n\nTests:\n{tests}\n")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
_PY_LANGS = ("", "python", "py", "python3", "py3")
_TOP_CODE = re.compile(r"(?:async\s+def|def|class)\s|@|import\s|from\s+\S+\s+import\s|#")


def _open_text(path):
    if not os.path.isfile(path):
        raise UserError("%s: file not found (expected a JSONL file, optionally .gz)" % path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise UserError("%s: cannot read as UTF-8 JSONL (%s)" % (path, e))


def _type_name(types):
    names = {str: "a string", int: "an integer", list: "a list of strings"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


def _load_jsonl(path, fields, kind):
    records, seen = [], {}
    for lineno, line in enumerate(_open_text(path).lstrip("\ufeff").splitlines(), 1):
        if not line.strip():
            continue
        where = "%s:%d" % (path, lineno)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError("%s: invalid JSON at column %d: %s (expected one %s record per line)"
                            % (where, e.colno, e.msg, kind))
        if not isinstance(rec, dict):
            raise UserError("%s: a JSON %s, not an object (expected a %s record)" % (where, type(rec).__name__, kind))
        for name, types, required in fields:
            if name not in rec or (rec[name] is None and not required):
                if required:
                    raise UserError("%s: field '%s' missing (%s records need %s)" % (
                        where, name, kind, ", ".join(n for n, _, r in fields if r)))
                rec[name] = ""
            elif not isinstance(rec[name], types) or isinstance(rec[name], bool):
                raise UserError("%s: field '%s' is %s (expected %s)" % (where, name, type(rec[name]).__name__,
                                                                          _type_name(types)))
            elif types is list and not all(isinstance(t, str) for t in rec[name]):
                raise UserError("%s: field '%s' holds a non-string (expected a list of strings)" % (where, name))
        if rec["task_id"] in seen:
            raise UserError("%s: task_id %r repeats line %d" % (where, rec["task_id"], seen[rec["task_id"]]))
        seen[rec["task_id"]] = lineno
        records.append(rec)
    if not records:
        raise UserError("%s: no records (expected a JSONL file of %s tasks)" % (path, kind))
    return records


def load_humaneval(path):
    """HumanEval tasks (HumanEval.jsonl or .jsonl.gz): task_id, prompt, canonical_solution, test, entry_point."""
    recs = _load_jsonl(path, HUMANEVAL_FIELDS, "HumanEval")
    for rec in recs:
        if _def_line(rec["prompt"], rec["entry_point"]) is None and rec["prompt"].strip():
            raise UserError("%s: task %s: prompt does not define entry_point %r" % (path, rec["task_id"],
                                                                                   rec["entry_point"]))
    return recs


def load_mbpp(path):
    """MBPP tasks (mbpp.jsonl): task_id, text, code, test_list, test_setup_code (may be absent)."""
    return _load_jsonl(path, MBPP_FIELDS, "MBPP")


def task_kind(task):
    if "entry_point" in task and "test" in task:
        return "humaneval"
    if "test_list" in task:
        return "mbpp"
    raise UserError("task %r is neither a HumanEval nor an MBPP record" % task.get("task_id", "?"))


def code_prompt(task, style="instruction"):
    """What the model sees for one task.

    style "instruction" (default): the Alpaca template of Dataset.prompts with the task as the instruction — the
    HumanEval function prompt itself, as MoA_Transformers does, or the MBPP task text and tests — for
    instruction-tuned adapters (e.g. trained on codealpaca-20k). style "completion": the bare text for a base
    model, whose answer continues it (HumanEval: the signature and docstring; MBPP: the task text and tests).
    """
    if style not in ("instruction", "completion"):
        raise UserError("code_prompt: style %r is not 'instruction' or 'completion'" % style)
    if task_kind(task) == "humaneval":
        text = task["prompt"]
    else:
        text = MBPP_TASK.format(text=task["text"].strip(), tests="\n".join(task["test_list"]))
    if style == "completion":
        return text
    return format_prompt({"instruction": text.rstrip("\n"), "input": ""})


def reference_solution(task):
    """The dataset's own solution as a program (scores pass@1 = 1 on a sound data file)."""
    if task_kind(task) == "humaneval":
        return task["prompt"] + task["canonical_solution"]
    return task["code"]


# ---------------------------------------------------------------------------- extraction
def _def_line(code, name):
    """Offset of the top-level `def name(` in code, or None."""
    m = re.search(r"^(?:async\s+)?def\s+%s\s*\(" % re.escape(name), code, re.M)
    return None if m is None else m.start()


def _mbpp_entry(task):
    """The function the MBPP tests call: a def of the reference solution that a test line calls."""
    names = re.findall(r"^def\s+(\w+)\s*\(", task.get("code", ""), re.M)
    tests = "\n".join(task["test_list"])
    for name in names:
        if re.search(r"\b%s\s*\(" % re.escape(name), tests):
            return name
    return names[0] if names else None


def _fenced_blocks(text):
    return [body for lang, body in _FENCE.findall(text) if lang.lower() in _PY_LANGS]


def _definitions(code, entry, from_first_code_line):
    """Keep everything up to the entry function's def (imports, constants, helpers) and its body; after it, stop
    at the first top-level line that is not a def, class, decorator, import or comment (example calls, prints,
    `if __name__ ...`, asserts, prose) or at a closing fence. No known entry: the first def stands for it."""
    lines = code.split("\n")
    start = 0
    if from_first_code_line:  # an unfenced answer may open with prose
        start = next((i for i, ln in enumerate(lines) if _TOP_CODE.match(ln) and not ln.startswith("#")), 0)
    entry_def = re.compile(r"(?:async\s+)?def\s+%s\s*\(" % (re.escape(entry) if entry else r"\w+"))
    out, after_entry = [], False
    for line in lines[start:]:
        if line.lstrip().startswith("```"):
            break
        if line.strip() and not line[0].isspace():
            if entry_def.match(line):
                after_entry = True
            elif after_entry and not _TOP_CODE.match(line):
                break
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def _body_completion(text):
    """A continuation of the function body: cut at the first non-blank line that is not indented."""
    out = []
    for line in text.split("\n"):
        if line.strip() and not line[0].isspace():
            break
        out.append(line)
    return "\n".join(out).rstrip() + "\n"


def extract_code(generation, task):
    """The program to test for one answer (the task's tests are appended by Utils.code_eval).

    1. Fenced answers: the first ```python (or unlabelled) block that defines the entry function, else the
       first such block; an unclosed fence (cut by the token limit) runs to the end of the answer.
    2. Unfenced answers that define the entry function at top level (HumanEval: `def <entry_point>(`; MBPP: the
       function the tests call): the code from its first top-level import/def/class line.
    In 1 and 2 everything before the entry function's def is kept (imports, constants, helpers); after its body
    the code stops at the first top-level line that is not a def, class, decorator, import or comment — example
    calls, prints, `if __name__ ...`, asserts, prose.
    3. Otherwise, HumanEval: the answer continues the prompt's function body, as base models do. It is cut at
       the first top-level (unindented) line, the stop rule of the Codex harness (which stops at a new def,
       class, if, print or comment) widened to any unindented line, and appended to the prompt.
       MBPP: the whole answer, with the rule of 1–2.
    HumanEval solutions that bring their own `def <entry_point>` get the prompt's text before its def (imports,
    helper functions) prepended, since answers often omit them.
    """
    if not isinstance(generation, str):
        raise UserError("extract_code: generation must be a string, not %s" % type(generation).__name__)
    kind = task_kind(task)
    entry = task["entry_point"] if kind == "humaneval" else _mbpp_entry(task)
    blocks = _fenced_blocks(generation)
    if blocks:
        chosen = next((b for b in blocks if entry and _def_line(b, entry) is not None), blocks[0])
        code = _definitions(chosen, entry, from_first_code_line=False)
    elif entry and _def_line(generation, entry) is not None:
        code = _definitions(generation, entry, from_first_code_line=True)
    elif kind == "humaneval":
        return task["prompt"] + _body_completion(generation)
    else:
        code = _definitions(generation, entry, from_first_code_line=True)
    if kind == "humaneval":
        if _def_line(code, entry) is None:     # a fenced body without its def line
            return task["prompt"] + _body_completion(code if code[:1].isspace() else _indent(code))
        cut = _def_line(task["prompt"], entry)
        return task["prompt"][:cut] + code
    return code


def _indent(code):
    return "\n".join(("    " + ln) if ln.strip() else ln for ln in code.split("\n"))
