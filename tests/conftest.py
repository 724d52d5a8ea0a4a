"""Shared test set-up: project root on sys.path, Jittor started the project's way, the repository's test sets."""
import importlib
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DATA = os.path.join(ROOT, "data")  # the public test sets shipped with the repository (data/README.md)


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
