"""`Seq2SeqTransformer`: the encoder–decoder MoE model users hold (seed 003, Switch-compatible) — embeddings and
positions, the two stacks, the output head, the training loss terms of the engine's model protocol, and the
one-step decoder with its cache that generation uses.

The source goes to the encoder only, the target to the decoder only (the seed fed the whole question+answer to
the encoder and no causal mask to the decoder). Masks: encoder keys exclude source padding; decoder
self-attention is causal (and excludes target padding); cross-attention excludes source padding. A batch is
{"src" [B, S], "src_mask" [B, S] bool, "tgt_in" [B, T], "tgt_out" [B, T] (−100 on padding)}; the decoder's
padding mask is tgt_out ≥ 0. Token ids must be < vocab_size (checked on the host; never clamped).

Loss terms: "lm" = token-mean cross-entropy over the target tokens, label-smoothed in training with torch's /
HF's semantics, (1−ε)·NLL + ε·mean_v(−log p_v) = NLL + ε·(z_target − mean_v z_v), plain in eval; "nll" (training,
logged only) the unsmoothed value; "aux_switch" and "aux_z" = encoder term + decoder term, each over that
stack's MoE layers concatenated, as HF SwitchTransformers adds them.
"""
import math

import numpy as np

from Models.kernels import few_rows_matmul_t
from Models.losses import head_cross_entropy
from Models.moe.aux_losses import aux_loss_terms, expert_load
from Models.seq2seq.attention import causal_bias, dropout, padding_bias, sinusoid_table
from Models.seq2seq.blocks import Stack
from Models.seq2seq.config import Seq2SeqConfig
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn
IGNORE_INDEX = -100


class DecoderCache:
    """Per-layer decoding state (self-attention K/V, cross-attention K/V computed once, MoE queue lengths), the
    encoder memory and its padding bias, and the number of target positions already decoded."""

    def __init__(self, n_layers, memory, src_mask):
        self.layers = [{} for _ in range(n_layers)]
        self.memory, self.cross_bias, self.length = memory, padding_bias(src_mask), 0

    def reorder(self, rows):
        """Keep the rows `rows` (int array, beam search): every cached tensor is gathered along its batch axis."""
        idx = jt.array(np.asarray(rows, np.int32))
        B = self.memory.shape[0]
        self.memory, self.cross_bias = self.memory[idx], self.cross_bias[idx]
        for layer in self.layers:
            for part in layer.values():
                for key, v in list(part.items()):
                    if v.shape[0] == B:
                        part[key] = v[idx]
                    else:   # [B·H, S, hd] attention tensors
                        H = v.shape[0] // B
                        part[key] = v.reshape(B, H, *v.shape[1:])[idx].reshape(len(rows) * H, *v.shape[1:])


class Seq2SeqTransformer(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        cfg = cfg if isinstance(cfg, Seq2SeqConfig) else Seq2SeqConfig.from_dict(cfg)
        if cfg.vocab_size < 1:
            raise UserError("model config: vocab_size is 0; take it from the tokenizer (Seq2SeqConfig.with_tokenizer)")
        if tokenizer is not None and tokenizer.n_words > cfg.vocab_size:
            raise UserError("model config: vocab_size %d is smaller than the tokenizer's %d ids"
                            % (cfg.vocab_size, tokenizer.n_words))
        self.cfg, self.tokenizer = cfg, tokenizer
        d = cfg.embed_size
        self.embed = nn.Embedding(cfg.vocab_size, d)       # shared by encoder, decoder and a tied head
        # T5 embeddings are N(0, 1) (the tied head scales by d^-0.5); the seed's are multiplied by √d.
        self.embed.weight = jt.init.gauss((cfg.vocab_size, d), "float32", 0.0, 1.0 if cfg.style == "switch"
                                          else d ** -0.5)
        self.encoder = Stack(cfg, is_decoder=False)
        self.decoder = Stack(cfg, is_decoder=True)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.style == "switch":
            self._t5_init()
        self.label_smoothing = 0.0
        self._last_loads = []
        self._pe = np.zeros((0, d), np.float32)
        # Jittor draws random inits lazily: materialise them now so the seed at construction fixes their values
        jt.sync([p for _, p in self.named_parameters()])

    def _t5_init(self):
        # T5/Switch have no 1/√hd in attention: their init puts it in q (std (d·hd)^-1/2), as HF initialises
        from Models.seq2seq.attention import Attention
        cfg, gauss = self.cfg, lambda shape, std: jt.init.gauss(shape, "float32", 0.0, std)
        d, hd, H = cfg.embed_size, cfg.head_dim, cfg.num_heads
        for m in self.modules():
            if isinstance(m, Attention):
                m.q.weight = gauss(m.q.weight.shape, (d * hd) ** -0.5)
                m.k.weight = gauss(m.k.weight.shape, d ** -0.5)
                m.v.weight = gauss(m.v.weight.shape, d ** -0.5)
                m.o.weight = gauss(m.o.weight.shape, (H * hd) ** -0.5)
        for stack in (self.encoder, self.decoder):
            for layer in stack.layers:
                if not layer.is_moe:
                    layer.ffn.w1.weight = gauss(layer.ffn.w1.weight.shape, d ** -0.5)
                    layer.ffn.w2.weight = gauss(layer.ffn.w2.weight.shape, cfg.hidden_dim ** -0.5)
            if stack.pos_bias is not None:
                w = stack.pos_bias.relative_attention_bias.weight
                stack.pos_bias.relative_attention_bias.weight = gauss(w.shape, d ** -0.5)

    # ------------------------------------------------------------------ pieces
    def set_grad_checkpoint(self, on=True):
        self.encoder.grad_checkpoint = self.decoder.grad_checkpoint = bool(on)
        return self

    @property
    def head_weight(self):
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _check_ids(self, name, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            bad = int(ids.max()) if ids.max() >= self.cfg.vocab_size else int(ids.min())
            raise UserError("%s: token id %d is outside the vocabulary of %d ids" % (name, bad, self.cfg.vocab_size))
        return ids

    def _embed(self, ids, start=0):
        h = self.embed(ids)
        if self.cfg.style == "seed":
            T, d = ids.shape[1], self.cfg.embed_size
            if start + T > len(self._pe):   # the table grows with the longest sequence seen
                self._pe = sinusoid_table(max(2 * (start + T), 64), d)
            pe = jt.array(self._pe[start:start + T]).stop_grad()
            h = h * math.sqrt(d) + pe.reshape(1, T, d)
        return dropout(h, self.cfg.dropout, self.is_training())

    def encode(self, src, src_mask):
        """src [B, S] int, src_mask [B, S] bool → memory [B, S, d]."""
        S = src.shape[1]
        bias = padding_bias(src_mask)                                               # [B, 1, 1, S]
        if self.encoder.pos_bias is not None:
            bias = bias + self.encoder.pos_bias(S, S)                               # [B, H, S, S]
        return self.encoder(self._embed(src), bias, token_mask=src_mask)

    def decode_hidden(self, tgt_in, memory, src_mask=None, tgt_mask=None, cache=None):
        """Decoder states [B, T, d] for target positions cache.length.. (0 without a cache)."""
        T = tgt_in.shape[1]
        start = 0 if cache is None else cache.length
        bias = causal_bias(T, start)                                                # [1, 1, T, start+T]
        if tgt_mask is not None and cache is None:
            bias = bias + padding_bias(tgt_mask)
        if self.decoder.pos_bias is not None:
            bias = bias + self.decoder.pos_bias(T, start + T, start)
        cross = padding_bias(src_mask) if cache is None else cache.cross_bias
        h = self.decoder(self._embed(tgt_in, start), bias, memory, cross, token_mask=tgt_mask,
                         caches=None if cache is None else cache.layers, start=start)
        if cache is not None:
            cache.length += T
        return h

    def _head_input(self, h):
        # T5/Switch with tied embeddings rescale before the head (mesh-tensorflow), as HF does
        return h * (self.cfg.embed_size ** -0.5) if self.lm_head is None else h

    def head(self, h):
        return nn.matmul_transpose(self._head_input(h), self.head_weight).float32()

    def execute(self, src, src_mask, tgt_in, tgt_mask=None):
        """Logits [B, T, V] (fp32) of the full training forward."""
        memory = self.encode(src, src_mask)
        return self.head(self.decode_hidden(tgt_in, memory, src_mask, tgt_mask))

    # ------------------------------------------------------------------ the engine's model protocol
    def pop_selections(self):
        """{"encoder": [(layer, Selection)], "decoder": [...]} of the last forward (and forget them)."""
        out = {}
        for name, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            out[name] = [(i, s) for i, s in ((i, f.pop_selection()) for i, f in stack.moe_layers()) if s is not None]
        return out

    def _lm(self, h, tgt_out):
        d = h.shape[-1]
        target = tgt_out.reshape(-1)
        rows = jt.nonzero(target >= 0).reshape(-1)
        if rows.shape[0] == 0:
            return h.sum() * 0.0, None
        hr = self._head_input(h.reshape(-1, d)[rows])
        t = target[rows]
        W = self.head_weight
        nll = head_cross_entropy(hr, W, t)
        eps = self.label_smoothing if self.is_training() else 0.0
        if eps <= 0:
            return nll, nll
        gap = (hr * (W[t] - W.mean(0).reshape(1, d))).sum(-1)                       # z_target − mean_v z_v
        return nll + eps * gap.mean(), nll

    def loss_terms(self, batch):
        src, src_mask, tgt_in, tgt_out = batch["src"], batch["src_mask"], batch["tgt_in"], batch["tgt_out"]
        tgt_mask = tgt_out >= 0
        memory = self.encode(src, src_mask)
        h = self.decode_hidden(tgt_in, memory, src_mask, tgt_mask)
        lm, nll = self._lm(h, tgt_out)
        terms = {"lm": lm}
        if nll is not None and nll is not lm:
            terms["nll"] = nll
        sels = self.pop_selections()
        self._last_loads = [("%s.%d" % (k[:3], i), s.detach()) for k in ("encoder", "decoder") for i, s in sels[k]]
        if self.cfg.moe is not None:
            for part in ("encoder", "decoder"):
                for name, value in aux_loss_terms([s for _, s in sels[part]], self.cfg.moe).items():
                    terms[name] = terms[name] + value if name in terms else value
        return terms

    def loss_weights(self):
        weights = {"lm": 1.0}
        if self.cfg.moe is not None and self.cfg.is_moe:
            weights.update(self.cfg.moe.aux_weights())
        return weights

    def trainable_parameters(self):
        return list(self.named_parameters())

    def num_parameters(self):
        return int(sum(int(np.prod(p.shape)) for _, p in self.named_parameters()))

    def routing_load(self):
        """{"enc.<layer>" / "dec.<layer>": kept assignments per expert} of the last training forward (syncs)."""
        return {name: expert_load(sel) for name, sel in self._last_loads}

    # ------------------------------------------------------------------ inference API (numpy in, numpy out)
    def _vars(self, src, src_mask=None):
        src = self._check_ids("source", src).astype(np.int32)
        if src_mask is None:
            src_mask = np.ones(src.shape, bool)
        return jt.array(src), jt.array(np.asarray(src_mask, bool))

    def logits(self, src, tgt_in, src_mask=None):
        """Full forward, numpy [B, T, V] (eval mode is the caller's choice)."""
        s, m = self._vars(src, src_mask)
        t = jt.array(self._check_ids("target", tgt_in).astype(np.int32))
        with jt.no_grad():
            out = self(s, m, t).numpy()
        self.pop_selections()
        return out

    def new_cache(self, src, src_mask=None):
        """Encode a source batch once and return the decoding cache."""
        s, m = self._vars(src, src_mask)
        memory = self.encode(s, m)
        self.pop_selections()
        return DecoderCache(len(self.decoder.layers), memory, m)

    def decode_step(self, tokens, cache):
        """tokens [B, t] (the next target positions) → logits [B, t, V] numpy, the cache advanced."""
        t = jt.array(self._check_ids("target", tokens).astype(np.int32))
        h = self.decode_hidden(t, cache.memory, cache=cache)
        B, T, d = h.shape
        # a few rows against the whole vocabulary: the weight-streaming kernel (Models/kernels.py)
        out = few_rows_matmul_t(self._head_input(h).reshape(B * T, d), self.head_weight).reshape(B, T, -1)
        out = out.float32().numpy()
        self.pop_selections()
        return out

    def generate(self, sources, max_new_tokens=64, **kw):
        """Token lists for a list of source token lists (Models/seq2seq/generate.py: greedy, beam, sampling)."""
        from Models.seq2seq.generate import generate
        return generate(self, sources, max_new_tokens, **kw)
