"""Code test sets in inference.py (issue 19): recognising a HumanEval / MBPP file, one prediction record per (task,
sample), the extracted programs run in the sandbox of Utils.code_eval on a thread pool while the model keeps
generating, and pass@k from a predictions file.

Every program runs in its own sandboxed subprocess (`run_program`); the threads here only wait for those. Records
(one JSON line each, `CODE_FIELDS`): task_id, sample (0..n-1), prompt (the task's own text: HumanEval's prompt, MBPP's
task), generation (the decoded answer), program (what `Dataset.code_tasks.extract_code` made of it, tests not
included), status (passed | failed | timeout | error, see Utils.code_eval), passed, error (the last line the program
wrote to stderr when it did not pass).
"""
import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor

from Utils.errors import UserError

CODE_FIELDS = ("task_id", "sample", "prompt", "generation", "program", "status", "passed", "error")
PASS_KS = (1, 5, 10, 100)   # pass@k reported for every k up to the samples per task (human-eval's k = 1, 10, 100)
CODE_SUFFIXES = (".jsonl.gz", ".jsonl", ".json")


def code_file_kind(path):
    """'humaneval' or 'mbpp' when the first record of a JSONL file (optionally .gz) has that layout, else None."""
    if not path.endswith((".jsonl", ".jsonl.gz")) or not os.path.isfile(path):
        return None
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        rec = json.loads(first.lstrip("\ufeff"))
    except (OSError, EOFError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict):
        return None
    if "entry_point" in rec and "test" in rec:
        return "humaneval"
    if "test_list" in rec and "text" in rec:
        return "mbpp"
    return None


def code_set_name(path):
    """The set name of a code file: its name without .jsonl / .jsonl.gz (HumanEval.jsonl.gz → HumanEval)."""
    base = os.path.basename(path)
    for suffix in CODE_SUFFIXES:
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def is_code_predictions(path):
    """True when a predictions file holds code records (task_id and passed), i.e. was written by a CodeSet."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        rec = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rec, dict) and "task_id" in rec and "passed" in rec


def _error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    return "" if result.status == "passed" else (lines[-1][:300] if lines else result.status)


class CodeSet:
    """One HumanEval or MBPP file as inference.py's Runner sees a test set: records, prompts, results, score.

    `a` holds inference.py's flags: max_examples, num_samples, prompt_template, code_timeout, code_memory_mb,
    code_workers. Results are asynchronous: `results()` hands programs to the sandbox pool and returns those that
    finished, `drain()` waits for the rest; the PredictionWriter writes them in order whatever order they end in.
    """

    fields = CODE_FIELDS

    def __init__(self, name, path, kind, a):
        from Dataset.code_tasks import code_prompt, load_humaneval, load_mbpp
        self.name, self.kind, self.a = name, kind, a
        self.tasks = (load_humaneval if kind == "humaneval" else load_mbpp)(path)[:a.max_examples]
        self.texts = [code_prompt(t, "completion") for t in self.tasks]   # the task as the model is asked it
        n = a.num_samples
        self.records = [{"task_id": t["task_id"], "sample": s, "prompt": t["prompt"] if kind == "humaneval"
                         else t["text"]} for t in self.tasks for s in range(n)]
        self._pool, self._futures = None, {}

    def task_of(self, i):
        return self.tasks[i // self.a.num_samples]

    def prompt_ids(self, i, tokenizer, max_seq_len, chat):
        """Token ids of record i's prompt: the bare task (completion), or the task as the instruction of the
        Alpaca prompt (Dataset.code_tasks.code_prompt) or of the tokenizer's chat template."""
        from Dataset.prompts import prompt_ids
        text = self.texts[i // self.a.num_samples]
        if self.a.prompt_template == "completion":
            return tokenizer.encode(text, bos=True, eos=False)
        return prompt_ids({"instruction": text.rstrip("\n"), "input": ""}, tokenizer, max_seq_len, self.a.min_gen_len,
                          chat)

    @staticmethod
    def same(rec, saved):
        return isinstance(saved, dict) and all(saved.get(k) == rec[k] for k in ("task_id", "sample", "prompt"))

    # ---- rank 0: programs to the sandbox, records back ----
    def prepare(self):
        """Run an empty program once, so a machine where the sandbox cannot start fails before generating."""
        from Utils.code_eval import SandboxError, default_sigchld, run_program
        default_sigchld()  # here, on the main thread: the pool's threads cannot, and Jittor's handler would kill us
        try:
            result = run_program("pass\n", timeout_s=max(self.a.code_timeout, 5.0), memory_mb=self.a.code_memory_mb)
        except SandboxError as e:
            raise UserError("code sandbox unavailable, nothing can be scored: %s" % str(e).splitlines()[0])
        if result.status != "passed":
            raise UserError("code sandbox: an empty program ended as %s (%s)" % (result.status, _error_line(result)))

    def _run(self, i, generation):
        from Dataset.code_tasks import extract_code
        from Utils.code_eval import SandboxError, humaneval_program, mbpp_program, run_program
        task = self.task_of(i)
        program = extract_code(generation, task)
        test = (humaneval_program if self.kind == "humaneval" else mbpp_program)(task, program)
        try:
            r = run_program(test, timeout_s=self.a.code_timeout, memory_mb=self.a.code_memory_mb)
        except SandboxError as e:
            raise UserError("code sandbox failed on task %s: %s" % (task["task_id"], str(e).splitlines()[0]))
        return dict(self.records[i], generation=generation, program=program, status=r.status,
                    passed=r.status == "passed", error=_error_line(r))

    def results(self, generations):
        """generations: {record index: decoded text}. Submits each to the sandbox; returns {index: record} of every
        program that has finished so far (from this call or earlier ones)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.a.code_workers), thread_name_prefix="sandbox")
        for i, text in generations.items():
            self._futures[i] = self._pool.submit(self._run, i, text)
        return self._collect(wait=False)

    def drain(self):
        """Wait for every program still running; their records."""
        out = self._collect(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return out

    def _collect(self, wait):
        done = {i: f for i, f in self._futures.items() if wait or f.done()}
        out = {}
        for i, f in sorted(done.items()):
            out[i] = f.result()          # re-raises a UserError from _run
            del self._futures[i]
        return out

    def score(self, out_path):
        return score_code_file(self.name, out_path)


# ---------------------------------------------------------------------------- scoring a predictions file
def score_code_file(name, path):
    """pass@k of a code predictions file: (summary lines, {accuracy = pass@1, pass@k, tasks, samples, statuses})."""
    from Utils.code_eval import STATUSES, pass_at_k
    per_task, statuses = {}, dict.fromkeys(STATUSES, 0)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key, passed, status = rec["task_id"], rec["passed"], rec["status"]
            except (ValueError, KeyError, TypeError):
                raise UserError("%s:%d: not a code prediction record (task_id, status, passed)" % (path, lineno))
            if not isinstance(passed, bool) or status not in statuses:
                raise UserError("%s:%d: passed must be true/false and status one of %s" % (path, lineno,
                                                                                        ", ".join(STATUSES)))
            n, c = per_task.get(key, (0, 0))
            per_task[key] = (n + 1, c + passed)
            statuses[status] += 1
    if not per_task:
        raise UserError("%s: no prediction records" % path)
    n_min = min(n for n, _ in per_task.values())
    pass_at = {k: sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
               for k in PASS_KS if k <= n_min}
    total, passed = sum(n for n, _ in per_task.values()), sum(c for _, c in per_task.values())
    plural = lambda n, word: "%d %s%s" % (n, word, "" if n == 1 else "s")  # noqa: E731
    shape = "%s × %s" % (plural(len(per_task), "task"), plural(n_min, "sample"))
    if any(n != n_min for n, _ in per_task.values()):
        shape = "%s, %s, at least %d per task" % (plural(len(per_task), "task"), plural(total, "sample"), n_min)
    head = "%s pass@1: %d/%d = %.4f" % (name, passed, total, pass_at[1]) if total == len(per_task) else \
        "%s %s" % (name, ", ".join("pass@%d = %.4f" % kv for kv in sorted(pass_at.items())))
    lines = [head + " (%s; %s)" % (shape, ", ".join("%s %d" % kv for kv in statuses.items()))]
    info = {"accuracy": pass_at[1], "pass_at": {str(k): v for k, v in pass_at.items()}, "tasks": len(per_task),
            "samples": total, "passed": passed, "statuses": statuses, "file": os.path.abspath(path)}
    return lines, info
