"""Nothing a user is handed may run code (issue 13 §3): every pickle the project reads goes through
Utils.safe_pickle. A crafted .pkl whose unpickling would call os.system is refused — by the loaders, by
`python -m Utils.plot` and by `Math.py --resume` — with one line naming the file and the refused global, and the
command never runs; what the project itself writes (checkpoints with RNG states, routing dumps) still loads."""
import collections
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from Utils.errors import UserError


class _RunsCode:
    """Unpickling this calls os.system(cmd) (pickle's REDUCE): what a crafted file does."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.fixture
def crafted(tmp_path):
    """(path of a .pkl that looks like a type_weight dump but would touch `marker`, marker path)."""
    marker = tmp_path / "pwned"
    payload = {"routing": "soft_moa", "labels": {0: ["LoRA-Q"]}, "token_num": 3,
               "layers": {0: {"sum_weights": _RunsCode("touch %s" % marker)}}}
    path = tmp_path / "type_weight.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    return path, marker


def _assert_refused(message, path):
    assert str(path) in message and "posix.system" in message and "\n" not in message, message


def test_loader_refuses_code(crafted):
    from Utils import safe_pickle
    path, marker = crafted
    with pytest.raises(UserError) as e:
        safe_pickle.load(str(path))
    _assert_refused(str(e.value), path)
    assert not marker.exists()


def test_plot_and_checkpoint_loaders_refuse_code(crafted):
    from Utils.plot import load_pickle
    from Utils.train_checkpoint import load_train_checkpoint
    path, marker = crafted
    for load in (lambda: load_pickle(str(path), "type"), lambda: load_train_checkpoint(str(path))):
        with pytest.raises(UserError) as e:
            load()
        _assert_refused(str(e.value), path)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "getattr"), ("os", "system"),
                                         ("subprocess", "Popen"), ("numpy", "load"), ("collections", "Counter")])
def test_only_the_listed_globals_are_admitted(tmp_path, module, name):
    from Utils import safe_pickle
    path = tmp_path / "g.pkl"
    path.write_bytes(b"\x80\x04c%s\n%s\n." % (module.encode(), name.encode()))   # GLOBAL module name, STOP
    with pytest.raises(UserError, match="%s.%s" % (module, name)):
        safe_pickle.load(str(path))


def test_plot_cli_refuses_code(crafted, tmp_path):
    path, marker = crafted
    res = subprocess.run([sys.executable, "-m", "Utils.plot", "type_weight", "--pkl", str(path), "--out",
                          str(tmp_path / "heat.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    _assert_refused(err[0], path)
    assert not marker.exists() and not (tmp_path / "heat.png").exists()


def test_math_resume_refuses_code(crafted, tmp_path):
    """A real run up to the point where it reads the --resume checkpoint (a tiny base and data are needed)."""
    from Models.tiny_checkpoint import make_tiny_checkpoint
    path, marker = crafted
    ckpt = str(tmp_path / "llama")
    make_tiny_checkpoint(ckpt, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": "%d + 1?" % a, "input": "", "output": str(a + 1),
                                 "answer": str(a + 1)} for a in range(4)]))
    res = subprocess.run([sys.executable, "Math.py", "--llama_path", ckpt, "--data_path", str(data),
                          "--output_dir", str(tmp_path / "out"), "--lora_layers", "0-2", "--batch_size", "2",
                          "--max_seq_len", "64", "--progress", "false", "--resume", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    _assert_refused(err[0], path)
    assert not marker.exists()


def test_training_checkpoint_round_trips(tmp_path):
    """Everything Math.py puts in a checkpoint: arrays, RNG states (Python and numpy), numpy scalars, dicts of
    lists, None, floats, strings; plus sets, OrderedDict and protocol-5 arrays a user's tool may have written."""
    from Utils.train_checkpoint import capture_rng, load_train_checkpoint, save_train_checkpoint
    random.seed(3)
    np.random.seed(4)
    rng = np.random.default_rng(0)
    adapters = {"llama.layers.0.attention.lora_Q.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32)}
    payload = {"adapters": adapters, "rng": capture_rng(),
               "optimizer": {"step": 7, "m": {k: v * 0.1 for k, v in adapters.items()}, "lr": np.float64(1e-3),
                             "betas": (0.9, 0.95), "count": np.int64(12)},
               "state": {"epoch": 1, "best_val": float("inf"), "stopped": ""},
               "config": {"lora_layers": [0, 1], "lr": None, "data_path": "x.json"},
               "log_lines": ['{"kind": "train"}'], "extra": collections.OrderedDict(a={1, 2}, b=frozenset([3]))}
    path = str(tmp_path / "checkpoint-last.pkl")
    save_train_checkpoint(path, payload)
    back = load_train_checkpoint(path)
    assert back["rng"]["python"] == payload["rng"]["python"]
    for got, want in zip(back["rng"]["numpy"], payload["rng"]["numpy"]):
        assert np.array_equal(got, want) if isinstance(want, np.ndarray) else got == want
    np.testing.assert_array_equal(back["adapters"][next(iter(adapters))], next(iter(adapters.values())))
    assert back["optimizer"]["lr"] == np.float64(1e-3) and type(back["optimizer"]["count"]) is np.int64
    assert back["state"] == payload["state"] and back["config"] == payload["config"]
    assert back["extra"] == payload["extra"] and isinstance(back["extra"], collections.OrderedDict)
    with open(path, "wb") as f:
        pickle.dump(dict(back, adapters={"w": np.arange(6.0).reshape(2, 3)}), f, protocol=5)
    np.testing.assert_array_equal(load_train_checkpoint(path)["adapters"]["w"], np.arange(6.0).reshape(2, 3))


def test_corrupt_files_are_one_line_errors(tmp_path):
    from Utils import safe_pickle
    for i, content in enumerate((b"", b"not a pickle", pickle.dumps([1, 2])[:-3])):
        path = tmp_path / ("c%d.pkl" % i)
        path.write_bytes(content)
        with pytest.raises(UserError, match="not a readable"):
            safe_pickle.load(str(path))
