"""Execution-based scoring of generated code: `run_program` (one untrusted program in a sandboxed subprocess),
the unbiased pass@k estimator, and HumanEval / MBPP scoring that runs every test program that way.

No program ever runs in the evaluating process. Each run starts `Utils/sandbox_child.py` in a new session with a
fresh temporary directory and a minimal environment; that child isolates itself (namespaces, read-only tree,
unprivileged uid, seccomp, rlimits — see its docstring) and execs `python -I -S -B` on the program. Here we
enforce the wall clock (the whole process group is killed; without a PID namespace, as root, also every process
of the run's private uid), keep a bounded head of stdout and tail of stderr, and remove the directory.

Statuses: passed (ran to its end), failed (an AssertionError escaped: a test failed), timeout (wall clock or CPU
limit), error (any other exception, syntax error, explicit exit — even exit(0), since the tests after it never
ran — or death by a signal). A program that calls os._exit(0) mid-way is seen as passed: the sandbox protects
the machine, not the score, from a program written to cheat.
"""
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from Utils.errors import UserError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
EXIT_FAILED, EXIT_ERROR, EXIT_EXITED, EXIT_SETUP = 101, 102, 103, 125
STATUSES = ("passed", "failed", "timeout", "error")
_NAMESPACES_WORK = [True]  # becomes False when namespaces failed after the kernel accepted them


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up: the program's outcome is unknown, so nothing is scored."""


@dataclass
class Result:
    status: str                       # passed | failed | timeout | error
    stderr: str                       # last `stderr_tail` characters (tracebacks end there)
    seconds: float                    # wall time of the whole run, set-up included
    stdout: str = ""                  # first `max_output` bytes
    returncode: Optional[int] = None  # program exit code, None when killed
    signal: Optional[int] = None      # signal that ended the program, if any
    isolation: Tuple[str, ...] = ()   # layers that applied: uid, netns, pidns, readonly-fs, seccomp, socket-guard
    workdir: str = ""                 # the (now removed) working directory, for tests and logs


def _world_usable(path):
    """True when an unprivileged stranger can run `path`: every directory above it searchable by others."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == os.path.dirname(d):
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def program_python():
    """Interpreter for the programs: ours, unless we are root and the dropped uid could not reach it
    (e.g. a pyenv under /root) — then the system's python3. Programs need only the standard library."""
    if os.geteuid() != 0 or _world_usable(sys.executable):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if cand and _world_usable(cand):
            return cand
    raise SandboxError("no python3 that an unprivileged user can run (needed to drop root for the programs)")


class _Capture:
    """Bounded capture: keep the head (stdout) or the tail (stderr) of at most `limit` bytes."""

    def __init__(self, limit, keep_tail):
        self.limit, self.keep_tail, self.buf, self.dropped = limit, keep_tail, bytearray(), 0

    def add(self, data):
        if self.keep_tail:
            self.buf += data
            if len(self.buf) > 2 * self.limit:
                self.dropped += len(self.buf) - self.limit
                del self.buf[:-self.limit]
        else:
            room = self.limit - len(self.buf)
            self.buf += data[:max(room, 0)]
            self.dropped += max(len(data) - max(room, 0), 0)

    def text(self):
        data = bytes(self.buf[-self.limit:]) if self.keep_tail else bytes(self.buf)
        return data.decode("utf-8", errors="replace")


def _pump(proc, streams, deadline):
    """Read every stream until the child exits or the deadline passes. True when the deadline passed."""
    sel = selectors.DefaultSelector()
    for fd, cap in streams.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, cap)

    def read_ready(wait):
        for key, _ in sel.select(wait):
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                key.data.add(data)
            else:
                sel.unregister(key.fd)

    timed_out = False
    while proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        read_ready(min(left, 0.05))
    return sel, read_ready, timed_out


def _kill_uid(uid):
    """As root: SIGKILL every process of the run's private uid (catches any that left our process group)."""
    code = ("import os\nos.setgid(%d)\nos.setuid(%d)\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n"
            "    pass\n" % (uid, uid))
    subprocess.run([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _remove(path):
    def unlock(func, p, _exc):  # without root, a program's read-only directories would stop rmtree
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p):
            os.chmod(p, 0o700)
        func(p)
    shutil.rmtree(path, onerror=unlock)


def _parse_status(raw):
    records = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            records.update(json.loads(line))
        except ValueError:
            pass
    return records


def default_sigchld():
    """Put back the default SIGCHLD disposition (from the main thread; elsewhere Python cannot, and this does nothing).

    Jittor, once imported, installs a C-level SIGCHLD handler meant for its data-loader workers that ends the whole
    process when any child dies of a signal — and a program killed on timeout is such a child. The evaluating process
    (inference.py) has no such workers, so the default is right for it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def run_program(source, timeout_s=10.0, memory_mb=512, *, namespaces=True, seccomp=True, nproc=32,
                fsize_mb=16, max_output=65536, stderr_tail=4000, python=None):
    """Run `source` (Python text) in the sandbox and say how it ended. Never runs it in this process.

    timeout_s: wall clock for the whole run (CPU seconds are capped at ceil(timeout_s) + 1 as well); memory_mb:
    address-space limit; nproc: processes the program may add; fsize_mb: largest file it may write (its tmpfs
    working directory holds 4× that). `namespaces=False` / `seccomp=False` switch layers off (for tests and for
    kernels that refuse them); with neither, only the in-interpreter socket guard stands between it and the net.
    """
    if not isinstance(source, str):
        raise UserError("run_program: source must be a string of Python code, not %s" % type(source).__name__)
    if not (timeout_s > 0 and memory_mb >= 32):
        raise UserError("run_program: timeout_s must be > 0 and memory_mb >= 32 (got %r, %r)" % (timeout_s, memory_mb))
    default_sigchld()
    workdir = tempfile.mkdtemp(prefix="moa-code-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(os.path.join(workdir, "program.py"), 0o644)
        cfg = {"workdir": workdir, "python": python or program_python(), "memory_mb": int(memory_mb),
               "cpu_s": int(math.ceil(timeout_s)) + 1, "fsize_mb": int(fsize_mb), "nproc": int(nproc),
               "namespaces": bool(namespaces) and _NAMESPACES_WORK[0], "seccomp": bool(seccomp)}
        try:
            return _run(cfg, timeout_s, max_output, stderr_tail)
        except SandboxError as e:
            if not cfg["namespaces"]:
                raise
            # Some kernels accept unshare but refuse what follows (e.g. mounts in a restricted user namespace):
            # run without namespaces; if that works, stop trying them in this process. Result.isolation tells.
            cfg["namespaces"] = False
            result = _run(cfg, timeout_s, max_output, stderr_tail)
            _NAMESPACES_WORK[0] = False
            warnings.warn("code sandbox: namespaces unusable here (%s); running without them" % e)
            return result
    finally:
        _remove(workdir)


def _run(cfg, timeout_s, max_output, stderr_tail):
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", CHILD, json.dumps(cfg), str(status_w)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w,), start_new_session=True, cwd="/",
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    finally:
        os.close(status_w)
    out, err, st = _Capture(max_output, False), _Capture(stderr_tail, True), _Capture(1 << 16, False)
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, status_r: st}
    sel, read_ready, timed_out = _pump(proc, streams, start + timeout_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # always: whatever the program left in its group goes too
    except ProcessLookupError:
        pass
    proc.wait()
    report = _parse_status(bytes(st.buf))
    if report.get("uid") is not None and "pidns" not in report.get("setup", ()):
        _kill_uid(report["uid"])  # without a PID namespace, a process that called setsid() is found by uid
    drain_until = time.monotonic() + 1.0
    while sel.get_map() and time.monotonic() < drain_until:
        read_ready(0.05)
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    os.close(status_r)
    report.update(_parse_status(bytes(st.buf)))
    seconds = time.monotonic() - start
    if "setup_error" in report or ("setup" not in report and not timed_out):
        raise SandboxError("code sandbox set-up failed: %s" % (report.get("setup_error")
                                                                or err.text().strip()[-300:] or "no report"))
    code, sig = report.get("exit"), report.get("signal")
    if timed_out or sig in (signal.SIGXCPU, signal.SIGKILL):
        status = "timeout"
    elif sig is not None:
        status = "error"
        err.add(("\nkilled by %s\n" % signal.Signals(sig).name).encode())
    elif code == 0:
        status = "passed"
    elif code == EXIT_FAILED:
        status = "failed"
    else:
        status = "error"
    return Result(status=status, stderr=err.text(), seconds=seconds, stdout=out.text(),
                  returncode=None if timed_out else code, signal=sig,
                  isolation=tuple(report.get("setup", ())), workdir=cfg["workdir"])


# ---------------------------------------------------------------------------- pass@k and benchmark scoring
def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 − C(n−c, k) / C(n, k), for n samples of which c passed."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not (0 <= c <= n and 1 <= k <= n):
        raise UserError("pass_at_k: need integers 0 <= c <= n and 1 <= k <= n (got n=%r, c=%r, k=%r)" % (n, c, k))
    if n - c < k:
        return 1.0
    # Product form: no huge binomials, and exact enough for any n used in practice.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class TaskScore:
    task_id: str
    results: List[Result]
    passed: int = 0

    @property
    def n(self):
        return len(self.results)


@dataclass
class Score:
    tasks: List[TaskScore]
    pass_at: Dict[int, float] = field(default_factory=dict)

    def summary(self):
        return {"tasks": len(self.tasks), **{"pass@%d" % k: v for k, v in sorted(self.pass_at.items())},
                **{s: sum(r.status == s for t in self.tasks for r in t.results) for s in STATUSES}}


def _field(record, name, where, kind=str):
    if name not in record:
        raise UserError("%s: field '%s' missing" % (where, name))
    if not isinstance(record[name], kind):
        raise UserError("%s: field '%s' is %s (expected %s)" % (where, name, type(record[name]).__name__,
                                                                  getattr(kind, "__name__", "a list")))
    return record[name]


def humaneval_program(record, solution):
    """The test program of one HumanEval sample: the solution (definitions), the task's `check`, the call."""
    where = "HumanEval task %s" % record.get("task_id", "?")
    test, entry = _field(record, "test", where), _field(record, "entry_point", where)
    return "%s\n\n%s\n\ncheck(%s)\n" % (solution, test, entry)


def mbpp_program(record, solution):
    """The test program of one MBPP sample: the solution, the task's set-up code, then its assert lines."""
    where = "MBPP task %s" % record.get("task_id", "?")
    tests = _field(record, "test_list", where, list)
    setup = record.get("test_setup_code") or ""
    return "%s\n\n%s\n\n%s\n" % (solution, setup, "\n".join(tests))


def _score(records, solutions, build, ks, workers, **run_kw):
    if len(records) != len(solutions):
        raise UserError("scoring: %d tasks but %d solution lists" % (len(records), len(solutions)))
    samples = [[s] if isinstance(s, str) else list(s) for s in solutions]
    tasks = [TaskScore(str(r.get("task_id", i)), []) for i, r in enumerate(records)]
    jobs = [(i, build(rec, sol)) for i, (rec, sols) in enumerate(zip(records, samples)) for sol in sols]
    default_sigchld()  # the pool's threads cannot
    # Threads only wait on subprocesses here; every program runs in its own sandboxed process.
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(pool.map(lambda job: run_program(job[1], **run_kw), jobs))
    for (i, _), res in zip(jobs, results):
        tasks[i].results.append(res)
        tasks[i].passed += res.status == "passed"
    score = Score(tasks)
    for k in ks:
        short = [t.task_id for t in tasks if t.n < k]
        if short:
            raise UserError("pass@%d needs at least %d samples per task; task %s has %d"
                            % (k, k, short[0], min(t.n for t in tasks)))
        score.pass_at[k] = sum(pass_at_k(t.n, t.passed, k) for t in tasks) / max(len(tasks), 1)
    return score


def score_humaneval(records, solutions, ks=(1,), workers=2, timeout_s=10.0, memory_mb=512, **run_kw):
    """records: HumanEval dicts (task_id, test, entry_point); solutions[i]: code string(s) for task i, already
    extracted (Dataset.code_tasks.extract_code). Returns a Score: per-task results and pass@k for each k."""
    return _score(records, solutions, humaneval_program, ks, workers, timeout_s=timeout_s, memory_mb=memory_mb,
                  **run_kw)


def score_mbpp(records, solutions, ks=(1,), workers=2, timeout_s=10.0, memory_mb=512, **run_kw):
    """records: MBPP dicts (task_id, test_list, test_setup_code); otherwise as score_humaneval."""
    return _score(records, solutions, mbpp_program, ks, workers, timeout_s=timeout_s, memory_mb=memory_mb,
                  **run_kw)
