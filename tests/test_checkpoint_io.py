"""Checkpoint formats (docs/moa.md §1, D11): .pth and safetensors round trips, torch as oracle, HF↔Meta, strict load."""
import os
import struct
import zipfile

import numpy as np
import pytest

from Models.model_args import ModelArgs
from Models.checkpoints import hf_from_meta, load_hf_checkpoint, load_meta_checkpoint, meta_from_hf, strict_load
from Utils.checkpoint_io import (Bf16Bits, bf16_bits_to_float32, read_safetensors, read_torch_pth, to_bf16_bits,
                                 write_safetensors, write_torch_pth)
from Utils.errors import UserError
from conftest import require
from Models.tiny_checkpoint import main as tiny_main
from Models.tiny_checkpoint import make_tiny_checkpoint

RNG = np.random.default_rng(0)
F32 = RNG.standard_normal((5, 8)).astype(np.float32)
BF = RNG.standard_normal((3, 4)).astype(np.float32)
I64 = np.array([[0, -3], [2**40, 7]], dtype=np.int64)
F16 = RNG.standard_normal(6).astype(np.float16)
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, tokenizer=False)


def _sample_state():
    return {"w": F32, "b": Bf16Bits(to_bf16_bits(BF)), "ids": I64, "h": F16, "scalar": np.array(1.5, np.float32)}


def _data_offsets(path):
    """Where each zip record's bytes start, read from the local headers (the central directory's extra may differ)."""
    raw = open(path, "rb").read()
    with zipfile.ZipFile(path) as zf:
        out = {}
        for info in zf.infolist():
            n, e = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            out[info.filename] = info.header_offset + 30 + n + e
        return out


# ---------------------------------------------------------------- .pth
def test_bf16_bits_round_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf], np.float32)  # two exact ties
    assert bf16_bits_to_float32(to_bf16_bits(x)).tolist() == [1.0, 1.0, 1.0 + 2**-6, -2.5, np.inf]
    assert np.isnan(bf16_bits_to_float32(to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_pth_round_trip(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    write_torch_pth(path, _sample_state())
    back = read_torch_pth(path)
    assert list(back) == ["w", "b", "ids", "h", "scalar"]
    np.testing.assert_array_equal(back["w"], F32)
    assert back["b"].dtype == np.float32  # bf16 comes back as float32 values
    np.testing.assert_allclose(back["b"], BF, rtol=2**-8)
    np.testing.assert_array_equal(back["b"], bf16_bits_to_float32(to_bf16_bits(BF)))
    assert back["ids"].dtype == np.int64 and back["ids"].tolist() == I64.tolist()
    assert back["h"].dtype == np.float16 and np.array_equal(back["h"], F16)
    assert back["scalar"].shape == () and float(back["scalar"]) == 1.5
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt.pth"]  # the temporary file was renamed away


def test_pth_dtype_option_and_alignment(tmp_path):
    path = str(tmp_path / "consolidated.00.pth")
    write_torch_pth(path, {"w": F32, "ids": I64}, dtype="bfloat16")
    back = read_torch_pth(path)
    np.testing.assert_array_equal(back["w"], bf16_bits_to_float32(to_bf16_bits(F32)))
    assert back["ids"].dtype == np.int64  # integer tensors are never converted
    offsets = _data_offsets(path)
    assert "consolidated.00/version" in offsets and "consolidated.00/byteorder" in offsets
    assert all(off % 64 == 0 for off in offsets.values())


def test_pth_read_by_jittor(tmp_path, jt):
    path = str(tmp_path / "x.pth")
    write_torch_pth(path, _sample_state())
    loaded = jt.load(path)  # Jittor's own torch-free reader
    np.testing.assert_array_equal(loaded["w"].numpy(), F32)
    np.testing.assert_array_equal(loaded["b"].float32().numpy(), bf16_bits_to_float32(to_bf16_bits(BF)))


def test_truncated_or_foreign_pth_is_a_user_error(tmp_path):
    path = str(tmp_path / "cut.pth")
    write_torch_pth(path, {"w": F32})
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(UserError, match="cut.pth: not a readable PyTorch checkpoint") as e:
        read_torch_pth(path)
    assert "\n" not in str(e.value)
    evil = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(evil, "w") as zf:  # a pickle that would call os.system must be refused
        zf.writestr("evil/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.")
    with pytest.raises(UserError, match="unsupported object os.system"):
        read_torch_pth(evil)
    with pytest.raises(UserError, match="missing.pth: not found"):
        read_torch_pth(str(tmp_path / "missing.pth"))


def test_torch_oracle(tmp_path):
    torch = require("torch")
    ours = str(tmp_path / "ours.pth")
    write_torch_pth(ours, _sample_state())
    t = torch.load(ours, weights_only=True)  # the safe loader accepts exactly the globals we emit
    np.testing.assert_array_equal(t["w"].numpy(), F32)
    assert t["b"].dtype == torch.bfloat16 and t["scalar"].shape == ()
    assert torch.equal(t["b"], torch.from_numpy(BF).bfloat16())  # same rounding as torch
    assert t["ids"].tolist() == I64.tolist() and t["h"].dtype == torch.float16

    x = torch.randn(4, 6)
    saved = {"fp32": x, "bf16": torch.randn(7, 3).bfloat16(), "transposed": x.t(), "rows": x[1:3],
             "param": torch.nn.Parameter(torch.randn(2))}
    theirs = str(tmp_path / "theirs.pth")
    torch.save(saved, theirs)
    back = read_torch_pth(theirs)
    for k, v in saved.items():
        np.testing.assert_array_equal(back[k], v.detach().float().numpy(), err_msg=k)
    assert back["bf16"].dtype == np.float32


# ---------------------------------------------------------------- safetensors
def test_safetensors_round_trip(tmp_path):
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"w": F32, "ids": I64})
    back = read_safetensors(path)
    np.testing.assert_array_equal(back["w"], F32)
    assert back["ids"].tolist() == I64.tolist()
    write_safetensors(path, {"w": F32, "h": F16}, dtype="bfloat16")
    back = read_safetensors(path)
    np.testing.assert_array_equal(back["w"], bf16_bits_to_float32(to_bf16_bits(F32)))
    assert back["h"].dtype == np.float32  # converted to bf16 on the way out, widened on the way in
    (n,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert n % 8 == 0


def test_safetensors_oracle(tmp_path):
    st = require("safetensors.numpy")
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"w": F32, "h": F16}, dtype=None)
    back = st.load_file(path)
    np.testing.assert_array_equal(back["w"], F32)
    np.testing.assert_array_equal(back["h"], F16)
    st.save_file({"a": F32, "b": I64}, path)
    back = read_safetensors(path)
    np.testing.assert_array_equal(back["a"], F32)
    assert back["b"].tolist() == I64.tolist()


def test_safetensors_bf16_torch_oracle(tmp_path):
    torch = require("torch")
    st = require("safetensors.torch")
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"w": F32}, dtype="bfloat16")
    assert torch.equal(st.load_file(path)["w"], torch.from_numpy(F32).bfloat16())
    st.save_file({"v": torch.from_numpy(BF).bfloat16()}, path)
    np.testing.assert_array_equal(read_safetensors(path)["v"], torch.from_numpy(BF).bfloat16().float().numpy())


def test_bad_safetensors_names_file_and_tensor(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(UserError, match="bad.safetensors: not a readable safetensors file"):
        read_safetensors(path)
    header = b'{"w":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}'
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(UserError, match=r"bad.safetensors: tensor 'w'"):
        read_safetensors(path)


# ---------------------------------------------------------------- Meta ↔ HF layout
def _args(**kw):
    p = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16)
    p.update(kw)
    return ModelArgs(**p)


def test_hf_permutation_is_inverted_exactly():
    args = _args()
    state = make_state(args)
    hf = hf_from_meta(state, args)
    assert "model.layers.1.mlp.gate_proj.weight" in hf and "lm_head.weight" in hf
    assert not np.array_equal(hf["model.layers.0.self_attn.q_proj.weight"], state["layers.0.attention.wq.weight"])
    back = meta_from_hf(hf, args)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        meta_from_hf({"model.layers.0.mlp.extra.weight": F32}, args)


def test_hf_permutation_matches_transformers_convert_script():
    torch = require("torch")
    args = _args()
    w = RNG.standard_normal((args.n_kv_heads * args.head_dim, args.dim)).astype(np.float32)
    t = torch.from_numpy(w)  # transformers' convert_llama_weights_to_hf.permute, written out here as the oracle
    ref = t.view(args.n_kv_heads, t.shape[0] // args.n_kv_heads // 2, 2, t.shape[1]).transpose(1, 2)
    hf = hf_from_meta({"layers.0.attention.wk.weight": w}, args)["model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(hf, ref.reshape(t.shape).numpy())


def test_hf_layout_gives_same_attention_scores():
    """Interleaved RoPE on Meta weights and rotate-half RoPE on HF weights give identical q·k scores."""
    args, T = _args(), 5
    state = make_state(args)
    hf = hf_from_meta(state, args)
    x = RNG.standard_normal((T, args.dim)).astype(np.float64)
    hd = args.head_dim
    ang = np.arange(T)[:, None] * args.rope_theta ** (-np.arange(0, hd, 2) / hd)  # (T, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def meta_rope(v):  # (T, H, hd) consecutive pairs
        a, b = v[..., 0::2], v[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(v.shape)

    def hf_rope(v):  # (T, H, hd) first half / second half
        a, b = v[..., :hd // 2], v[..., hd // 2:]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate([a * c - b * s, a * s + b * c], -1)

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).reshape(T, args.n_heads, hd))
        k = rope((x @ wk.T).reshape(T, args.n_kv_heads, hd))
        return np.einsum("thd,shd->hts", q, np.repeat(k, args.n_heads // args.n_kv_heads, axis=1))
    meta = scores(state["layers.0.attention.wq.weight"], state["layers.0.attention.wk.weight"], meta_rope)
    hf_s = scores(hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"], hf_rope)
    np.testing.assert_allclose(hf_s, meta, rtol=1e-10, atol=1e-12)


def make_state(args):
    from Models.tiny_checkpoint import random_state
    return random_state(args, seed=1)


# ---------------------------------------------------------------- tiny checkpoints
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_checkpoint_formats_load_identically(tmp_path, dtype):
    meta = make_tiny_checkpoint(str(tmp_path / "meta"), "meta", dtype=dtype, use_scaled_rope=True, **TINY)
    hf = make_tiny_checkpoint(str(tmp_path / "hf"), "hf", dtype=dtype, use_scaled_rope=True, **TINY)
    a = load_meta_checkpoint(str(tmp_path / "meta"))
    b = load_hf_checkpoint(str(tmp_path / "hf"))
    assert set(a) == set(b) == set(meta) and len(meta) == 3 + 9 * TINY["n_layers"]
    for k in meta:
        np.testing.assert_array_equal(a[k], meta[k], err_msg=k)
        np.testing.assert_array_equal(b[k], hf[k], err_msg=k)
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fp32 = make_tiny_checkpoint(str(tmp_path / "ref"), "meta", dtype="float32", **TINY)
    for k in meta:
        np.testing.assert_allclose(meta[k], fp32[k], rtol=2**-8, atol=0)
    assert 0.5 < meta["norm.weight"].mean() < 1.5 and meta["norm.weight"].std() > 0.01
    am = ModelArgs.from_params_json(str(tmp_path / "meta" / "params.json"))
    ah = ModelArgs.from_hf_config(str(tmp_path / "hf" / "config.json"))
    assert am.use_scaled_rope and ah.use_scaled_rope and am.ffn_hidden_dim == ah.ffn_hidden_dim
    assert a["layers.0.feed_forward.w1.weight"].shape == (am.ffn_hidden_dim, am.dim)


def test_meta_model_parallel_shards_are_merged(tmp_path):
    full = make_tiny_checkpoint(str(tmp_path), "meta", **TINY)
    os.remove(tmp_path / "consolidated.00.pth")
    axis = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}
    for r in range(2):
        shard = {k: np.array_split(v, 2, axis=axis[k.split(".")[-2]])[r] if k.split(".")[-2] in axis else v
                 for k, v in full.items()}
        write_torch_pth(str(tmp_path / ("consolidated.%02d.pth" % r)), shard)
    merged = load_meta_checkpoint(str(tmp_path))
    assert all(np.array_equal(merged[k], full[k]) for k in full)
    with pytest.raises(UserError, match="no consolidated"):
        load_meta_checkpoint(str(tmp_path / "nowhere"))


def test_tiny_checkpoint_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    tiny_main(["--out_dir", out, "--format", "hf", "--dim", "32", "--vocab_size", "256", "--tokenizer", "false"])
    assert capsys.readouterr().out.strip() == os.path.abspath(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------- strict_load
def test_strict_load_errors_name_key_and_shapes(jt):
    lin = jt.nn.Linear(8, 4)
    good = {"weight": np.ones((4, 8), np.float32), "bias": np.zeros(4, np.float32)}
    with pytest.raises(UserError, match=r"^ck.pth: missing tensor 'bias'$"):
        strict_load(lin, {"weight": good["weight"]}, "ck.pth")
    with pytest.raises(UserError, match=r"ck.pth: unexpected tensor 'extra'"):
        strict_load(lin, dict(good, extra=F32), "ck.pth")
    with pytest.raises(UserError, match=r"ck.pth: tensor 'weight' has shape \(8, 4\) but the model expects \(4, 8\)"):
        strict_load(lin, dict(good, weight=np.ones((8, 4), np.float32)), "ck.pth")
    seq = jt.nn.Sequential(jt.nn.Linear(8, 4), jt.nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"missing tensor '0.weight' \(and 3 more\)"):
        strict_load(seq, {}, "ck")


def test_strict_load_keeps_parameter_dtype(jt):
    lin = jt.nn.Linear(8, 4)
    w64 = RNG.standard_normal((4, 8))
    strict_load(lin, {"weight": w64, "bias": np.arange(4, dtype=np.float64)}, "ck")
    assert str(lin.weight.dtype) == "float32" and str(lin.bias.dtype) == "float32"
    np.testing.assert_allclose(lin.weight.numpy(), w64, rtol=1e-6)
    bf = jt.array(F32[:4]).bfloat16()  # Jittor's load_state_dict would turn the weight into bf16 here
    strict_load(lin, {"weight": bf, "bias": np.zeros(4, np.float32)}, "ck")
    assert str(lin.weight.dtype) == "float32"
    np.testing.assert_array_equal(lin.weight.numpy(), bf.float32().numpy())
    np.testing.assert_allclose(lin.weight.numpy(), F32[:4], rtol=2**-7)  # Jittor's bf16 cast truncates


def test_strict_load_filters(jt):
    seq = jt.nn.Sequential(jt.nn.Linear(8, 4), jt.nn.Linear(4, 2))
    before = seq[1].weight.numpy().copy()
    base = {"0.weight": np.ones((4, 8)), "0.bias": np.ones(4)}
    strict_load(seq, base, "ck", allow_missing=lambda k: k.startswith("1."))
    assert seq[0].weight.numpy().min() == 1 and np.array_equal(seq[1].weight.numpy(), before)
    strict_load(seq, {"1.bias": np.full(2, 3.0)}, "ck", keys={"1.bias"})
    assert seq[1].bias.numpy().tolist() == [3.0, 3.0]
    with pytest.raises(UserError, match="missing tensor '0.bias'"):
        strict_load(seq, {"0.weight": np.ones((4, 8))}, "ck", keys=lambda k: k.startswith("0."))
