"""Routers of the MoE core: token features [N, d] → router logits [N, E] in float32.

Parameter names (what a checkpoint mapping converts to and from):

* `LinearRouter`: `gate.weight` [E, d] (+ `gate.bias` [E]) — HF Mixtral `block_sparse_moe.gate.weight`,
  Qwen2-MoE `mlp.gate.weight`, Switch `router.classifier.weight`.
* `MLPRouter`: `w1.weight` [H, d] (+ `w1.bias` [H]), `w2.weight` [E, H] (never a bias): z = W2·act(W1 x + b1) —
  llama-moe's MLP gate (tanh, H = E, no bias) and ModuleFormer's "mlp" gate (GELU, H = 256, bias).
* `CosineRouter` ("gmm"): `proj.weight` [P, d], `centroids` [E, P] ~ N(0, 1), `tau` [1] (init 0):
  z_e = cos(W x, c_e)·exp(τ), so at initialisation every logit lies in [−1, 1].

All linear layers start as torch's nn.Linear default (Models.adapters.linear); the math runs in float32 whatever the
activation dtype (selective precision, as HF routers do).
"""
import math

from Models.adapters import linear
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

_NORM_FLOOR = 1e-24   # floor under a sum of squares before sqrt: keeps denormals away from fast-math sqrt


def _act(name, x):
    if name == "tanh":
        return jt.tanh(x)
    # exact (erf) GELU, as torch.nn.GELU() used by ModuleFormer
    return 0.5 * x * (1.0 + jt.erf(x * (1.0 / math.sqrt(2.0))))


def _lin(layer, x):
    """layer(x) in float32 even when the model was cast to a half type (router math stays fp32)."""
    y = nn.matmul_transpose(x, layer.weight.float32())
    return y if layer.bias is None else y + layer.bias.float32()


def _dropout(x, p, training):
    if p <= 0 or not training:
        return x
    keep = (jt.rand(x.shape) >= p).float32()
    return x * keep * (1.0 / (1.0 - p))


class LinearRouter(nn.Module):
    """z = W x (+ b)."""

    def __init__(self, d, n_experts, bias=False, dropout=0.0):
        self.n_experts = n_experts
        self.dropout = dropout
        self.gate = linear(d, n_experts, bias=bias)

    def execute(self, x):
        x = _dropout(x.float32(), self.dropout, self.is_training())
        return _lin(self.gate, x)


class MLPRouter(nn.Module):
    """z = W2·act(W1 x + b1); dropout (training only) on the hidden activation, as ModuleFormer's gate."""

    def __init__(self, d, hidden, n_experts, act="tanh", bias=False, dropout=0.0):
        self.n_experts = n_experts
        self.act, self.dropout = act, dropout
        self.w1 = linear(d, hidden, bias=bias)
        self.w2 = linear(hidden, n_experts, bias=False)

    def execute(self, x):
        h = _act(self.act, _lin(self.w1, x.float32()))
        return _lin(self.w2, _dropout(h, self.dropout, self.is_training()))


class CosineRouter(nn.Module):
    """z_e = cos(W x, c_e)·exp(τ): the ModuleFormer "gmm" gate (its quadratic GMM terms are unused there too)."""

    def __init__(self, d, proj, n_experts, dropout=0.0):
        self.n_experts = n_experts
        self.dropout = dropout
        self.proj = linear(d, proj, bias=False)
        self.centroids = jt.randn((n_experts, proj), "float32")
        self.tau = jt.zeros((1,), "float32")

    def execute(self, x):
        u = _lin(self.proj, _dropout(x.float32(), self.dropout, self.is_training()))     # [N, P]
        u = u / jt.sqrt(jt.maximum((u * u).sum(-1, keepdims=True), _NORM_FLOOR))       # unit rows
        c = self.centroids.float32()
        c = c / jt.sqrt(jt.maximum((c * c).sum(-1, keepdims=True), _NORM_FLOOR))       # [E, P]
        return nn.matmul_transpose(u, c) * jt.exp(self.tau.float32())                  # [N, E]


def build_router(cfg, d, n_experts):
    """The router `cfg.router` names, for d-wide tokens and n_experts experts."""
    if cfg.router == "linear":
        return LinearRouter(d, n_experts, bias=cfg.router_bias, dropout=cfg.router_dropout)
    if cfg.router == "mlp":
        return MLPRouter(d, cfg.router_hidden, n_experts, act=cfg.router_act, bias=cfg.router_bias,
                         dropout=cfg.router_dropout)
    return CosineRouter(d, cfg.router_hidden, n_experts, dropout=cfg.router_dropout)
