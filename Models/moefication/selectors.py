"""Evaluation-time expert selection for a converted model: the same MoE layers, other routers.

MoEfication judges a split by how well the model does when each token uses only k of the E groups, under several
ways of choosing them (MOE_SPEC §4(a).3, thunlp's selections). Each is a router module — x [N, d] fp32 → scores
[N, E] — that `use_selection` swaps into every MoE layer (with that k) and swaps back afterwards, so every method
runs through the layer's own select() and sparse dispatch:

    "router"        the trained MLP gate the checkpoint holds (nothing swapped, only k);
    "ground_truth"  the oracle: each group's true criterion score on this token, from every neuron's activation
                    (it computes the first half of the whole FFN, so it bounds quality, not speed);
    "similarity"    −‖x̂ − c_e‖ with c_e the mean of group e's L2-normalised template rows, x̂ = x/‖x‖;
    "random"        uniform random scores per token (seeded through Jittor's RNG).

A selector keeps its source weights in a tuple, not as a Module attribute: Jittor would list a Module attribute's
Vars among the router's parameters while it is swapped in.
"""
import contextlib
import dataclasses

import numpy as np

from Models.moe.experts import activation as expert_activation
from Models.moefication.criteria import CRITERIA
from Models.moefication.split import expert_centroids
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

METHODS = ("ground_truth", "router", "similarity", "random")
_NORM_FLOOR = 1e-24


def _equal_size(experts):
    sizes = set(experts.sizes)
    if len(sizes) != 1:
        raise UserError("selectors: experts of different widths %s (a MoEfication split has equal groups)"
                        % (sorted(sizes),))
    return sizes.pop()


class GroundTruthRouter(nn.Module):
    """Scores = each expert's criterion value on the token's true activations (the oracle selection)."""

    def __init__(self, experts, activation="product", criterion="l2_norm", l2_threshold=None):
        if criterion not in CRITERIA:
            raise UserError("criterion: expected one of %s, got %r" % ("/".join(CRITERIA), criterion))
        self.n_experts, self.size = experts.n_experts, _equal_size(experts)
        self._src = (experts,)
        self.activation, self.criterion, self.l2_threshold = activation, criterion, l2_threshold

    def execute(self, x):
        ex = self._src[0]
        u = expert_activation(ex.act, nn.matmul_transpose(x, ex.w1.float32()))          # [N, ΣF]
        h = u * nn.matmul_transpose(x, ex.w3.float32()) if (ex.gated and self.activation == "product") else u
        if self.criterion == "positive":
            h = jt.maximum(h, 0.0)
        elif self.criterion == "l1_norm":
            h = jt.abs(h)
        elif self.criterion == "l2_norm":
            h = h * h
            if self.l2_threshold is not None:
                h = jt.ternary(h <= self.l2_threshold, jt.zeros_like(h), h)
        return h.reshape(x.shape[0], self.n_experts, self.size).sum(2)                # [N, E]


class SimilarityRouter(nn.Module):
    """Scores = −‖x̂ − c_e‖ (thunlp's similarity selection)."""

    def __init__(self, centroids):
        self.n_experts = centroids.shape[0]
        c = np.asarray(centroids, dtype=np.float32)
        self._c = jt.array(c).stop_grad()
        self._c2 = jt.array((c * c).sum(1)).stop_grad()

    def execute(self, x):
        xn = x / jt.sqrt(jt.maximum((x * x).sum(1, keepdims=True), _NORM_FLOOR))
        d2 = 1.0 - 2.0 * nn.matmul_transpose(xn, self._c) + self._c2.reshape(1, -1)    # ‖x̂‖ = 1
        return -jt.sqrt(jt.maximum(d2, _NORM_FLOOR))


class RandomRouter(nn.Module):
    def __init__(self, n_experts):
        self.n_experts = n_experts

    def execute(self, x):
        return jt.rand((x.shape[0], self.n_experts), "float32")


def similarity_centroids(experts, template="gate"):
    """[E, d] mean normalised template row per expert, from the stacked expert weights (rows already grouped)."""
    w = experts.w1 if template == "gate" else experts.w3
    if w is None:
        raise UserError("template: %r needs the up projection, and these experts are not gated" % template)
    size = _equal_size(experts)
    labels = np.repeat(np.arange(experts.n_experts), size)
    return expert_centroids(w.numpy(), labels, experts.n_experts).astype(np.float32)


def build_selector(method, layer, info):
    """The router module of `method` for one MoEFeedForward; info = the checkpoint's moefication.json."""
    if method == "router":
        return layer.router
    if method == "random":
        return RandomRouter(layer.n_experts)
    if method == "similarity":
        return SimilarityRouter(similarity_centroids(layer.experts, info.get("split", {}).get("template", "gate")))
    if method == "ground_truth":
        gate = info.get("gate") or {}
        return GroundTruthRouter(layer.experts, info.get("activation") or "product",
                                 gate.get("criterion", "l2_norm"), gate.get("l2_threshold"))
    raise UserError("--methods: %r is not one of %s" % (method, ", ".join(METHODS)))


@contextlib.contextmanager
def use_selection(transformer, method, k, info, cache=None):
    """Route every MoE layer of `transformer` with `method` and top-k = k inside the block. `cache` (a dict) keeps
    built selectors across calls (similarity centroids are computed once)."""
    layers = transformer.moe_layers()
    if not layers:
        raise UserError("the model has no MoE layers (evaluate needs the converted checkpoint)")
    saved = []
    try:
        for i, layer in layers:
            if not 1 <= k <= layer.n_experts:
                raise UserError("k: %d is not in 1..%d (layer %d's experts)" % (k, layer.n_experts, i))
            key = (method, i)
            sel = cache.get(key) if cache is not None else None
            if sel is None:
                sel = build_selector(method, layer, info)
                if cache is not None:
                    cache[key] = sel
            saved.append((layer, layer.router, layer.cfg))
            layer.router = sel
            layer.cfg = dataclasses.replace(layer.cfg, top_k=k)
        yield
    finally:
        for layer, router, cfg in saved:
            layer.router, layer.cfg = router, cfg
