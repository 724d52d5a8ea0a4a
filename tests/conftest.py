"""Shared test set-up: project root on sys.path, Jittor started the project's way, the repository's test sets."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "data")  # the public test sets shipped with the repository (data/README.md)
PY = sys.executable
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
ENV.pop("MOA_TEST_CRASH_AFTER_CKPT_TMP", None)   # a crash switch a test sets for one child only


def run_script(script, args, np_=1, timeout=600, output=None, cwd=ROOT, env=None):
    """Run a top-level script (under `mpirun -np np_` when np_ > 1) to completion and return the CompletedProcess;
    with `output` (a file object) start it in the background and return the Popen."""
    cmd = [PY, os.path.join(ROOT, script)] + [str(a) for a in args]
    if np_ > 1:
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_)] + cmd
    env = ENV if env is None else env
    if output is not None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_log(out_dir, kinds=("train", "val", "epoch")):
    """The records of an engine run's log.txt whose kind is in `kinds`."""
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [r for r in (json.loads(line) for line in f) if r["kind"] in kinds]


def last_trainable(out_dir):
    """The trainable weights of out_dir's checkpoint-last.pkl (read through the restricted unpickler)."""
    from Utils.train_checkpoint import load_train_checkpoint
    return load_train_checkpoint(os.path.join(out_dir, "checkpoint-last.pkl"))["trainable"]


def max_diff(a, b):
    """Largest absolute difference between two name → array dicts with the same names."""
    import numpy as np
    assert sorted(a) == sorted(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="session")
def jt():
    from Utils.runtime import import_jittor
    return import_jittor()


@pytest.fixture(scope="session")
def tokenizer():
    from Models.tokenizer import Tokenizer
    return Tokenizer()


@pytest.fixture(scope="session")
def shared_data():
    """The repository's data/ directory. Never skipped: a clone without its test sets is incomplete."""
    for sub in ("math", "math_14k", "commonsense"):
        assert os.path.isdir(os.path.join(DATA, sub)), "data/%s is missing from the repository" % sub
    return DATA


def require(*modules):
    """Import and return the oracle modules a test compares against (torch, transformers): installed by
    requirements-test.txt, so a missing one is a failure, never a skip."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail("the test oracle needs %s (pip install -r requirements-test.txt)" % ", ".join(missing))
    mods = [importlib.import_module(m) for m in modules]
    return mods[0] if len(mods) == 1 else mods
