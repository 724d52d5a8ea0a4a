"""Every entry point's flags (decision D3 and Utils/cli.py): each boolean flag takes the bare form (`--flag` =
true) and `--flag true|false|1|0|yes|no`; anything else, and any other parse error, is one line naming the flag."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from Utils.errors import UserError


def _bench(name):
    spec = importlib.util.spec_from_file_location("bench_" + name, os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers():
    """(CLI name, parser factory, the arguments it needs besides the flag under test)."""
    import demo
    import inference
    import Math
    from Models import tiny_checkpoint
    from Utils import plot
    return [
        ("Math.py", Math.build_parser, []),
        ("inference.py", inference.build_parser, ["--save_path", "out"]),
        ("demo.py", demo.build_demo_parser, []),
        ("demo.py generate", demo.build_generate_parser, []),
        ("Utils/plot.py type_weight", lambda: plot.build_parser(), ["type_weight", "--pkl", "a", "--out", "b"]),
        ("Models/tiny_checkpoint.py", tiny_checkpoint.build_parser, ["--out_dir", "x"]),
        ("bench/generate.py", lambda: _bench("generate").build_parser(), []),
        ("bench/train_step.py", lambda: _bench("train_step").build_parser(), []),
        ("bench/memory.py", lambda: _bench("memory").build_parser(), []),
        ("bench/sparse_scaling.py", lambda: _bench("sparse_scaling").build_parser(), []),
    ]


PARSERS = _parsers()


def _bool_flags(parser):
    """Every flag whose value is a boolean: made by add_bool, or a store_true/store_false switch (not allowed)."""
    from Utils.cli import is_bool_action
    import argparse
    out = []
    for action in parser._actions:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out.append(("switch", action))
        elif is_bool_action(action) or isinstance(action.default, bool):
            out.append(("bool", action))
    return out


@pytest.mark.parametrize("name,factory,extra", PARSERS, ids=[p[0] for p in PARSERS])
def test_every_boolean_flag_takes_both_forms(name, factory, extra):
    from Utils.cli import is_bool_action
    parser = factory()
    flags = _bool_flags(parser)
    for kind, action in flags:
        flag = action.option_strings[0]
        assert kind == "bool" and is_bool_action(action), "%s %s is not an add_bool flag" % (name, flag)
        dest = action.dest
        assert getattr(parser.parse_args(extra + [flag]), dest) is True, (name, flag)
        for word, value in (("true", True), ("false", False), ("1", True), ("0", False), ("YES", True),
                            ("no", False)):
            assert getattr(parser.parse_args(extra + [flag, word]), dest) is value, (name, flag, word)
        with pytest.raises(UserError, match=flag):
            parser.parse_args(extra + [flag, "maybe"])


def test_the_parsers_hold_the_boolean_flags_they_document():
    """The parametrised test above must not pass vacuously: the flags users pass are really there."""
    found = {name: sorted(a.option_strings[0] for _, a in _bool_flags(f())) for name, f, _ in PARSERS}
    assert {"--dry_run", "--progress", "--w_bias", "--hydra_moe", "--p_adapter_hydra", "--const_threshold",
            "--noisy_router"} <= set(found["Math.py"])
    assert found["inference.py"] == ["--dump_type_weight", "--score_only", "--time_gen"]
    assert found["Models/tiny_checkpoint.py"] == ["--tokenizer", "--use_scaled_rope"]
    assert {"--peer", "--count_compiles", "--no_machine", "--noisy_router"} <= set(found["bench/generate.py"])
    assert {"--peer", "--count_compiles", "--no_machine"} <= set(found["bench/train_step.py"])


@pytest.mark.parametrize("name,factory,extra", PARSERS, ids=[p[0] for p in PARSERS])
def test_parse_errors_are_user_errors(name, factory, extra):
    with pytest.raises(UserError, match="--no_such_flag"):
        factory().parse_args(extra + ["--no_such_flag", "1"])


def test_bench_adapter_booleans_keep_none_until_given():
    """bench/ copies Math.py's adapter flags with default None (so --preset can fill them): both forms work."""
    parser = _bench("train_step").build_parser()
    assert parser.parse_args([]).noisy_router is None
    assert parser.parse_args(["--noisy_router"]).noisy_router is True
    assert parser.parse_args(["--noisy_router", "false"]).noisy_router is False


def test_math_dry_run_bare_flag(tmp_path):
    """`python Math.py --dry_run` (the form the MoA issue used) runs; before, argparse wanted a value."""
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                      "vocab_size": 128256, "multiple_of": 32}))
    res = subprocess.run([sys.executable, "Math.py", "--llama_path", str(tmp_path), "--dry_run", "--lora_layers",
                          "0-2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["trainable_params"] > 0 and last["routing"] == "soft_moa"


def test_bad_boolean_on_the_command_line_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "Models.tiny_checkpoint", "--out_dir", str(tmp_path / "c"),
                          "--tokenizer", "maybe"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--tokenizer" in err[0] and "maybe" in err[0], err
