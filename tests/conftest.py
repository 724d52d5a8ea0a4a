"""Shared test set-up: project root on sys.path, Jittor started the project's way, shared data location."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


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
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present beside the project")
    return SHARED_DATA
