"""MoEfication on the MoE core (issue 17): the unweighted selection mode, sliced experts = the dense FFN with the other
neurons masked (generic dispatch and the decode-time one-call path), router training on synthetic SwiGLU features,
and the evaluation-time selectors against numpy."""
import dataclasses

import numpy as np
import pytest

from Models.moefication.criteria import expert_scores, recall_at_k
from Models.moefication.split import expert_centroids, split_neurons


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _dense_masked(x, w1, w3, w2, act, labels, chosen):
    """numpy: the dense FFN with, per token, only the neurons of its chosen experts (chosen [N, k])."""
    a = x @ w1.T
    h = (_silu(a) if act == "silu" else np.maximum(a, 0)) * (x @ w3.T if w3 is not None else 1.0)
    keep = (labels[None, :, None] == chosen[:, None, :]).any(-1)                       # [N, d_ff]
    return (h * keep) @ w2.T


def _layer(jt, d, F, E, k, gated=True, act="silu", scoring="topk_unweighted", seed=0, **kw):
    from Models.model_args import ModelArgs
    from Models.moe.experts import Experts
    from Models.moe.layer import MoEFeedForward
    from Models.moefication.convert import moe_config
    rng = np.random.default_rng(seed)
    w1, w2 = rng.standard_normal((F, d)).astype(np.float32) * 0.3, rng.standard_normal((d, F)).astype(np.float32) * 0.3
    w3 = rng.standard_normal((F, d)).astype(np.float32) * 0.3 if gated else None
    labels = split_neurons("random", E, d_ff=F, seed=seed)
    args = ModelArgs(dim=d, n_layers=1, n_heads=4, intermediate_size=F, vocab_size=16, hidden_act=act, ffn_gated=gated)
    cfg = dataclasses.replace(moe_config(args, E, k, [0]), scoring=scoring, **kw)   # validated like any config
    jt.set_global_seed(seed)
    layer = MoEFeedForward(d, cfg)
    layer.experts = Experts.from_dense(w1, w3, w2, E, partition=labels, act=act)
    layer.eval()
    return layer, (w1, w3, w2, labels)


def test_unweighted_scoring_gives_weight_one_and_ranks_by_logit(jt):
    from Models.moe.config import MoEConfig
    from Models.moe.selection import select
    z = jt.array(np.array([[0.1, 3.0, -1.0, 3.0], [2.0, 0.0, 1.0, -5.0]], np.float32))
    sel = select(z, MoEConfig(num_experts=4, top_k=2, scoring="topk_unweighted", score_scale=2.5), training=False)
    assert sel.index.numpy().tolist() == [[1, 3], [0, 2]]          # ties → the lower expert first
    assert np.array_equal(sel.weight.numpy(), np.full((2, 2), 2.5, np.float32))


def test_expert_tensors_are_from_dense_layout(jt):
    from Models.moe.experts import Experts
    from Models.moefication.convert import expert_tensors
    rng = np.random.default_rng(0)
    w1, w3, w2 = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)), rng.standard_normal((5, 12))
    labels = split_neurons("random", 3, d_ff=12, seed=1)
    ours = expert_tensors(w1, w3, w2, labels)
    ref = Experts.from_dense(w1, w3, w2, 3, partition=labels)
    for a, b in zip(ours, (ref.w1, ref.w3, ref.w2)):
        assert np.array_equal(a.astype(np.float32), b.numpy())


@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "relu")])
@pytest.mark.parametrize("few_rows", [True, False])
def test_selected_experts_sum_to_the_masked_dense_ffn(jt, gated, act, few_rows):
    from Models.kernel_config import override, used
    d, F, E, k = 16, 64, 8, 3
    layer, (w1, w3, w2, labels) = _layer(jt, d, F, E, k, gated, act)
    x = np.random.default_rng(1).standard_normal((2, 5, d)).astype(np.float32)
    with jt.no_grad(), override(few_rows=few_rows):
        before = used["few_rows"]
        y = layer(jt.array(x)).numpy().reshape(-1, d)
        assert (used["few_rows"] > before) == few_rows        # the path under test really ran
        chosen = layer.route(jt.array(x.reshape(-1, d))).index.numpy()
    ref = _dense_masked(x.reshape(-1, d), w1, w3, w2, act, labels, chosen)
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    full = _dense_masked(x.reshape(-1, d), w1, w3, w2, act, labels, np.tile(np.arange(E), (10, 1)))
    assert np.abs(y - full).max() > 1e-2                      # k < E really drops work


@pytest.mark.parametrize("scoring,renorm", [("topk_unweighted", True), ("softmax_topk", True),
                                            ("softmax_topk", False), ("topk_softmax", True)])
def test_decode_path_equals_generic_path(jt, scoring, renorm):
    from Models.kernel_config import override
    layer, _ = _layer(jt, 24, 96, 8, 3, scoring=scoring, norm_topk_prob=renorm, score_scale=1.5, shared_experts=0)
    for rows in (1, 3, 8, 64):
        x = jt.array(np.random.default_rng(rows).standard_normal((rows, 1, 24)).astype(np.float32))
        with jt.no_grad():
            fast = layer(x).numpy()
            with override(few_rows=False):
                slow = layer(x).numpy()
        assert np.abs(fast - slow).max() <= 2e-6 * max(1.0, np.abs(slow).max()), (rows, scoring)


def test_decode_path_keeps_out_of_training_and_capacity(jt):
    from Models.moe.decode import few_rows_moe_applies
    layer, _ = _layer(jt, 16, 64, 8, 2)
    x = jt.zeros((4, 16))
    with jt.no_grad():
        assert few_rows_moe_applies(layer, x)
        assert not few_rows_moe_applies(layer, jt.zeros((65, 16)))     # many rows: the generic path
        layer.train()
        assert not few_rows_moe_applies(layer, x)
    layer.eval()
    assert not few_rows_moe_applies(layer, x)                            # gradients wanted
    capped, _ = _layer(jt, 16, 64, 8, 2, capacity_factor=1.0)
    with jt.no_grad():
        assert not few_rows_moe_applies(capped, x)


def _family_swiglu(d=16, F=128, E=8, noise=0.3, seed=0):
    """A random SwiGLU layer whose gate rows come in E families (centre + noise), the structure k-means assumes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((E, d))
    fam = rng.permutation(np.repeat(np.arange(E), F // E))
    w1 = ((centres[fam] + noise * rng.standard_normal((F, d))) / np.sqrt(d)).astype(np.float32)
    return w1, (rng.standard_normal((F, d)) / np.sqrt(d)).astype(np.float32)


def _optimizer(named, lr):
    from engine.optim import AdamW, param_groups
    return AdamW(param_groups(named, 0.0), lr, betas=(0.9, 0.999))


def test_router_training_on_synthetic_swiglu_features(jt):
    from Models.moefication.gate import train_gate
    E, k = 8, 2
    w1, w3 = _family_swiglu(E=E)
    x = np.random.default_rng(1).standard_normal((20000, 16)).astype(np.float32)     # x ~ N(0, I)
    h = _silu(x @ w1.T)                                                                # the gate template's features
    labels = split_neurons("kmeans", E, template=w1, seed=0)
    kw = dict(criterion="positive", loss="bce_topk", epochs=20, batch_size=512, lr=0.01, val_fraction=0.1, seed=0)
    weights, m = train_gate(x, h, labels, E, k, w1, _optimizer, **kw)
    assert m["val_recall"] >= 0.9 and m["val_tokens"] == 2000
    assert m["centroid_init_recall"] > m["random_init_recall"] + 0.3                   # the init already routes
    assert m["val_coverage"] <= m["oracle_coverage"] + 1e-12
    _, m_rand = train_gate(x, h, labels, E, k, w1, _optimizer, init="random", **kw)
    assert m_rand["random_init_recall"] < 0.5 <= 0.9 <= m_rand["val_recall"]           # training does the routing
    # the returned weights are the router's: recompute its recall from them in numpy
    z = np.tanh(x[:2000] @ weights["w1"].T) @ weights["w2"].T
    s = expert_scores(h[:2000], labels, E, "positive")
    assert recall_at_k(s, z, k) >= 0.85


def test_selectors_against_numpy(jt):
    from Models.moefication.selectors import GroundTruthRouter, SimilarityRouter, similarity_centroids
    layer, (w1, w3, w2, labels) = _layer(jt, 16, 64, 8, 2)
    x = np.random.default_rng(2).standard_normal((7, 16)).astype(np.float32)
    h = _silu(x @ w1.T) * (x @ w3.T)
    for crit in ("plain", "positive", "l1_norm", "l2_norm"):
        got = GroundTruthRouter(layer.experts, "product", crit)(jt.array(x)).numpy()
        assert np.allclose(got, expert_scores(h, labels, 8, crit), rtol=1e-4, atol=1e-5), crit
    got = GroundTruthRouter(layer.experts, "gate", "l2_norm", l2_threshold=1e-3)(jt.array(x)).numpy()
    assert np.allclose(got, expert_scores(_silu(x @ w1.T), labels, 8, "l2_norm", l2_threshold=1e-3), rtol=1e-4,
                       atol=1e-5)
    c = similarity_centroids(layer.experts, "gate")
    assert np.allclose(c, expert_centroids(w1, labels, 8), atol=1e-6)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = -np.linalg.norm(xn[:, None, :] - c[None], axis=-1)
    assert np.allclose(SimilarityRouter(c)(jt.array(x)).numpy(), ref, atol=1e-5)
