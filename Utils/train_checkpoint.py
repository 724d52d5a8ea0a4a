"""Resumable training checkpoints without the frozen base (decision D11) and the output-directory lock.

A checkpoint is one pickle of numpy arrays and Python values: adapter weights, AdamW moments and step count,
the position in the data (epoch, next micro-step), the schedule's inputs, RNG states, per-epoch running sums,
best-validation bookkeeping and the resolved configuration — read back by Utils.safe_pickle, which admits nothing
else. It is written to a temporary file in the same
directory and renamed over the old one, so a crash at any moment leaves the previous checkpoint loadable.
"""
import os
import pickle
import random
import socket

import numpy as np

from Utils import safe_pickle
from Utils.errors import UserError

FORMAT = "moa-jittor-train-checkpoint"
VERSION = 1
LAST = "checkpoint-last.pkl"
BEST = "checkpoint-best.pkl"
LOCK = ".train.lock"
# Test hook: the writer dies right after the temporary file is complete, before the rename.
CRASH_HOOK_ENV = "MOA_TEST_CRASH_AFTER_CKPT_TMP"


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_train_checkpoint(path, state):
    """Atomically write `state` (a dict of numpy/Python values) to `path`."""
    state = dict(state, format=FORMAT, version=VERSION)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".%s.tmp.%d" % (os.path.basename(path), os.getpid()))
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get(CRASH_HOOK_ENV) == "1":
        os._exit(86)
    os.replace(tmp, path)
    _fsync_dir(directory)


def load_train_checkpoint(path):
    """Read a checkpoint written by `save_train_checkpoint`; a directory means its checkpoint-last.pkl."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise UserError("%s: training checkpoint not found" % path)
    state = safe_pickle.load(path, "training checkpoint")  # a checkpoint handed over cannot run code
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError("%s: not a moa-jittor training checkpoint" % path)
    if state.get("version") != VERSION:
        raise UserError("%s: checkpoint version %r, this code reads version %d" % (path, state.get("version"),
                                                                                   VERSION))
    return state


def resolve_resume(resume, output_dir):
    """`--resume auto` → output_dir's last checkpoint if there is one (else None); a path → that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output_dir, LAST)
        return path if os.path.isfile(path) else None
    path = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise UserError("--resume: %s is not a training checkpoint (expected a file or a dir holding %s)"
                        % (resume, LAST))
    return path


# ---------------------------------------------------------------------------------------- RNG state
def capture_rng():
    return {"python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state):
    if state:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------------------- output-dir lock
def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDirLock:
    """`<output_dir>/.train.lock` holding "pid host": a second live run on the same directory is refused;
    a lock left by a dead process on this host is taken over."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, LOCK)
        self.held = False

    def _read(self):
        try:
            with open(self.path) as f:
                parts = f.read().split()
            return int(parts[0]), (parts[1] if len(parts) > 1 else "")
        except (OSError, ValueError, IndexError):
            return None, ""

    def acquire(self):
        """Take the lock or raise UserError naming the process that holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host = self._read()
                if pid is not None and (host != socket.gethostname() or _pid_alive(pid)) and pid != os.getpid():
                    raise UserError("%s is in use by another training run (pid %d on %s; lock file %s)"
                                    % (os.path.dirname(self.path), pid, host or "?", self.path))
                try:  # stale: its process is gone
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write("%d %s\n" % (os.getpid(), socket.gethostname()))
            self.held = True
            return self
        raise UserError("%s: could not take the lock file %s" % (os.path.dirname(self.path), self.path))

    def release(self):
        if self.held:
            pid, _ = self._read()
            if pid == os.getpid():
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
            self.held = False
