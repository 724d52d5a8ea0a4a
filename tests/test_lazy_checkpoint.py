"""Reading and writing checkpoints one tensor at a time (what upcycle.py streams through): the lazy .pth reader
equals the eager one (torch's own files as oracle, in a subprocess), model-parallel Meta shards merge lazily, a lazy
tensor reads only its own bytes, safetensors streams LazyTensors block by block (and refuses blocks that do not add
up), and our own layout in safetensors shards loads through read_checkpoint / from_pretrained."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT
from Models.checkpoints import load_meta_checkpoint, read_checkpoint
from Utils.checkpoint_io import (Bf16Bits, LazyTensor, bf16_bits_to_float32, read_safetensors, read_torch_pth,
                                 to_bf16_bits, write_safetensors, write_torch_pth)
from Utils.errors import UserError
from Models.tiny_checkpoint import make_tiny_checkpoint

RNG = np.random.default_rng(3)
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, tokenizer=False)


def _state():
    return {"w": RNG.standard_normal((6, 5)).astype(np.float32),
            "b": Bf16Bits(to_bf16_bits(RNG.standard_normal((4, 3)).astype(np.float32))),
            "ids": np.arange(12, dtype=np.int64).reshape(3, 4), "h": RNG.standard_normal(7).astype(np.float16),
            "scalar": np.array(2.5, np.float32)}


def test_lazy_pth_equals_eager_and_knows_dtypes(tmp_path):
    path = str(tmp_path / "x.pth")
    write_torch_pth(path, _state())
    eager, lazy = read_torch_pth(path), read_torch_pth(path, lazy=True)
    assert list(lazy) == list(eager)
    assert {k: v.dtype for k, v in lazy.items()} == {"w": "float32", "b": "bfloat16", "ids": "int64",
                                                      "h": "float16", "scalar": "float32"}
    for k in eager:
        got = lazy[k].load()
        assert got.dtype == eager[k].dtype and got.shape == eager[k].shape == lazy[k].shape, k
        np.testing.assert_array_equal(got, eager[k], err_msg=k)


def test_lazy_pth_reads_torch_views_and_only_its_own_bytes(tmp_path):
    """torch.save in a subprocess (a missing torch FAILS): transposed and sliced views of one storage, bf16, a
    Parameter; then the file is cut after the first storage — tensors of that storage still load, the others fail
    with a one-line error naming the file."""
    path, ref = str(tmp_path / "theirs.pth"), str(tmp_path / "ref.npz")
    code = textwrap.dedent("""
        import sys, numpy as np, torch
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 6, generator=g)
        sd = {"fp32": x, "transposed": x.t(), "rows": x[1:3], "bf16": torch.randn(5, 3, generator=g).bfloat16(),
              "param": torch.nn.Parameter(torch.randn(2, generator=g))}
        torch.save(sd, sys.argv[1])
        np.savez(sys.argv[2], **{k: v.detach().float().numpy() for k, v in sd.items()})
    """)
    r = subprocess.run([sys.executable, "-c", code, path, ref], capture_output=True, text=True)
    assert r.returncode == 0, "torch is required for this oracle:\n" + r.stderr[-2000:]
    want = dict(np.load(ref))
    lazy = read_torch_pth(path, lazy=True)
    for k, v in want.items():
        np.testing.assert_array_equal(lazy[k].load(), v, err_msg=k)
    assert lazy["bf16"].dtype == "bfloat16" and lazy["transposed"].shape == (6, 4)

    mine = str(tmp_path / "mine.pth")
    write_torch_pth(mine, {"a": want["fp32"], "b": want["bf16"]})
    lazy = read_torch_pth(mine, lazy=True)
    import zipfile
    with zipfile.ZipFile(mine) as zf:
        info = zf.getinfo("mine/data/1")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    with open(mine, "r+b") as f:   # overwrite storage 1's bytes: storage 0 must not notice
        f.seek(start)
        f.write(b"\xff" * 8)
    np.testing.assert_array_equal(lazy["a"].load(), want["fp32"])
    assert not np.array_equal(lazy["b"].load(), bf16_bits_to_float32(to_bf16_bits(want["bf16"])))
    with open(mine, "r+b") as f:   # cut the file inside storage 1: "a" still loads, "b" is a one-line error
        f.truncate(start + 4)
    np.testing.assert_array_equal(lazy["a"].load(), want["fp32"])
    with pytest.raises(UserError, match="mine.pth: mine/data/1 is truncated") as e:
        lazy["b"].load()
    assert "\n" not in str(e.value)


def test_lazy_meta_shards_merge(tmp_path):
    full = make_tiny_checkpoint(str(tmp_path), "meta", dtype="bfloat16", **TINY)
    eager = load_meta_checkpoint(str(tmp_path))
    lazy = load_meta_checkpoint(str(tmp_path), lazy=True)
    assert lazy["norm.weight"].dtype == "bfloat16"
    assert all(np.array_equal(lazy[k].load(), eager[k]) and lazy[k].load().dtype == np.float32 for k in full)
    os.remove(tmp_path / "consolidated.00.pth")
    axis = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}
    for r in range(2):
        shard = {k: np.array_split(v, 2, axis=axis[k.split(".")[-2]])[r] if k.split(".")[-2] in axis else v
                 for k, v in full.items()}
        write_torch_pth(str(tmp_path / ("consolidated.%02d.pth" % r)), shard)
    lazy = load_meta_checkpoint(str(tmp_path), lazy=True)
    for k in full:
        assert lazy[k].shape == full[k].shape, k
        np.testing.assert_array_equal(lazy[k].load(), full[k], err_msg=k)


def test_safetensors_streams_lazy_blocks(tmp_path):
    a = RNG.standard_normal((3, 4)).astype(np.float32)
    calls = []

    def block(scale):
        def f():
            calls.append(scale)
            return a * scale
        return f
    stacked = LazyTensor.from_chunks((9, 4), [block(1.0), block(2.0), block(3.0)])
    np.testing.assert_array_equal(stacked.load(), np.concatenate([a, 2 * a, 3 * a]))
    calls.clear()
    sizes = []
    for dtype in ("float32", "bfloat16", "float16"):
        path = str(tmp_path / ("s_%s.safetensors" % dtype))
        write_safetensors(path, {"stacked": stacked, "plain": a, "lazy": LazyTensor(a.shape, lambda: a)}, dtype=dtype,
                          progress=sizes.append)
        back = read_safetensors(path)
        eager = str(tmp_path / ("e_%s.safetensors" % dtype))
        write_safetensors(eager, {"stacked": stacked.load(), "plain": a, "lazy": a}, dtype=dtype)
        assert open(path, "rb").read() == open(eager, "rb").read()   # byte-identical to the eager writer
        assert back["stacked"].shape == (9, 4) and read_safetensors(path, lazy=True)["lazy"].dtype == dtype
    assert calls == [1.0, 2.0, 3.0] * 3 + [1.0, 2.0, 3.0] * 3   # each block read once per write (+ the eager load)
    assert sum(sizes[:5]) == (9 + 3 + 3) * 4 * 4


def test_safetensors_refuses_blocks_that_do_not_fit(tmp_path):
    short = LazyTensor.from_chunks((4, 2), [lambda: np.zeros((3, 2), np.float32)])
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="blocks hold 24 bytes"):
        write_safetensors(path, {"t": short})
    assert os.listdir(tmp_path) == []   # the temporary file is gone, nothing half-written
    with pytest.raises(UserError, match="only floating-point"):
        write_safetensors(path, {"t": LazyTensor((2,), lambda: np.zeros(2, np.int64), "int64")})


def test_our_layout_in_safetensors_loads(tmp_path, jt):
    """params.json + model-*-of-*.safetensors (our names) is read by read_checkpoint and from_pretrained."""
    import shutil
    src = str(tmp_path / "meta")
    state = make_tiny_checkpoint(src, "meta", **dict(TINY, vocab_size=6400))
    out = tmp_path / "ours"
    out.mkdir()
    for name in ("params.json", "tokenizer.json", "tokenizer_config.json"):
        tok_dir = os.path.join(ROOT, "data", "minimind_tokenizer")
        shutil.copyfile(os.path.join(src if name == "params.json" else tok_dir, name), str(out / name))
        if name != "params.json":
            shutil.copyfile(os.path.join(tok_dir, name), os.path.join(src, name))
    names = list(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = "model-%05d-of-00002.safetensors" % (i + 1)
        write_safetensors(str(out / fname), {k: state[k] for k in part})
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    args, lazy = read_checkpoint(str(out))
    assert all(isinstance(v, LazyTensor) for v in lazy.values()) and set(lazy) == set(state)
    assert all(np.array_equal(lazy[k].load(), state[k]) for k in state)
    from Models import LLaMA_adapter
    tok = np.arange(1, 9).reshape(1, 8)
    ref = LLaMA_adapter.from_pretrained(src).logits(tok)
    assert np.array_equal(ref, LLaMA_adapter.from_pretrained(str(out)).logits(tok))
