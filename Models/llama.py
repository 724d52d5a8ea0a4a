"""LLaMA-3 / 3.1 transformer (docs/moa.md §1) in Jittor, with Meta's parameter names and the adapter insertion points of
§2.

Order as in Meta's model.py: RMSNorm, RoPE helpers, Attention (lazy KV cache), TransformerBlock, Transformer; the
FFN of each block (dense, or a mixture of experts) comes from `Models/ffn.py`. Switches in ModelArgs cover the other
HF families on the same blocks (q/k norm, q/k/v biases, a separate head_dim, tied embeddings). Adapters are attached
by `Models.moa.attach_adapters`; each block asks its `route` (built by the block's routing module) how to weight an
adapter's output, so attention and FFN code stay routing-agnostic.
"""
import math

import numpy as np

from Models.adapter_kernels import add_adapter, lora_projections, parallel_adapter_add, prompt_attention_add
from Models.adapters import prompt_attention, prompt_keys_values
from Models.ffn import is_moe, make_ffn
from Models.kernels import (batched_matmul, causal_softmax, causal_softmax_available, few_rows_matmul_t,
                            few_rows_projections, rms_norm, rope)
from Models.routing import build_route
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        self.eps = eps
        self.weight = jt.ones(dim)

    def execute(self, x):
        fused = rms_norm(x, self.weight, self.eps)   # fp32 on CPU: one kernel each way (Models/kernels.py)
        if fused is not None:
            return fused
        xf = x.float32()  # statistics in fp32 (docs/moa.md §1.2), cast back before the weight
        normed = xf * jt.rsqrt((xf * xf).mean(-1, keepdims=True) + self.eps)
        return normed.cast(x.dtype) * self.weight


def rope_frequencies(head_dim, theta, use_scaled_rope):
    """Base RoPE frequencies f_j = theta^(-2j/hd), with Llama-3.1's piecewise rescaling (docs/moa.md §1.3)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2)[: head_dim // 2].astype(np.float64) / head_dim))
    if not use_scaled_rope:
        return freqs.astype(np.float32)
    scale, low_freq_factor, high_freq_factor, old_context_len = 8.0, 1.0, 4.0, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    out = []
    for f in freqs.astype(np.float32).astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < high_freq_wavelen:
            out.append(f)
        elif wavelen > low_freq_wavelen:
            out.append(f / scale)
        else:
            s = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - s) * f / scale + s * f)
    return np.array(out, dtype=np.float32)


def precompute_freqs_cis(head_dim, end, theta=500000.0, use_scaled_rope=False):
    """cos/sin tables [end, hd/2] (float32) for positions 0..end-1 (the complex exp(i·pos·f_j) of Meta's code)."""
    freqs = rope_frequencies(head_dim, theta, use_scaled_rope)
    angles = np.outer(np.arange(end, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rotary_emb(x, cos, sin):
    """Rotate consecutive pairs (x[2j], x[2j+1]) — Meta's interleaved layout, not HF's rotate-half.

    x: [B, T, H, hd]; cos/sin: [T, hd/2].
    """
    fused = rope(x, cos, sin)   # fp32 on CPU: one kernel each way (Models/kernels.py)
    if fused is not None:
        return fused
    B, T, H, hd = x.shape
    xf = x.float32().reshape(B, T, H, hd // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]                         # [B, T, H, hd/2]
    c = cos.reshape(1, T, 1, hd // 2)
    s = sin.reshape(1, T, 1, hd // 2)
    out = jt.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # [B, T, H, hd/2, 2]
    return out.reshape(B, T, H, hd).cast(x.dtype)


def repeat_kv(x, n_rep):
    """[B, S, H_kv, hd] → [B, S, H_kv·n_rep, hd]; KV head j serves query heads j·n_rep .. j·n_rep+n_rep-1."""
    if n_rep == 1:
        return x
    B, S, Hkv, hd = x.shape
    return x.reshape(B, S, Hkv, 1, hd).broadcast((B, S, Hkv, n_rep, hd)).reshape(B, S, Hkv * n_rep, hd)


def causal_mask(T, start_pos):
    """Additive mask [T, start_pos+T]: 0 on cached and past positions, -inf strictly above the diagonal."""
    if T == 1:
        return None
    m = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    if start_pos:
        m = np.concatenate([np.zeros((T, start_pos), np.float32), m], axis=1)
    return jt.array(m)


class NoRoute:
    """Routing of a block without a router: adapter outputs are added unweighted."""

    def apply(self, name, adapter, x):
        return adapter(x)

    def scale(self, name, delta):
        return delta

    def weight_of(self, name):
        return None   # the adapter kernels then weight by 1


NO_ROUTE = NoRoute()


def _add(base, delta):
    return base if delta is None else base + delta.cast(base.dtype)


class Attention(nn.Module):
    def __init__(self, args):
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = args.n_heads // args.n_kv_heads
        self.head_dim = args.head_dim
        self.max_seq_len = args.max_seq_len
        bias = args.attn_bias   # Qwen2-style q/k/v biases
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3: RMSNorm over each head's q and k (in our interleaved RoPE layout) before the rotation.
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        # Adapters (set by Models.moa.attach_adapters), named as in the reference.
        self.lora_Q = self.lora_K = self.lora_V = self.lora_O = None
        self.prompt = self.prompt_gate = self.prompt_router = None
        # Underscore names: KV caches must never become parameters (docs/jittor_notes.md A1).
        self._cache_k = self._cache_v = None
        self._prompt_kv = None    # the prompt adapter's keys / values within a generation (prompt_keys_values)

    def free_cache(self):
        self._cache_k = self._cache_v = self._prompt_kv = None

    def _qkv(self, x, route):
        """q, k, v with their route-weighted LoRA deltas. Decoding: the three projections in one weight-streaming
        call (Models/kernels.py), with the LoRAs in the same call when there are any (Models/adapter_kernels.py)."""
        names = ("lora_Q", "lora_K", "lora_V")
        linears = [self.wq, self.wk, self.wv]
        fused = lora_projections(x, linears, [getattr(self, n) for n in names], names, route)
        if fused is not None:
            return fused
        base = few_rows_projections(x, linears) or [lin(x) for lin in linears]
        return [add_adapter(b, n, getattr(self, n), x, route) for b, n in zip(base, names)]

    def _prompt(self, q, x, output, route, start_pos, use_cache):
        """output + the route-weighted zero-gated prompt (docs/moa.md §2.5): one kernel call when decoding."""
        kv = prompt_keys_values(self, q.dtype, start_pos, use_cache)   # kept for the generation when decoding
        fused = prompt_attention_add(self, q, output, kv, route)
        if fused is not None:
            return fused
        return _add(output, route.scale("prompt", prompt_attention(self, q, x, kv)))

    def execute(self, x, start_pos, cos, sin, mask, route=NO_ROUTE, use_cache=False):
        B, T, _ = x.shape
        xq, xk, xv = self._qkv(x, route)
        xq = xq.reshape(B, T, self.n_heads, self.head_dim)
        xk = xk.reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            xq, xk = self.q_norm(xq), self.k_norm(xk)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)
        xv = xv.reshape(B, T, self.n_kv_heads, self.head_dim)

        if use_cache:
            if self._cache_k is None or self._cache_k.shape[0] != B:
                # Lazily sized to the batch actually used (D14).
                shape = (B, self.max_seq_len, self.n_kv_heads, self.head_dim)
                self._cache_k = jt.zeros(shape, dtype=xk.dtype).stop_grad()
                self._cache_v = jt.zeros(shape, dtype=xv.dtype).stop_grad()
            self._cache_k[:, start_pos:start_pos + T] = xk
            self._cache_v[:, start_pos:start_pos + T] = xv
            keys = self._cache_k[:, :start_pos + T]
            values = self._cache_v[:, :start_pos + T]
        else:
            assert start_pos == 0, "without a cache the sequence must start at position 0"
            keys, values = xk, xv

        # Query heads grouped under their KV head (head h = j·n_rep + r uses KV head j), so GQA needs no
        # repeated K/V copies and each group is one GEMM: [B·H_kv, n_rep·T, hd] against [B·H_kv, S, hd].
        S, Hkv, rep, hd = keys.shape[1], self.n_kv_heads, self.n_rep, self.head_dim
        q = xq.transpose(0, 2, 1, 3).reshape(B * Hkv, rep * T, hd)
        keys = keys.transpose(0, 2, 1, 3).reshape(B * Hkv, S, hd)
        values = values.transpose(0, 2, 1, 3).reshape(B * Hkv, S, hd)
        scores = batched_matmul(q, keys, transpose_b=True).float32()                   # [B·H_kv, n_rep·T, S]
        if causal_softmax_available(scores):
            # One multi-threaded pass; the mask it applies is causal_mask(T, S − T), the only one Transformer
            # passes (None when T == 1, where every key is visible either way).
            probs = causal_softmax(scores, T, 1.0 / math.sqrt(hd)).cast(q.dtype)
        else:
            scores = scores / math.sqrt(hd)
            if mask is not None:
                scores = (scores.reshape(B * Hkv, rep, T, S) + mask).reshape(B * Hkv, rep * T, S)
            probs = nn.softmax(scores, dim=-1).cast(q.dtype)
        output = batched_matmul(probs, values).reshape(B, self.n_heads, T, hd)         # [B, H, T, hd]
        if self.prompt is not None:
            # Zero-gated prompt (docs/moa.md §2.5): own softmax over prompt slots, frozen wk/wv, weighted by the route.
            output = self._prompt(q, x, output, route, start_pos, use_cache)
        output = output.transpose(0, 2, 1, 3).reshape(B, T, -1)           # [B, T, H·hd]
        return add_adapter(self.wo(output), "lora_O", self.lora_O, output, route)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id, args):
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = make_ffn(args, layer_id)   # dense FFN or a mixture of experts (Models/ffn.py)
        self.is_moe = is_moe(self.feed_forward)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.p_adapter = None     # parallel adapter beside the FFN (docs/moa.md §2.4)
        # Routing (Models.routing): kind, and the reference's adapter_type_router / adapter_threshold_fn /
        # lora_gate, prompt_gate, p_adapter_gate modules, set by attach_adapters. None → adapters unweighted.
        self.routing_kind = None
        self.type_columns = {}
        self.threshold_grad = "none"
        self.router_input = args.router_input   # "normed": routers read attention_norm(x) (MoA_Transformers)
        self._instance_cache = None
        self._record = False
        self._last_route = None

    def _remember_route(self, weights, gamma, mask):
        if self._record:
            self._last_route = (weights.detach(), None if gamma is None else gamma.detach(),
                                None if mask is None else mask.detach())

    def execute(self, x, start_pos, cos, sin, mask, use_cache=False, token_mask=None):
        xn = self.attention_norm(x)
        route = build_route(self, xn if self.router_input == "normed" else x, start_pos) or NO_ROUTE
        h = x + self.attention(xn, start_pos, cos, sin, mask, route, use_cache)
        hn = self.ffn_norm(h)
        f = self.feed_forward(hn, token_mask) if self.is_moe else self.feed_forward(hn, route)
        if self.p_adapter is None:
            return h + f
        fused = parallel_adapter_add(h, f, self.p_adapter, hn, route)   # decoding: one kernel call
        return fused if fused is not None else _add(h + f, route.apply("p_adapter", self.p_adapter, hn))


class Transformer(nn.Module):
    def __init__(self, args):
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([TransformerBlock(i, args) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        # Tied embeddings: no output module at all, the head reads tok_embeddings.weight (one Var, one update).
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = precompute_freqs_cis(args.head_dim, args.max_seq_len * 2, args.rope_theta, args.use_scaled_rope)
        self._cos_np, self._sin_np = cos, sin
        self._cos, self._sin = jt.array(cos).stop_grad(), jt.array(sin).stop_grad()

    @property
    def head_weight(self):
        """The output projection [vocab, d] (the embedding matrix itself when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def hidden_states(self, tokens, start_pos=0, use_cache=False, token_mask=None):
        """tokens [B, T] → final-normed hidden states [B, T, d]. token_mask [B, T] (True = real token) only keeps
        padding out of the MoE routers' statistics; attention is causal either way."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)
        cos = self._cos[start_pos:start_pos + T]
        sin = self._sin[start_pos:start_pos + T]
        mask = causal_mask(T, start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask, use_cache, token_mask)
        return self.norm(h)

    def execute(self, tokens, start_pos=0, use_cache=False, last_only=False):
        h = self.hidden_states(tokens, start_pos, use_cache)
        if last_only:
            h = h[:, -1:, :]
            if jt.flags.no_grad:  # decoding: a few rows against the whole vocabulary (Models/kernels.py)
                B, d = h.shape[0], h.shape[-1]
                return few_rows_matmul_t(h.reshape(B, d), self.head_weight).reshape(B, 1, -1).float32()
        return nn.matmul_transpose(h, self.head_weight).float32()

    def moe_layers(self):
        """[(layer id, MoEFeedForward)] of the mixture-of-experts layers."""
        return [(i, layer.feed_forward) for i, layer in enumerate(self.layers) if layer.is_moe]

    def pop_selections(self):
        """The routing Selections of the last forward, one per MoE layer that kept one (and forget them)."""
        out = []
        for i, ffn in self.moe_layers():
            sel = ffn.pop_selection()
            if sel is not None:
                out.append((i, sel))
        return out

    def free_caches(self):
        for layer in self.layers:
            layer.attention.free_cache()
