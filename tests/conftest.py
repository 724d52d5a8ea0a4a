"""Shared test set-up: project root on sys.path, Jittor started the project's way, the repository's test sets."""
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
