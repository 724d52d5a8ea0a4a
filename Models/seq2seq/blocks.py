"""Layers of the encoder–decoder: a block (self-attention, cross-attention in the decoder, FFN or MoE, each a
residual sub-layer with its norm) and a stack of blocks with its position bias, final norm and gradient
checkpointing.

Sub-layers follow the style: "switch" (T5) is pre-norm, x + dropout(f(norm(x))), with a final norm after the
stack; "seed" (PyTorch nn.Transformer) is post-norm, norm(x + dropout(f(x))). The MoE replaces the FFN inside
its sub-layer, so its residual is kept and a dropped token's MoE output is exactly 0 (the seed instead applied
its expert layer after each block and let it replace the stream). Norms reuse the project's: T5's layer norm is
`Models.llama.RMSNorm` (x·rsqrt(mean(x²)+eps)·w, no mean, no bias), the seed's is LayerNorm; the dense FFN is
`Models.ffn.FeedForward` (T5's DenseActDense: w1 = wi, w2 = wo); the MoE is the core's layer.
"""
import math
from types import SimpleNamespace

from Models.ffn import FeedForward, is_moe
from Models.llama import RMSNorm
from Models.moe.layer import MoEFeedForward
from Models.moe.selection import Selection
from Models.seq2seq.attention import Attention, RelativePositionBias, dropout
from Models.seq2seq.moe_ffn import CausalMoEFeedForward
from Models.seq2seq.recompute import checkpoint
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


def make_norm(cfg):
    if cfg.style == "switch":
        return RMSNorm(cfg.embed_size, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.embed_size, eps=cfg.layer_norm_eps)


class Block(nn.Module):
    def __init__(self, cfg, is_decoder, sparse):
        d, H, hd, p = cfg.embed_size, cfg.num_heads, cfg.head_dim, cfg.dropout
        scale = 1.0 if cfg.style == "switch" else 1.0 / math.sqrt(hd)   # T5 folds the scale into its init
        self.pre_norm, self.p, self.is_decoder = cfg.style == "switch", p, is_decoder
        self.self_attn = Attention(d, H, hd, scale, p)
        self.self_attn_norm = make_norm(cfg)
        self.cross_attn = Attention(d, H, hd, scale, p) if is_decoder else None
        self.cross_attn_norm = make_norm(cfg) if is_decoder else None
        if sparse:
            cls = CausalMoEFeedForward if is_decoder else MoEFeedForward
            self.ffn = cls(d, cfg.moe, expert_hidden=cfg.hidden_dim, init_std=d ** -0.5)
        else:
            self.ffn = FeedForward(SimpleNamespace(dim=d, ffn_hidden_dim=cfg.hidden_dim, hidden_act=cfg.hidden_act,
                                                   ffn_gated=False))
        self.is_moe = is_moe(self.ffn)
        self.ffn_norm = make_norm(cfg)

    def _sub(self, x, norm, f):
        if self.pre_norm:
            return x + dropout(f(norm(x)), self.p, self.is_training())
        return norm(x + dropout(f(x), self.p, self.is_training()))

    def _ffn(self, h, token_mask, cache, start):
        if not self.is_moe:
            return self.ffn(h, None)
        if self.is_decoder:
            return self.ffn(h, token_mask, None if cache is None else cache.setdefault("moe", {}), start)
        return self.ffn(h, token_mask)

    def execute(self, x, bias, memory=None, cross_bias=None, token_mask=None, cache=None, start=0):
        """x [B, T, d]; bias: self-attention bias; memory/cross_bias: encoder output and its padding bias
        (decoder); token_mask [B, T] (True = real token) for the router; cache: this layer's decoding cache."""
        sc = None if cache is None else cache.setdefault("self", {})
        x = self._sub(x, self.self_attn_norm, lambda h: self.self_attn(h, bias, cache=sc))
        if self.is_decoder:
            cc = None if cache is None else cache.setdefault("cross", {})
            x = self._sub(x, self.cross_attn_norm,
                          lambda h: self.cross_attn(h, cross_bias, source=memory, cache=cc, cross=True))
        return self._sub(x, self.ffn_norm, lambda h: self._ffn(h, token_mask, cache, start))


class Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal) stack; `grad_checkpoint` recomputes each block in backward."""

    def __init__(self, cfg, is_decoder):
        n = cfg.dec_layers if is_decoder else cfg.enc_layers
        sparse = set(cfg.decoder_moe_layers() if is_decoder else cfg.encoder_moe_layers())
        self.layers = nn.ModuleList([Block(cfg, is_decoder, i in sparse) for i in range(n)])
        self.is_decoder, self.p = is_decoder, cfg.dropout
        self.pos_bias = None
        if cfg.style == "switch":   # HF keeps it in block 0's self-attention; every block of the stack uses it
            self.pos_bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                                 cfg.relative_attention_max_distance, bidirectional=not is_decoder)
        self.final_norm = make_norm(cfg) if cfg.style == "switch" else None
        self.grad_checkpoint = False

    def moe_layers(self):
        return [(i, layer.ffn) for i, layer in enumerate(self.layers) if layer.is_moe]

    def execute(self, h, bias, memory=None, cross_bias=None, token_mask=None, caches=None, start=0):
        for i, layer in enumerate(self.layers):
            if self.grad_checkpoint and caches is None and self.is_training():
                h = _checkpointed(layer, h, bias, memory, cross_bias, token_mask)
            else:
                h = layer(h, bias, memory, cross_bias, token_mask, None if caches is None else caches[i], start)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return dropout(h, self.p, self.is_training())


_SEL_FIELDS = ("logits", "probs", "index", "weight", "kept")


def _checkpointed(layer, h, bias, memory, cross_bias, token_mask):
    """One block through `recompute.checkpoint`; an MoE block also returns its Selection's Vars, so the auxiliary
    losses keep their gradient path to the router."""
    meta = {}

    def fn(h, bias, memory, cross_bias, token_mask):
        if layer.is_moe:
            layer.ffn.record = True
        try:
            out = layer(h, bias, memory, cross_bias, token_mask)
        finally:
            if layer.is_moe:
                layer.ffn.record = False
        if not layer.is_moe:
            return [out]
        sel = layer.ffn.pop_selection()
        meta.update(n_groups=sel.n_groups, group_size=sel.group_size, capacity=sel.capacity,
                    mask=sel.token_mask)
        return [out] + [getattr(sel, f) for f in _SEL_FIELDS]

    if token_mask is not None and isinstance(token_mask, jt.Var):
        token_mask = token_mask.stop_grad()
    outs = checkpoint(fn, [h, bias, memory, cross_bias, token_mask], layer.parameters())
    if layer.is_moe:
        mask = meta["mask"]
        layer.ffn._selection = Selection(*outs[1:], None if mask is None else mask.detach(), meta["n_groups"],
                                         meta["group_size"], meta["capacity"])
    return outs[0]
