"""MoA_Transformers adapter files (docs/moa_transformers_notes.md §2, §6): a file whose keys and shapes are exactly the
note's, written with our torch-free writer in bf16, loads through `from_pretrained(..., adapter_path=...)` onto an
HF-layout Qwen3 base: configuration read off the shapes, every tensor where it belongs (Q/K lora_B rows permuted to
our interleaved RoPE), and the logits equal a numpy forward of their model (HF layout, rotate-half RoPE, router and Γ
on the attention-normed state)."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT

MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
D, L, H, HKV, HD, F, V = 32, 2, 4, 2, 16, 48, 6400        # H·hd = 64 ≠ d: Qwen3's head_dim set apart
R, S = 8, 16
PREFIX = "base_model.model.model.layers.%d."


@pytest.fixture(scope="module")
def base(jt, tmp_path_factory):
    """A random Qwen3-shaped base exported to HF's layout by our own code (no torch needed)."""
    from Models import LLaMA_adapter
    from Models.checkpoints import export_hf
    from Models.model_args import ModelArgs
    from Models.tokenizer import load_tokenizer
    from Utils.runtime import seed_everything
    seed_everything(3)
    args = ModelArgs(dim=D, n_layers=L, n_heads=H, n_kv_heads=HKV, head_dim=HD, qk_norm=True, intermediate_size=F,
                     vocab_size=V, tie_word_embeddings=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=32)
    model = LLaMA_adapter(args, load_tokenizer(MINIMIND))
    rng = np.random.default_rng(3)
    for name, p in model.llama.named_parameters():
        if len(p.shape) == 1:
            p.update(jt.array((1.0 + 0.2 * rng.standard_normal(p.shape)).astype(np.float32)))
    d = str(tmp_path_factory.mktemp("qwen3"))
    export_hf(model, d, "qwen3")
    return d


def their_state(sparse, swi_x, seed=0):
    """{key: fp32 values (bf16-rounded)} in MoA_Transformers' names and shapes (note §2 table)."""
    from Utils.checkpoint_io import bf16_bits_to_float32, to_bf16_bits
    rng = np.random.default_rng(seed)
    n = 6
    shapes = {}
    for i in range(L):
        p = PREFIX % i
        lora = (("self_attn.lora_Q", (R, D), (H * HD, R)), ("self_attn.lora_K", (R, D), (HKV * HD, R)),
                ("self_attn.lora_V", (R, D), (HKV * HD, R)), ("self_attn.lora_O", (R, H * HD), (D, R)),
                ("mlp.lora_down", (R, F), (D, R)))
        for name, a_shape, b_shape in lora:
            shapes.update({p + name + ".lora_A.weight": a_shape, p + name + ".lora_B.weight": b_shape})
        shapes.update({p + "p_adapter.down_proj.weight": (S, D), p + "p_adapter.down_proj.bias": (S,),
                       p + "p_adapter.up_proj.weight": (D, S), p + "p_adapter.up_proj.bias": (D,)})
        if swi_x:
            h = swi_x * n
            shapes.update({p + "adapter_type_router.w1.weight": (h, D), p + "adapter_type_router.w1.bias": (h,),
                           p + "adapter_type_router.w2.weight": (n, h), p + "adapter_type_router.w2.bias": (n,),
                           p + "adapter_type_router.w3.weight": (h, D), p + "adapter_type_router.w3.bias": (h,)})
        else:
            shapes.update({p + "adapter_type_router.weight": (n, D), p + "adapter_type_router.bias": (n,)})
        if sparse:
            shapes.update({p + "adapter_threshold_fn.weight": (1, D), p + "adapter_threshold_fn.bias": (1,)})
    return {k: bf16_bits_to_float32(to_bf16_bits(0.3 * rng.standard_normal(s).astype(np.float32)))
            for k, s in shapes.items()}


def write_their_dir(d, state, peft_type="SOFTMOA"):
    from Utils.checkpoint_io import Bf16Bits, to_bf16_bits, write_torch_pth
    os.makedirs(d, exist_ok=True)
    write_torch_pth(os.path.join(d, "adapter_model.bin"), {k: Bf16Bits(to_bf16_bits(v)) for k, v in state.items()})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:   # their keys; rank/targets never reach the model
        json.dump({"auto_mapping": None, "base_model_name_or_path": "Qwen/Qwen3-8B", "bias": "none",
                   "inference_mode": True, "init_lora_weights": True, "lora_alpha": 16, "lora_dropout": 0.0,
                   "lora_rank": 16, "peft_type": peft_type, "revision": None, "task_type": "CAUSAL_LM",
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]},
                  f, indent=2, sort_keys=True)
    return d


# ------------------------------------------------------------------------------------------ numpy reference
def _rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def reference_logits(hf, their, tokens, sparse, swi_x):
    """Their Qwen3 decoder layer with MoA (note §3), HF weight layout and rotate-half RoPE, float64."""
    W = {k: v.astype(np.float64) for k, v in hf.items()}
    A = {k: v.astype(np.float64) for k, v in their.items()}
    B, T = tokens.shape
    x = W["model.embed_tokens.weight"][tokens]
    inv = 1.0 / (1e6 ** (np.arange(0, HD, 2) / HD))
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(v):                                                    # [B, T, h, hd]
        rot = np.concatenate([-v[..., HD // 2:], v[..., :HD // 2]], -1)
        return v * cos[None, :, None] + rot * sin[None, :, None]
    for i in range(L):
        p, a = "model.layers.%d." % i, PREFIX % i
        lin = (lambda name, v: v @ W[p + name + ".weight"].T)
        lora = (lambda name, v: v @ A[a + name + ".lora_A.weight"].T @ A[a + name + ".lora_B.weight"].T)
        xn = _rms(x, W[p + "input_layernorm.weight"])
        r = "adapter_type_router"
        if swi_x:
            z = (_silu(xn @ A[a + r + ".w1.weight"].T + A[a + r + ".w1.bias"]) * (xn @ A[a + r + ".w3.weight"].T
                 + A[a + r + ".w3.bias"])) @ A[a + r + ".w2.weight"].T + A[a + r + ".w2.bias"]
        else:
            z = xn @ A[a + r + ".weight"].T + A[a + r + ".bias"]
        w = 1.0 / (1.0 + np.exp(-z))                                # columns Q, K, V, O, DOWN, PA
        if sparse:
            t = xn @ A[a + "adapter_threshold_fn.weight"].T + A[a + "adapter_threshold_fn.bias"]
            g = 0.5 / (1.0 + np.exp(-t))
            w = w * (w - g >= 0)
        q = lin("self_attn.q_proj", xn) + w[..., 0:1] * lora("self_attn.lora_Q", xn)
        k = lin("self_attn.k_proj", xn) + w[..., 1:2] * lora("self_attn.lora_K", xn)
        v = lin("self_attn.v_proj", xn) + w[..., 2:3] * lora("self_attn.lora_V", xn)
        q = rope(_rms(q.reshape(B, T, H, HD), W[p + "self_attn.q_norm.weight"]))
        k = rope(_rms(k.reshape(B, T, HKV, HD), W[p + "self_attn.k_norm.weight"]))
        k, v = np.repeat(k, H // HKV, 2), np.repeat(v.reshape(B, T, HKV, HD), H // HKV, 2)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HD) + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("bhts,bshd->bthd", s / s.sum(-1, keepdims=True), v).reshape(B, T, H * HD)
        h = x + lin("self_attn.o_proj", o) + w[..., 3:4] * lora("self_attn.lora_O", o)
        hn = _rms(h, W[p + "post_attention_layernorm.weight"])
        act = _silu(lin("mlp.gate_proj", hn)) * lin("mlp.up_proj", hn)
        pa = _silu(hn @ A[a + "p_adapter.down_proj.weight"].T + A[a + "p_adapter.down_proj.bias"]) \
            @ A[a + "p_adapter.up_proj.weight"].T + A[a + "p_adapter.up_proj.bias"]
        x = h + lin("mlp.down_proj", act) + w[..., 4:5] * lora("mlp.lora_down", act) + w[..., 5:6] * pa
    x = _rms(x, W["model.norm.weight"])
    return x @ W["model.embed_tokens.weight"].T


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("sparse,swi_x", [(False, 4), (True, 4), (False, 0)], ids=["soft", "sparse", "soft_linear"])
def test_their_file_loads_where_it_belongs_and_matches_their_forward(base, tmp_path, sparse, swi_x):
    from Models import LLaMA_adapter
    from Utils.checkpoint_io import read_safetensors
    their = their_state(sparse, swi_x)
    d = write_their_dir(str(tmp_path / "adapter"), their, "SPARSEMOA" if sparse else "SOFTMOA")
    model = LLaMA_adapter.from_pretrained(base, adapter_path=d)
    a = model.args
    assert (a.routing, a.lora_rank, a.lora_alpha, a.swi_x, a.p_adapter_size, a.router_input, a.threshold_grad) == \
        ("sparse_moa" if sparse else "soft_moa", 8, 8, swi_x, 16, "normed", "none")
    assert a.lora_targets == ("Q", "K", "V", "O", "FFN_DOWN") and a.lora_layers == a.p_adapter_layers == (0, 1)
    assert not a.prompt_layers
    ours = dict(model.trainable_parameters())
    assert len(ours) == len(their)
    for key, value in their.items():
        i, rest = key[len("base_model.model.model.layers."):].split(".", 1)
        name = "llama.layers.%s.%s" % (i, rest.replace("self_attn.", "attention.").replace("mlp.lora_down",
                                                                                             "feed_forward.lora_DOWN"))
        got = ours[name].numpy()
        if name.endswith(("lora_Q.lora_B.weight", "lora_K.lora_B.weight")):
            # our head row 2j is their row j, our row 2j+1 their row hd/2 + j (interleaved vs rotate-half pairs)
            heads = value.reshape(-1, HD, R)
            want = np.stack([heads[:, :HD // 2], heads[:, HD // 2:]], 2).reshape(value.shape)
            assert not np.array_equal(got, value)
        else:
            want = value
        assert np.array_equal(got, want), name
    tokens = np.random.default_rng(1).integers(3, V, size=(2, 12))
    hf = read_safetensors(os.path.join(base, "model.safetensors"))
    want = reference_logits(hf, their, tokens, sparse, swi_x)
    got = model.logits(tokens)
    assert np.abs(got - want).max() <= 1e-4
    plain = LLaMA_adapter.from_pretrained(base).logits(tokens)
    assert np.abs(plain - want).max() > 1e-2                     # the adapters really changed the output


def test_bad_files_are_one_line_errors(base, tmp_path):
    from Models import LLaMA_adapter
    from Utils.errors import UserError
    their = their_state(False, 4)
    d = write_their_dir(str(tmp_path / "lora"), their, "LORA")
    with pytest.raises(UserError, match=r"adapter_config.json: peft_type 'LORA' is not a MoA_Transformers") as e:
        LLaMA_adapter.from_pretrained(base, adapter_path=d)
    assert "\n" not in str(e.value)
    bad = dict(their, **{PREFIX % 0 + "self_attn.q_proj.lora_A.default.weight": their[PREFIX % 0 +
                                                                                    "self_attn.lora_Q.lora_A.weight"]})
    d = write_their_dir(str(tmp_path / "odd"), bad)
    with pytest.raises(UserError, match=r"adapter_model.bin: key .*q_proj.* is not a MoA_Transformers"):
        LLaMA_adapter.from_pretrained(base, adapter_path=d)
    short = dict(their)
    short[PREFIX % 1 + "self_attn.lora_K.lora_B.weight"] = np.zeros((HD, R), np.float32)
    d = write_their_dir(str(tmp_path / "short"), short)
    with pytest.raises(UserError, match=r"lora_K.lora_B.weight has 16 rows, expected 2 heads × head_dim 16"):
        LLaMA_adapter.from_pretrained(base, adapter_path=d)
