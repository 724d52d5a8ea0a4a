"""Attention of the encoder–decoder: self- and cross-attention with additive biases (padding masks, causal mask,
T5 relative position buckets), the decoder's KV cache, and the sinusoidal position table of the seed's style.

Shapes: x [B, T, d]; q/k/v are kept as [B·H, T, hd] so both GEMMs go through `Models.kernels.batched_matmul`
(oneDNN on CPU). A bias is any Var broadcastable to [B, H, T, S] (fp32, large negative where masked), built once
per stack and shared by its layers. Cross-attention K/V are computed once per source (`kv_cache` "cross"), the
self-attention cache grows by concatenation (no recompilation as it grows, docs/jittor_notes.md A7).
"""
import math

import numpy as np

from Models.kernels import batched_matmul, few_rows_projections
from Models.seq2seq.attention_kernel import fused_attention, fused_attention_available
from Models.seq2seq.softmax import biased_softmax, biased_softmax_available
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

MASKED = -1e9   # added to masked scores: exp underflows to exactly 0, and a fully masked row stays finite


def dropout(x, p, training):
    """Inverted dropout; draws through jt.rand so gradient checkpointing can replay the mask."""
    if not training or p <= 0:
        return x
    keep = (jt.rand(x.shape) >= p).cast(x.dtype)
    return x * keep * (1.0 / (1.0 - p))


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """T5's bucket of each relative position (memory − query), numpy int64: exact buckets for small distances,
    logarithmic ones up to max_distance (HF SwitchTransformers' _relative_position_bucket, in float32 as torch)."""
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # (the small branch is taken wherever rel < max_exact, so rel ≥ 1 here only avoids log(0) warnings)
    large = max_exact + (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rel, large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias: `relative_attention_bias.weight` [num_buckets, H] → bias [1, H, T, S]."""

    def __init__(self, n_heads, num_buckets, max_distance, bidirectional):
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self._tables = {}

    def execute(self, q_len, k_len, offset=0):
        key = (q_len, k_len, offset)
        if key not in self._tables:   # host-side bucket table, reused for every batch of this shape
            rel = np.arange(k_len)[None, :] - (np.arange(q_len)[:, None] + offset)
            b = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
            self._tables[key] = jt.array(b.reshape(-1).astype(np.int32)).stop_grad()
        values = self.relative_attention_bias.weight[self._tables[key]]             # [T·S, H]
        return values.reshape(1, q_len, k_len, -1).transpose(0, 3, 1, 2)           # [1, H, T, S]


def sinusoid_table(n_pos, d):
    """The seed's (Vaswani's) positions: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    pos = np.arange(n_pos, dtype=np.float64)[:, None]
    inv = np.exp(-math.log(10000.0) * np.arange(0, d, 2, dtype=np.float64) / d)[None, :]
    table = np.zeros((n_pos, d), np.float64)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)
    return table.astype(np.float32)


def padding_bias(key_mask):
    """key_mask [B, S] (True = real token) → additive bias [B, 1, 1, S]."""
    return ((1.0 - key_mask.float32()) * MASKED).reshape(key_mask.shape[0], 1, 1, key_mask.shape[1])


def causal_bias(T, past=0):
    """[1, 1, T, past+T]: query t sees keys 0..past+t."""
    m = np.triu(np.full((T, T), MASKED, np.float32), k=1)
    if past:
        m = np.concatenate([np.zeros((T, past), np.float32), m], 1)
    return jt.array(m.reshape(1, 1, T, past + T)).stop_grad()


class Attention(nn.Module):
    """Multi-head attention with HF T5's parameter names q, k, v, o (no biases)."""

    def __init__(self, d, n_heads, head_dim, scale, dropout_p):
        self.n_heads, self.head_dim, self.scale, self.dropout_p = n_heads, head_dim, scale, dropout_p
        inner = n_heads * head_dim
        self.q = nn.Linear(d, inner, bias=False)
        self.k = nn.Linear(d, inner, bias=False)
        self.v = nn.Linear(d, inner, bias=False)
        self.o = nn.Linear(inner, d, bias=False)

    def _heads(self, x):
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3).reshape(
            B * self.n_heads, T, self.head_dim)                                    # [B·H, T, hd]

    def kv(self, source):
        return self._heads(self.k(source)), self._heads(self.v(source))

    def execute(self, x, bias, source=None, cache=None, cross=False):
        """x [B, T, d]; source: the memory for cross-attention (None: self-attention); bias broadcastable to
        [B, H, T, S]; cache: a dict this layer owns (self: grows; cross: K/V once)."""
        B, T, _ = x.shape
        H = self.n_heads
        if cache is None and (self.dropout_p <= 0 or not self.is_training()) and fused_attention_available(x, bias):
            src = source if cross else x          # the whole sequence: one fused kernel each way
            out = fused_attention(self.q(x), self.k(src), self.v(src), bias, H, self.scale)
            return self.o(out.cast(x.dtype))
        # decoding (a few rows, no gradient): the projections stream their weights once (Models/kernels.py)
        fused = few_rows_projections(x, [self.q] if cross else [self.q, self.k, self.v])
        q = self._heads(fused[0] if fused else self.q(x))
        if cross:
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.kv(source)
                if cache is not None:
                    cache["k"], cache["v"] = k, v
        else:
            k, v = (self._heads(fused[1]), self._heads(fused[2])) if fused else self.kv(x)
            if cache is not None:
                if "k" in cache:
                    k = jt.concat([cache["k"], k], 1)
                    v = jt.concat([cache["v"], v], 1)
                cache["k"], cache["v"] = k, v
        S = k.shape[1]
        scores = batched_matmul(q, k, transpose_b=True).float32()                    # [B·H, T, S]
        if bias is not None and len(bias.shape) == 4 and biased_softmax_available(scores):
            probs = biased_softmax(scores, bias, H, self.scale)                       # one CPU pass each way
        else:
            if self.scale != 1.0:
                scores = scores * self.scale
            if bias is not None:
                scores = (scores.reshape(B, H, T, S) + bias).reshape(B * H, T, S)
            scores = scores - scores.max(-1, keepdims=True)
            e = jt.exp(scores)
            probs = e / e.sum(-1, keepdims=True)                                      # the sum is >= 1
        probs = dropout(probs, self.dropout_p, self.is_training()).cast(q.dtype)
        out = batched_matmul(probs, v)                                                # [B·H, T, hd]
        out = out.reshape(B, H, T, self.head_dim).transpose(0, 2, 1, 3).reshape(B, T, H * self.head_dim)
        return self.o(out)
