"""Capture of what MoEfication learns from: each dense FFN's input x and its per-neuron activations h, taken from a
running Transformer without editing Models/llama.py.

`FFNCapture(transformer, layers, activation)` is a context manager that puts a thin wrapper in place of the chosen
blocks' `feed_forward` and restores the originals on exit. The wrapper computes the FFN itself from the same
projections (so the activations are not computed twice) and keeps, per layer, x [B, T, d] and h [B, T, d_ff] as
float32 Vars until `pop()` hands them over as numpy arrays. Activations (MOE_SPEC §4(a).2):

    activation "gate"     h = act(W1 x)              (llama-moe with the gate template)
    activation "product"  h = act(W1 x) ⊙ (W3 x)      (what reaches W2: the neuron's real contribution; for a
                                                       plain, ungated FFN it equals "gate")

A feed-forward that carries MoA LoRA adapters is run as it is and the activations are computed beside it, so its
output never changes.
"""
import hashlib

import numpy as np

from Models.ffn import activation as ffn_activation
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

ACTIVATIONS = ("gate", "product")


def dense_ffn(block, layer):
    """The dense FeedForward of a block, or a one-line error (an MoE layer has nothing to split)."""
    ffn = block.feed_forward
    ffn = getattr(ffn, "inner", ffn)
    if not hasattr(ffn, "w1") or not hasattr(ffn, "gated"):
        raise UserError("layer %d: its FFN is not a dense feed-forward (%s); MoEfication needs a dense model"
                        % (layer, type(ffn).__name__))
    return ffn


def ffn_activations(ffn, x, activation):
    """(h for the chosen activation, the product that feeds W2) of a dense FeedForward on x [..., d]."""
    if activation not in ACTIVATIONS:
        raise UserError("activation: expected one of %s, got %r" % ("/".join(ACTIVATIONS), activation))
    u = ffn_activation(ffn.act, ffn.w1(x))
    product = u * ffn.w3(x) if ffn.gated else u
    return (u if activation == "gate" else product), product


class _Capture(nn.Module):
    """Stands in for one block's FeedForward while a capture is active."""

    def __init__(self, inner, activation, sink):
        self.inner = inner
        self._activation, self._sink = activation, sink

    def execute(self, x, *rest):
        has_lora = any(getattr(self.inner, n, None) is not None for n in ("lora_GATE", "lora_UP", "lora_DOWN"))
        h, product = ffn_activations(self.inner, x, self._activation)
        out = self.inner(x, *rest) if has_lora else self.inner.w2(product)
        self._sink.append((x.float32().detach(), h.float32().detach()))
        return out


class FFNCapture:
    """with FFNCapture(model.llama, layers, "product") as cap: model.llama.hidden_states(tokens); got = cap.pop()"""

    def __init__(self, transformer, layers=None, activation="product"):
        if activation not in ACTIVATIONS:
            raise UserError("activation: expected one of %s, got %r" % ("/".join(ACTIVATIONS), activation))
        n = len(transformer.layers)
        self.layers = list(range(n)) if layers is None else sorted(int(i) for i in layers)
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise UserError("layers: layer %d is out of range (the model has %d layers)" % (bad[0], n))
        for i in self.layers:
            dense_ffn(transformer.layers[i], i)
        self.transformer, self.activation = transformer, activation
        self._sinks = {i: [] for i in self.layers}
        self._saved = {}

    def __enter__(self):
        for i in self.layers:
            block = self.transformer.layers[i]
            self._saved[i] = block.feed_forward
            block.feed_forward = _Capture(block.feed_forward, self.activation, self._sinks[i])
        return self

    def __exit__(self, *exc):
        for i, ffn in self._saved.items():
            self.transformer.layers[i].feed_forward = ffn
        self._saved = {}
        return False

    def pop(self):
        """{layer: [(x [B, T, d], h [B, T, d_ff]) per forward]} as float32 numpy, since the last pop (one sync)."""
        pending = [(i, x, h) for i, items in self._sinks.items() for x, h in items]
        jt.sync([v for _, x, h in pending for v in (x, h)])
        out = {i: [] for i in self.layers}
        for i, x, h in pending:
            out[i].append((x.numpy(), h.numpy()))
        for items in self._sinks.values():
            items.clear()
        return out


def layer_fingerprint(w1, w3, w2):
    """Short sha256 of one dense FFN's weights as float32: ties split, feature and gate files to one model."""
    h = hashlib.sha256()
    for w in (w1, w3, w2):
        if w is not None:
            a = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def model_fingerprints(transformer, layers):
    """{layer: fingerprint} of a loaded Transformer's dense FFNs."""
    out = {}
    for i in layers:
        f = dense_ffn(transformer.layers[i], i)
        out[i] = layer_fingerprint(f.w1.weight.numpy(), None if f.w3 is None else f.w3.weight.numpy(),
                                   f.w2.weight.numpy())
    return out
