"""Layer ranges past the model (issue 13 §2): `--lora_layers 0-40` on a 2-layer model is a one-line error naming
the flag, the range and the layer count — through Math.py, `from_pretrained(..., lora_layers=...)` and an
adapter_params.json — for the LoRA, prompt and parallel-adapter ranges alike."""
import json

import pytest

from Utils.errors import UserError

FLAGS = ("lora_layers", "prompt_layers", "p_adapter_layers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Meta checkpoint with the real tokenizer, and a small training file."""
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = tmp_path_factory.mktemp("ranges")
    make_tiny_checkpoint(str(d / "ckpt"), dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    records = [{"instruction": "What is %d plus 1?" % a, "input": "", "output": "The answer is %d." % (a + 1),
                "answer": str(a + 1)} for a in range(8)]
    (d / "train.json").write_text(json.dumps(records))
    return d


def _math_error(capsys, argv):
    import Math
    with pytest.raises(SystemExit) as e:
        Math.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("spec", ["0-40", "1-3", "0-1,40-40"])
def test_math_py_refuses_a_range_past_the_model(tiny, tmp_path, capsys, flag, spec):
    """The training path (not --dry_run): nothing is trained, nothing is written."""
    out = tmp_path / "out"
    err = _math_error(capsys, ["--llama_path", str(tiny / "ckpt"), "--data_path", str(tiny / "train.json"),
                               "--output_dir", str(out), "--batch_size", "2", "--max_steps", "1",
                               "--progress", "false", "--" + flag, spec])
    bad = [p for p in spec.split(",") if int(p.split("-")[1]) > 2][0]
    assert ("--%s:" % flag) in err and repr(bad) in err and "2 layers" in err, err
    assert not (out / "checkpoint-last.pkl").exists() and not (out / "adapter").exists()


def test_math_py_dry_run_names_the_flag(tiny, capsys):
    err = _math_error(capsys, ["--llama_path", str(tiny / "ckpt"), "--dry_run", "--prompt_layers", "0-40"])
    assert "--prompt_layers:" in err and "'0-40'" in err and "2 layers" in err, err


def test_math_py_accepts_the_full_range(tiny, capsys):
    import Math
    assert Math.main(["--llama_path", str(tiny / "ckpt"), "--dry_run", "--lora_layers", "0-2",
                      "--prompt_layers", "1-2", "--p_adapter_layers", "0-0"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["trainable_params"] > 0


@pytest.mark.parametrize("flag", FLAGS)
def test_from_pretrained_keyword(tiny, flag):
    from Models.llama_adapter import LLaMA_adapter
    with pytest.raises(UserError) as e:
        LLaMA_adapter.from_pretrained(str(tiny / "ckpt"), **{flag: "0-40"})
    msg = str(e.value)
    assert msg.startswith(flag + ":") and "'0-40'" in msg and "2 layers" in msg and "\n" not in msg, msg


@pytest.mark.parametrize("flag", FLAGS)
def test_adapter_params_json_names_the_file(tiny, tmp_path, flag):
    from Models.llama_adapter import LLaMA_adapter
    from Utils.checkpoint_io import write_torch_pth
    write_torch_pth(str(tmp_path / "adapter.pth"), {})
    params = {"routing": "soft_moe", "lora_layers": "0-2", "lora_rank": 4, "lora_targets": "Q,V"}
    params[flag] = "0-40"
    (tmp_path / "adapter_params.json").write_text(json.dumps(params))
    with pytest.raises(UserError) as e:
        LLaMA_adapter.from_pretrained(str(tiny / "ckpt"), adapter_path=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "adapter_params.json") in msg and (flag + ":") in msg and "'0-40'" in msg \
        and "2 layers" in msg, msg


def test_parse_layers_bounds():
    from Models.model_args import parse_layers
    assert parse_layers("0-8,24-32", 32) == tuple(range(8)) + tuple(range(24, 32))
    assert parse_layers("0-0", 2) == () and parse_layers("", 2) == () and parse_layers("0-2", 2) == (0, 1)
    for spec in ("0-3", "3-3,0-1", "5-5"):
        with pytest.raises(UserError, match="2 layers"):
            parse_layers(spec, 2, "lora_layers")
    with pytest.raises(UserError, match="layer 2 is out of range"):
        parse_layers((0, 2), 2, "lora_layers")
    with pytest.raises(UserError, match="negative"):
        parse_layers((-1, 0), 2, "lora_layers")
