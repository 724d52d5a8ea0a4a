"""The MoE core (Models/moe/) against independent numpy computations, invariants and HF's loss functions.

The four MoE systems' shared parts (issues 15–18): routers, every selection mode, capacity, dispatch vs the
dense reference (values and gradients), the grouped expert kernel vs its fall-back vs numpy, upcycling and
MoEfication exactness, shared experts, the auxiliary losses' closed forms, padding exclusion, and HF parity.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from Models.kernel_config import KERNELS

from Utils.errors import UserError
from Models.moe.config import MoEConfig

RNG = np.random.default_rng(0)
ERF = np.vectorize(math.erf, otypes=[np.float64])
ACTS = {"silu": lambda a: a / (1 + np.exp(-a)), "relu": lambda a: np.maximum(a, 0),
        "gelu": lambda a: 0.5 * a * (1 + ERF(a / math.sqrt(2))),
        "gelu_tanh": lambda a: 0.5 * a * (1 + np.tanh(0.7978845608 * (a + 0.044715 * a ** 3)))}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _topk(scores, k):
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]   # ties → lower index


def _np(v):
    return v.numpy().astype(np.float64)


@pytest.fixture(scope="module")
def moe(jt):
    jt.set_global_seed(0)
    import Models.moe as m
    import Models.moe.experts as ex
    import Models.moe.dispatch as dp
    import Models.moe.aux_losses as al
    import Models.moe.selection as sl
    return dict(m=m, ex=ex, dp=dp, al=al, sl=sl)


def _cfg(**kw):
    return MoEConfig(**kw)


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_placement_and_round_trip():
    with pytest.raises(UserError, match="unknown moe key 'n_expert'"):
        MoEConfig.from_dict({"n_expert": 4}, "cfg.json")
    for bad, field in [({"top_k": 9}, "top_k"), ({"router": "rnn"}, "router"), ({"scoring": "x"}, "scoring"),
                       ({"hidden_act": "tanh"}, "hidden_act"), ({"expert_capacity": -1}, "expert_capacity"),
                       ({"capacity_factor": -0.5}, "capacity_factor"), ({"aux_z": -1.0}, "aux_z"),
                       ({"num_experts": "8"}, "num_experts"), ({"sample_topk": 2}, "sample_topk"),
                       ({"router_act": "relu"}, "router_act"), ({"aux_switch_form": "gshard"}, "aux_switch_form")]:
        with pytest.raises(UserError, match=field):
            MoEConfig.from_dict(bad, "cfg.json")
    assert MoEConfig(start_layer=16, layer_freq=2).moe_layer_ids(32) == list(range(16, 32, 2))
    assert MoEConfig(layers=[5, 1], start_layer=3).moe_layer_ids(8) == [1, 5]        # explicit list wins
    with pytest.raises(UserError, match="out of range"):
        MoEConfig(layers=[8]).moe_layer_ids(8)
    pm = MoEConfig(top_k=1, layer_freq=2, experts_per_layer=[2, 4, 8])
    assert [pm.experts_at(l, 6) for l in (0, 2, 4)] == [2, 4, 8]
    with pytest.raises(UserError, match="experts_per_layer"):
        pm.moe_layer_ids(8)
    c = MoEConfig(expert_sizes=[3, 5], num_experts=2, top_k=1, capacity_factor=1.25)
    assert MoEConfig.from_dict(c.to_dict()) == c and c.expert_sizes == (3, 5)
    assert c.capacity(16, 2) == 10 and MoEConfig(expert_capacity=3).capacity(16, 8) == 3


# ------------------------------------------------------------------------------------------------ routers
def test_router_logits_match_numpy(jt, moe):
    r = moe["m"]
    x = RNG.standard_normal((7, 6)).astype(np.float32)
    lin = r.LinearRouter(6, 4, bias=True)
    ref = x @ _np(lin.gate.weight).T + _np(lin.gate.bias)
    assert np.allclose(_np(lin(jt.array(x))), ref, atol=1e-5)
    for act, fn in (("tanh", np.tanh), ("gelu", ACTS["gelu"])):
        mlp = r.MLPRouter(6, 5, 4, act=act, bias=True)
        h = fn(x @ _np(mlp.w1.weight).T + _np(mlp.w1.bias))
        assert mlp.w2.bias is None
        assert np.allclose(_np(mlp(jt.array(x))), h @ _np(mlp.w2.weight).T, atol=1e-5)
    cos = r.CosineRouter(6, 3, 4)
    cos.tau.assign(jt.array(np.array([0.7], np.float32)))
    u = x @ _np(cos.proj.weight).T
    c = _np(cos.centroids)
    ref = (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    got = _np(cos(jt.array(x)))
    assert np.allclose(got, ref * math.exp(0.7), atol=1e-5)
    assert np.allclose(_np(cos(jt.array(3.5 * x))), got, atol=1e-5)                    # scale invariant
    assert np.abs(got).max() <= math.exp(0.7) + 1e-5
    zero = _np(cos(jt.array(np.zeros((2, 6), np.float32))))                            # no NaN from 0/0
    assert np.isfinite(zero).all()
    assert sorted(n for n, _ in r.build_router(_cfg(router="gmm", router_hidden=3), 6, 4).named_parameters()) == \
        ["centroids", "proj.weight", "tau"]


# ------------------------------------------------------------------------------------------------ selection
def _sel(moe, z, training=False, **kw):
    import jittor as jt
    mask = kw.pop("token_mask", None)
    group = kw.pop("group_size", None)
    noise = kw.pop("noise_logits", None)
    return moe["m"].select(jt.array(z), _cfg(**kw), training, token_mask=mask, group_size=group,
                           noise_logits=None if noise is None else jt.array(noise))


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_with_and_without_renormalisation(moe, norm):
    z = RNG.standard_normal((33, 6)).astype(np.float32)
    s = _sel(moe, z, num_experts=6, top_k=3, norm_topk_prob=norm, score_scale=1.5)
    p = _softmax(z.astype(np.float64))
    idx = _topk(p, 3)
    w = np.take_along_axis(p, idx, 1)
    if norm:
        w = w / w.sum(1, keepdims=True)
    assert (s.index.numpy() == idx).all() and s.index.dtype == "int32"
    assert np.allclose(_np(s.weight), 1.5 * w, atol=1e-6) and np.allclose(_np(s.probs), p, atol=1e-6)
    assert s.kept.numpy().all()


def test_topk_softmax_and_ties_toward_lower_index(moe):
    z = RNG.standard_normal((20, 5)).astype(np.float32)
    s = _sel(moe, z, num_experts=5, top_k=2, scoring="topk_softmax")
    idx = _topk(z, 2)
    assert (s.index.numpy() == idx).all()
    assert np.allclose(_np(s.weight), _softmax(np.take_along_axis(z, idx, 1).astype(np.float64)), atol=1e-6)
    ties = RNG.integers(0, 3, size=(512, 64)).astype(np.float32)                       # many exact ties
    assert (_sel(moe, ties, num_experts=64, top_k=6).index.numpy() == _topk(ties, 6)).all()


def test_sample_topk_keeps_the_argmax_ones_and_is_deterministic_in_eval(moe):
    z = (3 * RNG.standard_normal((256, 8))).astype(np.float32)
    kw = dict(num_experts=8, top_k=3, sample_topk=2, norm_topk_prob=False)
    tr = _sel(moe, z, training=True, **kw).index.numpy()
    assert (tr[:, 0] == _topk(z, 1)[:, 0]).all()
    assert all(len(set(row)) == 3 for row in tr)                                         # distinct experts
    assert (tr[:, 1:] != _topk(z, 3)[:, 1:]).any()                                       # really sampled
    ev = [_sel(moe, z, **kw).index.numpy() for _ in range(2)]
    assert (ev[0] == ev[1]).all() and (ev[0] == _topk(z, 3)).all()
    # sampling follows the remaining probabilities: an expert holding ~all the rest of the mass is drawn
    z2 = np.tile(np.array([[9.0, 8.0, -9, -9, -9, -9, -9, -9]], np.float32), (64, 1))
    assert (_sel(moe, z2, training=True, num_experts=8, top_k=2, sample_topk=1).index.numpy()[:, 1] == 1).all()


def test_noisy_gating_numpy_and_eval_determinism(moe):
    z = RNG.standard_normal((40, 4)).astype(np.float32)
    nz = RNG.standard_normal((40, 4)).astype(np.float32)
    kw = dict(num_experts=4, top_k=2, noisy_gating=True, scoring="topk_softmax")
    a, b = _sel(moe, z, training=True, noise_logits=nz, **kw), _sel(moe, z, training=True, noise_logits=nz, **kw)
    assert not np.allclose(_np(a.logits), _np(b.logits))
    assert np.allclose(_np(a.noise_std), np.log1p(np.exp(nz)) + 0.01, atol=1e-6)
    assert np.allclose(_np(a.clean_logits), z)
    e1, e2 = _sel(moe, z, noise_logits=nz, **kw), _sel(moe, z, **kw)
    assert np.array_equal(_np(e1.weight), _np(e2.weight)) and e1.noise_std is None
    assert np.allclose(_np(e1.logits), z)


def _np_capacity(idx, mask, G, S, E, C):
    kept = np.zeros(idx.shape, bool)
    for g in range(G):
        used = np.zeros(E, int)
        for j in range(idx.shape[1]):                                                    # first choices first
            for t in range(S):
                n = g * S + t
                if mask[n] and used[idx[n, j]] < C:
                    used[idx[n, j]] += 1
                    kept[n, j] = True
    return kept


def test_capacity_priority_drop_and_padding(moe):
    G, S, E, k = 3, 10, 4, 2
    z = RNG.standard_normal((G * S, E)).astype(np.float32)
    z[:, 0] += 2.0                                                                       # overload expert 0
    mask = RNG.random(G * S) > 0.2
    s = _sel(moe, z, num_experts=E, top_k=k, capacity_factor=1.0, group_size=S, token_mask=mask)
    C = math.ceil(k * S / E)
    assert s.capacity == C
    ref = _np_capacity(_topk(z, k), mask, G, S, E, C)
    kept = s.kept.numpy()
    assert (kept == ref).all() and (~kept).any()
    assert (_np(s.weight)[~kept] == 0).all() and (_np(s.weight)[kept] > 0).all()
    for g in range(G):
        rows = slice(g * S, (g + 1) * S)
        assert np.bincount(s.index.numpy()[rows][kept[rows]], minlength=E).max() <= C


# ------------------------------------------------------------------------------------------------ dispatch
def _layer(jt, **kw):
    from Models.moe import MoEFeedForward
    d = kw.pop("d", 8)
    hidden = kw.pop("expert_hidden_dense", 12)
    return MoEFeedForward(d, _cfg(**kw), expert_hidden=hidden, init_std=0.3)


@pytest.mark.parametrize("path", ["kernel", "fallback", "per_expert"])
@pytest.mark.parametrize("gated", [True, False])
def test_dispatch_equals_dense_reference_values_and_gradients(jt, moe, monkeypatch, path, gated):
    if path == "fallback":
        monkeypatch.setattr(KERNELS, "grouped_experts", False)
    if path == "kernel":                                                                  # static shapes: no host
        monkeypatch.setattr(moe["dp"], "run_per_expert", None)                            # sync, no per-expert cut
    layer = _layer(jt, num_experts=4, top_k=2, expert_sizes=[5, 12, 3, 8], gated=gated,
                   hidden_act="silu" if gated else "gelu", capacity_factor=0.5, router_bias=True)
    layer.router.gate.bias.assign(jt.array(np.array([3, 3, 0, 0], np.float32)))     # crowd experts 0, 1
    x = jt.array(RNG.standard_normal((24, 8)).astype(np.float32))
    sel = layer.route(x, group_size=6)
    runner = layer.experts.run if path == "per_expert" else layer.experts
    y = moe["dp"].combine(x, sel, runner, 4)
    ref = moe["dp"].dense_reference(x, sel, layer.experts.run, 4)
    R = jt.array(RNG.standard_normal((24, 8)).astype(np.float32))
    params = [x, layer.router.gate.weight] + layer.experts._weights()
    g = jt.grad((y * R).sum(), params)
    gr = jt.grad((ref * R).sum(), params)
    assert np.allclose(y.numpy(), ref.numpy(), atol=1e-5)
    for a, b in zip(g, gr):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-5)
    dropped = ~sel.kept.numpy().any(1)
    assert dropped.any() and (y.numpy()[dropped] == 0).all()                          # exactly 0, residual only


@pytest.mark.parametrize("fallback", [False, True])
def test_unselected_expert_gets_exactly_zero_gradient(jt, moe, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(KERNELS, "grouped_experts", False)
    layer = _layer(jt, num_experts=4, top_k=2, router_bias=True)
    layer.router.gate.bias.assign(jt.array(np.array([0, 0, 0, -50], np.float32)))   # expert 3 never chosen
    y = layer(jt.array(RNG.standard_normal((2, 6, 8)).astype(np.float32)))
    g = jt.grad((y * y).sum(), layer.experts._weights())
    rows = slice(*layer.experts.offsets[3:5])
    for gw in g:
        assert (gw.numpy()[rows] == 0).all() and np.abs(gw.numpy()[:rows.start]).max() > 0


def test_moe_lora_experts_through_dense_selection(jt, moe):
    """MoA's AdaMoLE shape: LoRA experts, a threshold keeps a variable number of experts per token."""
    from Models.adapters import LoraExpert
    experts = [LoraExpert(8, 6, 4, 8.0) for _ in range(3)]
    for ex_ in experts:
        ex_.lora_B.weight.assign(jt.array(RNG.standard_normal((6, 4)).astype(np.float32)))
    x = jt.array(RNG.standard_normal((10, 8)).astype(np.float32))
    logits = jt.array(RNG.standard_normal((10, 3)).astype(np.float32))
    p = moe["sl"].softmax32(logits)
    w = p - 1.0 / 3
    kept = w >= 0
    sel = moe["sl"].dense_selection(logits, w, kept)
    run = lambda e, rows: experts[e](rows)
    y = moe["dp"].combine(x, sel, run, 3, d_out=6)
    ref = moe["dp"].dense_reference(x, sel, run, 3)
    assert y.shape == [10, 6] and np.allclose(y.numpy(), ref.numpy(), atol=1e-5)
    params = [x, logits] + [ex_.lora_A.weight for ex_ in experts]
    for a, b in zip(jt.grad((y * y).sum(), params), jt.grad((ref * ref).sum(), params)):
        assert np.allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_gather_scatter_rows(jt, moe):
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    rows = np.array([4, 0, 4, 2], np.int32)
    xv = jt.array(x)
    got = moe["dp"].gather_rows(xv, jt.array(rows))
    assert np.array_equal(got.numpy(), x[rows])
    v = RNG.standard_normal((4, 3)).astype(np.float32)
    ref = np.zeros((6, 3), np.float32)
    np.add.at(ref, rows, v)
    vv = jt.array(v)
    sc = moe["dp"].scatter_rows(6, jt.array(rows), vv)
    assert np.allclose(sc.numpy(), ref)
    W = RNG.standard_normal((6, 3)).astype(np.float32)
    assert np.allclose(jt.grad((sc * jt.array(W)).sum(), vv).numpy(), W[rows])
    assert np.allclose(jt.grad((got * vv).sum(), xv).numpy(), _accumulate(x.shape, rows, v))


def _accumulate(shape, rows, v):
    out = np.zeros(shape, np.float32)
    np.add.at(out, rows, v)
    return out


# ------------------------------------------------------------------------------------------------ experts
def _np_experts(x, w1, w3, w2, offs, ro, act, R):
    """numpy forward and gradients of Σ y·R for experts on sorted rows (rows past ro[-1] are dropped)."""
    f, df = ACTS[act], None
    y = np.zeros_like(x)
    dx, dw1, dw2 = np.zeros_like(x), np.zeros_like(w1), np.zeros_like(w2)
    dw3 = None if w3 is None else np.zeros_like(w3)
    eps = 1e-6
    for e in range(len(offs) - 1):
        r, c = slice(ro[e], ro[e + 1]), slice(offs[e], offs[e + 1])
        xe = x[r]
        a = xe @ w1[c].T
        b = None if w3 is None else xe @ w3[c].T
        fa = f(a)
        h = fa if b is None else fa * b
        y[r] = h @ w2[c]
        g = R[r]
        dw2[c] = h.T @ g
        dh = g @ w2[c].T
        dfa = (f(a + eps) - f(a - eps)) / (2 * eps)                                    # central difference of act
        da = dh * dfa * (1 if b is None else b)
        dw1[c] = da.T @ xe
        dx[r] = da @ w1[c]
        if b is not None:
            db = dh * fa
            dw3[c] = db.T @ xe
            dx[r] += db @ w3[c]
    return y, dx, dw1, dw2, dw3


# Row offsets: expert 1 empty and 3 rows dropped (work per expert 20/0/21/16: on 2 threads the longest-first
# split is too uneven, so the experts run in order with multi-threaded GEMMs); and every expert busy, no row dropped
# (work 20/48/12/32: on 2 threads each thread runs whole experts with single-threaded GEMMs).
ROW_OFFSETS = {"uneven": [0, 4, 4, 11, 13], "even": [0, 4, 8, 12, 16]}


@pytest.mark.parametrize("rows", sorted(ROW_OFFSETS))
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu", True), ("relu", False), ("gelu_tanh", False)])
def test_grouped_kernel_vs_fallback_vs_numpy(jt, moe, monkeypatch, act, gated, rows):
    ex = moe["ex"]
    sizes = [5, 12, 3, 8]
    E = ex.Experts(6, sizes, act=act, gated=gated, init_std=0.4)
    ro = np.array(ROW_OFFSETS[rows], np.int32)
    x = RNG.standard_normal((16, 6)).astype(np.float32)
    R = RNG.standard_normal((16, 6)).astype(np.float64)
    ws = [E.w1, E.w2] + ([E.w3] if gated else [])
    results = []
    for on in (True, False):
        monkeypatch.setattr(KERNELS, "grouped_experts", on)
        assert ex.grouped_kernel_available(jt.array(x), ws) == on
        xv = jt.array(x)
        y = E.forward_sorted(xv, jt.array(ro))
        results.append([y.numpy()] + [g.numpy() for g in jt.grad((y * jt.array(R.astype(np.float32))).sum(),
                                                                   [xv] + ws)])
    w = [_np(v) for v in ws]
    ref = _np_experts(x.astype(np.float64), w[0], w[2] if gated else None, w[1], E.offsets, ro, act, R)
    ref = [ref[0], ref[1], ref[2], ref[3]] + ([ref[4]] if gated else [])
    for kern, fb, r in zip(results[0], results[1], ref):
        assert np.allclose(kern, fb, atol=2e-5) and np.allclose(kern, r, atol=1e-4)
    if ro[2] == ro[1]:
        empty = slice(E.offsets[1], E.offsets[2])
        assert all((g[empty] == 0).all() for g in results[0][2:])                       # empty expert: exact 0
    assert (results[0][0][ro[-1]:] == 0).all() and (results[0][1][ro[-1]:] == 0).all()  # dropped rows: exact 0
    monkeypatch.setattr(KERNELS, "grouped_experts", True)
    for wv in ws:                                                                       # frozen experts: dx only
        wv.stop_grad()
    xv = jt.array(x)
    dx = jt.grad((E.forward_sorted(xv, jt.array(ro)) * jt.array(R.astype(np.float32))).sum(), xv)
    assert np.allclose(dx.numpy(), results[0][1], atol=1e-5)


def _dense_ffn(x, w1, w3, w2, act="silu"):
    h = ACTS[act](x @ w1.T)
    return (h if w3 is None else h * (x @ w3.T)) @ w2.T                                 # w2 [d, F]


def test_from_dense_upcycling_copies_and_moefication_slices(jt, moe):
    ex = moe["ex"]
    d, F, E = 6, 12, 4
    w1, w3 = RNG.standard_normal((F, d)).astype(np.float32), RNG.standard_normal((F, d)).astype(np.float32)
    w2 = RNG.standard_normal((d, F)).astype(np.float32)
    x = RNG.standard_normal((9, d)).astype(np.float32)
    dense = _dense_ffn(x.astype(np.float64), w1, w3, w2)
    up = ex.Experts.from_dense(w1, w3, w2, E)
    assert up.sizes == (F,) * E
    for e in range(E):
        a, b = up.offsets[e], up.offsets[e + 1]
        assert np.array_equal(up.w1.numpy()[a:b], w1) and np.array_equal(up.w2.numpy()[a:b], w2.T)
        assert np.allclose(up.run(e, jt.array(x)).numpy(), dense, atol=1e-4)
    noisy = ex.Experts.from_dense(w1, w3, w2, 2, noise=1e-3, rng=np.random.default_rng(1))
    assert 0 < np.abs(noisy.w1.numpy()[:F] - noisy.w1.numpy()[F:]).max() < 1e-2
    labels = RNG.permutation(np.arange(F) % E)
    for part in (labels, [np.nonzero(labels == e)[0][::-1] for e in range(E)]):
        mf = ex.Experts.from_dense(w1, w3, w2, E, partition=part)
        total = sum(mf.run(e, jt.array(x)).numpy().astype(np.float64) for e in range(E))
        assert np.allclose(total, dense, atol=1e-4)
        e0 = np.nonzero(labels == 0)[0]
        assert np.allclose(mf.run(0, jt.array(x)).numpy(), _dense_ffn(x, w1[e0], w3[e0], w2[:, e0]), atol=1e-4)
    with pytest.raises(ValueError):
        ex.Experts.from_dense(w1, w3, w2, E, partition=np.zeros(F, int))                # empty experts


def test_upcycled_layer_reproduces_the_dense_ffn(jt, moe):
    """k = E (and k < E) with identical experts and renormalisation = one expert = the dense FFN (§1(e)4, §2(e)1);
    without renormalisation the output is (Σ_S p)·FFN(x) (the ActiveMoE mode); MoEfication with a uniform router,
    k = E and score_scale E sums the slices back to the dense FFN (§4(e)8)."""
    ex = moe["ex"]
    d, F = 8, 12
    w1, w3 = RNG.standard_normal((F, d)).astype(np.float32), RNG.standard_normal((F, d)).astype(np.float32)
    w2 = RNG.standard_normal((d, F)).astype(np.float32)
    x = RNG.standard_normal((2, 5, d)).astype(np.float32)
    dense = _dense_ffn(x.reshape(10, d).astype(np.float64), w1, w3, w2).reshape(2, 5, d)
    for k, norm in ((4, True), (2, True), (2, False)):
        layer = _layer(jt, num_experts=4, top_k=k, norm_topk_prob=norm, expert_hidden=F)
        layer.experts = ex.Experts.from_dense(w1, w3, w2, 4)
        y = layer(jt.array(x)).numpy()
        scale = 1.0 if norm else _np(layer.pop_selection().weight).sum(1).reshape(2, 5, 1)
        assert np.allclose(y, scale * dense, atol=1e-4)
    layer = _layer(jt, num_experts=4, top_k=4, norm_topk_prob=False, score_scale=4.0, expert_sizes=[3] * 4)
    layer.router.gate.weight.assign(jt.zeros((4, d)))
    layer.experts = ex.Experts.from_dense(w1, w3, w2, 4, partition=np.arange(F) % 4)
    assert np.allclose(layer(jt.array(x)).numpy(), dense, atol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts(jt, moe, gate):
    layer = _layer(jt, num_experts=4, top_k=2, shared_experts=2, shared_hidden=5, shared_gate=gate)
    x = RNG.standard_normal((1, 7, 8)).astype(np.float32)
    y = layer(jt.array(x)).numpy().reshape(7, 8)
    sel = layer.pop_selection()
    routed = moe["dp"].dense_reference(jt.array(x.reshape(7, 8)), sel, layer.experts.run, 4).numpy()
    sh = layer.shared
    assert sh.w1.shape == [10, 8]
    h = ACTS["silu"](x.reshape(7, 8) @ _np(sh.w1).T) * (x.reshape(7, 8) @ _np(sh.w3).T)
    ref = h @ _np(sh.w2)
    if gate:
        ref = ref / (1 + np.exp(-(x.reshape(7, 8) @ _np(sh.gate.weight).T)))
    assert np.allclose(y, routed + ref, atol=1e-4)


# ------------------------------------------------------------------------------------------------ aux losses
def _balanced_logits(N, E, k, confident=30.0):
    """Token t strongly prefers experts (t + j) mod E for j < k: equal counts and a uniform mean probability."""
    z = np.zeros((N, E), np.float32)
    for t in range(N):
        for j in range(k):
            z[t, (t + j) % E] = confident - j
    return z


def _losses(moe, sels):
    al = moe["al"]
    return dict(mixtral=al.switch_loss(sels, "mixtral").item(), t5=al.switch_loss(sels, "switch_t5").item(),
                normalized=al.switch_loss(sels, "normalized").item(), seq=al.seq_aux_loss(sels).item(),
                cv2=al.cv2_loss(sels).item(), mi=al.mi_loss(sels).item(), z=al.z_loss(sels).item())


@pytest.mark.parametrize("k", [1, 2])
def test_aux_losses_closed_forms(moe, k):
    E, N, S = 4, 16, 8
    bal = _losses(moe, [_sel(moe, _balanced_logits(N, E, k), num_experts=E, top_k=k, group_size=S)] * 2)
    assert bal["mixtral"] == pytest.approx(k, abs=1e-4) and bal["normalized"] == pytest.approx(1, abs=1e-4)
    assert bal["t5"] == pytest.approx(k, abs=1e-4) and bal["seq"] == pytest.approx(1, abs=1e-4)
    assert bal["cv2"] == pytest.approx(0, abs=1e-6)
    assert bal["mi"] == pytest.approx(-math.log(E), abs=1e-4) if k == 1 else -math.log(E) < bal["mi"] < 0
    z = _balanced_logits(N, E, 1)
    z[:, 0] = 40.0                                                                       # collapse onto expert 0
    col = _losses(moe, [_sel(moe, z, num_experts=E, top_k=k, group_size=S)])
    assert col["mixtral"] == pytest.approx(E, abs=1e-3) and col["seq"] == pytest.approx(E / k, rel=1e-3)
    assert col["t5"] == pytest.approx(E, abs=1e-3) and col["mi"] == pytest.approx(0, abs=1e-4)
    uni = _losses(moe, [_sel(moe, np.zeros((N, E), np.float32), num_experts=E, top_k=k, group_size=S)])
    assert uni["mi"] == pytest.approx(0, abs=1e-6) and uni["z"] == pytest.approx(math.log(E) ** 2, abs=1e-5)
    assert uni["mixtral"] == pytest.approx(k, abs=1e-5)                                 # uniform p: k, any counts


def _np_losses(z_layers, mask, k, S, E):
    """Independent numpy versions of every loss on per-layer logits [N, E] with a token mask [N]."""
    m = mask.astype(np.float64)
    p = [_softmax(z.astype(np.float64)) for z in z_layers]
    oh = [np.eye(E)[_topk(pl, k)].sum(1) for pl in p]                                  # [N, E]
    rows = m.sum() * len(p)
    f = sum((o * m[:, None]).sum(0) for o in oh) / rows
    P = sum((pl * m[:, None]).sum(0) for pl in p) / rows
    out = {"mixtral": E * (f * P).sum()}
    G = len(mask) // S
    mg = m.reshape(G, S, 1)
    fg = sum(((o > 0) * m[:, None]).reshape(G, S, E).sum(1) for o in oh) / (mg.sum(1) * len(p))
    pg = sum((pl * m[:, None]).reshape(G, S, E).sum(1) for pl in p) / (mg.sum(1) * len(p))
    out["t5"] = (fg * pg).mean() * E * E
    seq, mi, zl, cv = [], [], [], []
    for pl, o, z in zip(p, oh, z_layers):
        L = mg.sum(1)
        c = (o * m[:, None]).reshape(G, S, E).sum(1) * E / (L * k)
        seq.append(((c * (pl * m[:, None]).reshape(G, S, E).sum(1) / L).sum(1)).mean())
        pbar = (pl * m[:, None]).sum(0) / m.sum()
        ent = lambda q: -(q * np.log(np.maximum(q, 1e-30))).sum(-1)
        mi.append((ent(pl) * m).sum() / m.sum() - ent(pbar))
        lse = np.log(np.exp(z.astype(np.float64)).sum(1))
        zl.append((lse ** 2 * m).sum() / m.sum())
        w = np.take_along_axis(pl, _topk(pl, k), 1)
        w = w / w.sum(1, keepdims=True)
        imp = ((np.eye(E)[_topk(pl, k)] * w[..., None]).sum(1) * m[:, None]).sum(0)
        load = (o * m[:, None]).sum(0)
        cv.append(sum(v.var(ddof=1) / (v.mean() ** 2 + 1e-10) for v in (imp, load)))
    out.update(seq=np.mean(seq), mi=np.mean(mi), z=np.mean(zl), cv2=np.mean(cv))
    return out


def test_aux_losses_match_numpy_and_ignore_padding(moe):
    E, k, G, S = 5, 2, 3, 6
    zs = [RNG.standard_normal((G * S, E)).astype(np.float32) for _ in range(2)]
    mask = RNG.random(G * S) > 0.3
    mask[:S] = True
    kw = dict(num_experts=E, top_k=k, group_size=S, token_mask=mask)
    ours = _losses(moe, [_sel(moe, z, **kw) for z in zs])
    ref = _np_losses(zs, mask, k, S, E)
    for name in ("mixtral", "t5", "seq", "mi", "z", "cv2"):
        assert ours[name] == pytest.approx(ref[name], rel=1e-4, abs=1e-6), name
    changed = [z.copy() for z in zs]
    for z in changed:
        z[~mask] = 50 * RNG.standard_normal((int((~mask).sum()), E))                   # pads' logits only
    assert _losses(moe, [_sel(moe, z, **kw) for z in changed]) == pytest.approx(ours, rel=1e-5, abs=1e-6)


def test_noisy_cv2_uses_the_smooth_load_estimate(jt, moe):
    E, k, N = 4, 2, 12
    z = RNG.standard_normal((N, E)).astype(np.float32)
    nz = RNG.standard_normal((N, E)).astype(np.float32)
    s = _sel(moe, z, training=True, num_experts=E, top_k=k, noisy_gating=True, noise_logits=nz)
    noisy, std = _np(s.logits), _np(s.noise_std)
    top = -np.sort(-noisy, 1)
    thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]
    cdf = lambda v: 0.5 * (1 + ERF(v / math.sqrt(2)))
    prob = np.where(noisy > thr_in, cdf((z - thr_in) / std), cdf((z - thr_out) / std))
    assert np.allclose(_np(moe["al"].smooth_load(s)), prob.sum(0), atol=1e-5)
    imp = _np(s.dense_weights()).sum(0)
    cv = lambda v: v.var(ddof=1) / (v.mean() ** 2 + 1e-10)
    assert moe["al"].cv2_loss([s]).item() == pytest.approx(cv(imp) + cv(prob.sum(0)), rel=1e-4)


def test_aux_gradient_reaches_only_the_router_and_terms_follow_coefficients(jt, moe):
    layer = _layer(jt, num_experts=4, top_k=2, aux_switch=0.01, aux_z=1e-3, router="mlp", router_bias=True)
    layer(jt.array(RNG.standard_normal((2, 6, 8)).astype(np.float32)))
    terms = moe["al"].aux_loss_terms([layer.pop_selection()], layer.cfg)
    assert sorted(terms) == ["aux_switch", "aux_z"] and layer.cfg.aux_weights() == {"aux_switch": 0.01,
                                                                                    "aux_z": 1e-3}
    total = terms["aux_switch"] + terms["aux_z"]
    grads = jt.grad(total, [p for _, p in layer.named_parameters()])
    for (name, _), g in zip(layer.named_parameters(), grads):
        assert (np.abs(g.numpy()).max() > 0) == name.startswith("router."), name


def test_denormal_and_extreme_inputs_stay_finite(jt, moe):
    """Flush-to-zero / fast math: every sqrt, log and division of the core is clamped first (docs/jittor_notes.md)."""
    tiny = np.full((4, 6), 1e-40, np.float32)                                            # float32 denormals
    cos = moe["m"].CosineRouter(6, 3, 4)
    assert np.isfinite(cos(jt.array(tiny)).numpy()).all()
    z = np.array([[0.0, -100.0, -100.0, -100.0]] * 8, np.float32)                       # p ≈ 4e-44: denormal
    z[4:, :] = z[4:, ::-1]
    for kw in (dict(scoring="softmax_topk"), dict(scoring="topk_softmax"), dict(capacity_factor=0.5)):
        sels = [_sel(moe, z, num_experts=4, top_k=2, group_size=4, **kw)]
        assert all(np.isfinite(v) for v in _losses(moe, sels).values())
        assert np.isfinite(_np(sels[0].weight)).all()
    layer = _layer(jt, num_experts=4, top_k=2, router="gmm", router_hidden=4)
    y = layer(jt.array(np.full((1, 3, 8), 1e-40, np.float32)))
    g = jt.grad((y * y).sum() + moe["al"].mi_loss([layer.pop_selection()]), [p for _, p in layer.named_parameters()])
    assert np.isfinite(y.numpy()).all() and all(np.isfinite(v.numpy()).all() for v in g)


# ------------------------------------------------------------------------------------------------ layer
def test_layer_selection_recording_and_eval_determinism(jt, moe):
    layer = _layer(jt, num_experts=4, top_k=2, jitter=0.1, noisy_gating=True, router_dropout=0.2,
                   sample_topk=1, scoring="topk_softmax")
    assert sorted(n for n, _ in layer.named_parameters()) == ["experts.w1", "experts.w2", "experts.w3",
                                                              "noise.weight", "router.gate.weight"]
    x = jt.array(RNG.standard_normal((2, 5, 8)).astype(np.float32))
    layer.train()
    layer(x)
    assert layer.pop_selection() is not None and layer.pop_selection() is None
    layer.eval()
    with jt.no_grad():
        a = layer(x).numpy()
        assert layer.pop_selection() is None                                            # generation keeps nothing
        layer.record = True
        b = layer(x).numpy()
        assert layer.pop_selection() is not None
    assert np.array_equal(a, b)
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    layer.record = False
    layer(x, token_mask=mask)
    assert layer.pop_selection().token_mask.numpy().sum() == 8


# ------------------------------------------------------------------------------------------------ HF parity
_HF_ORACLE = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func as qwen2
    from transformers.models.switch_transformers import modeling_switch_transformers as st
    d = np.load(sys.argv[1])
    B, T, L, E, k = (int(v) for v in d["dims"])
    z = torch.tensor(d["logits"])                                  # [L, B*T, E]
    mask = torch.tensor(d["mask"])                                 # [B, T]
    layers = tuple(z[i] for i in range(L))
    cat = torch.cat([z[i].reshape(B, T, E) for i in range(L)], dim=1)   # Switch: layers along the sequence
    out = dict(mixtral=mixtral(layers, E, k, mask).item(), mixtral_nomask=mixtral(layers, E, k).item(),
               qwen2=qwen2(layers, E, k, mask).item(),
               t5=st.load_balancing_loss_func(torch.softmax(cat, -1), cat.argmax(-1)).item(),
               z=st.router_z_loss_func(cat).item())
    np.savez(sys.argv[2], **{n: np.float64(v) for n, v in out.items()})
""")


def test_switch_and_z_losses_match_huggingface(moe, tmp_path):
    """HF's own loss functions on the same logits, in a torch subprocess (torch and Jittor each bring a oneDNN).
    torch + transformers come with requirements-test.txt: a missing one fails this test, it does not skip."""
    B, T, L, E, k = 3, 7, 2, 6, 2
    logits = RNG.standard_normal((L, B * T, E)).astype(np.float32)
    mask = RNG.random((B, T)) > 0.25
    mask[:, 0] = True
    np.savez(tmp_path / "in.npz", dims=np.array([B, T, L, E, k]), logits=logits, mask=mask.astype(np.int64))
    script = tmp_path / "oracle.py"
    script.write_text(_HF_ORACLE)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert res.returncode == 0, \
        "HF oracle failed (torch/transformers from requirements-test.txt?):\n" + res.stderr[-2000:]
    hf = np.load(tmp_path / "out.npz")
    al = moe["al"]
    masked = [_sel(moe, logits[i], num_experts=E, top_k=k, group_size=T, token_mask=mask.reshape(-1))
              for i in range(L)]
    plain = [_sel(moe, logits[i], num_experts=E, top_k=k, group_size=T) for i in range(L)]
    top1 = [_sel(moe, logits[i], num_experts=E, top_k=1, group_size=T) for i in range(L)]
    assert al.switch_loss(masked, "mixtral").item() == pytest.approx(float(hf["mixtral"]), rel=1e-5)
    assert al.switch_loss(masked, "mixtral").item() == pytest.approx(float(hf["qwen2"]), rel=1e-5)
    assert al.switch_loss(plain, "mixtral").item() == pytest.approx(float(hf["mixtral_nomask"]), rel=1e-5)
    assert al.switch_loss(top1, "switch_t5").item() == pytest.approx(float(hf["t5"]), rel=1e-5)
    assert al.z_loss(top1).item() == pytest.approx(float(hf["z"]), rel=1e-5)
