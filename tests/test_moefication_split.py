"""MoEfication's model-independent parts (MOE_SPEC §4(e) 1, 3, 4, 5, 7): splits, balanced assignment, the
co-activation graph, criteria and metrics on hand-made values, and the feature store (reload, budget, resume)."""
import itertools
import json
import os

import numpy as np
import pytest

from Models.moefication import coactivation as co
from Models.moefication import criteria as cr
from Models.moefication.assign import assignment_cost, exact_assign, greedy_assign
from Models.moefication.features import INDEX, FeatureReader, FeatureWriter, layer_dir
from Models.moefication.split import (adjusted_rand_index, balanced_kmeans, expert_centroids, groups_from_labels,
                                      permutation, split_neurons)
from Utils.errors import UserError


def planted_rows(E=6, size=8, d=24, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(E), size))
    centres = rng.standard_normal((E, d))
    # Rows of different norms: the split must work on directions (it L2-normalises first).
    scale = rng.uniform(0.5, 2.0, size=(E * size, 1))
    return (centres[truth] + noise * rng.standard_normal((E * size, d))) * scale, truth


def planted_activations(E=4, size=8, n=300, seed=0):
    """Each token fires one block of neurons (+ a little noise everywhere)."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(E), size))
    block = rng.integers(0, E, n)
    h = (truth[None, :] == block[:, None]) * rng.uniform(0.5, 1.5, (n, E * size))
    return h + 0.05 * rng.standard_normal((n, E * size)), truth


# ----------------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("method,metric", [("random", None), ("contiguous", None), ("kmeans", "l2"),
                                           ("kmeans", "cos"), ("graph", None)])
def test_labels_are_an_equal_partition_and_deterministic(method, metric):
    E, size = 4, 8
    template, _ = planted_rows(E, size, seed=1)
    h, _ = planted_activations(E, size, seed=1)
    kw = dict(template=template, metric=metric or "l2",
              coactivation=co.coactivation_matrix(h) if method == "graph" else None)
    labels = split_neurons(method, E, seed=3, **kw)
    assert labels.shape == (E * size,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=E).tolist() == [size] * E
    groups = groups_from_labels(labels, E)
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(E * size))
    assert all(np.array_equal(g, np.sort(g)) and (labels[g] == e).all() for e, g in enumerate(groups))
    perm = permutation(labels)
    assert np.array_equal(perm, np.concatenate(groups))
    assert np.array_equal(split_neurons(method, E, seed=3, **kw), labels)


def test_random_and_contiguous_splits():
    assert split_neurons("contiguous", 3, d_ff=6).tolist() == [0, 0, 1, 1, 2, 2]
    a, b = split_neurons("random", 4, d_ff=64, seed=0), split_neurons("random", 4, d_ff=64, seed=1)
    assert not np.array_equal(a, b)
    assert np.bincount(a).tolist() == [16] * 4


def test_bad_inputs_are_one_line_errors_naming_the_argument():
    t = np.zeros((10, 4))
    cases = [(lambda: split_neurons("kmeans", 3, template=t), "num_experts"),
             (lambda: split_neurons("random", 0, d_ff=8), "num_experts"),
             (lambda: split_neurons("kmeans", 2, template=np.zeros(10)), "template"),
             (lambda: split_neurons("kmeans", 2, template=t, metric="dot"), "metric"),
             (lambda: split_neurons("spectral", 2, template=t), "method"),
             (lambda: split_neurons("graph", 2, template=t), "coactivation"),
             (lambda: split_neurons("random", 2), "d_ff"),
             (lambda: co.CoactivationAccumulator(10).update(np.zeros((3, 9))), "activations"),
             (lambda: co.coactivation_matrix(np.zeros((4, 6)), kernel="cube"), "kernel"),
             (lambda: cr.expert_scores(np.zeros((2, 6)), [0, 0, 1, 1, 2, 2], 2), "labels"),
             (lambda: cr.expert_scores(np.zeros((2, 4)), [0, 1, 0, 1], 2, "l3"), "criterion"),
             (lambda: cr.topk_targets(np.zeros((2, 4)), 5), "k")]
    for fn, name in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert str(e.value).startswith(name + ":") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- balanced k-means
def test_exact_assignment_matches_brute_force_and_beats_greedy():
    rng = np.random.default_rng(0)
    pool = sorted(set(itertools.permutations([0, 0, 1, 1, 2, 2])))
    for _ in range(50):
        cost = rng.standard_normal((6, 3))
        best = min(assignment_cost(cost, np.array(p)) for p in pool)
        labels, _ = exact_assign(cost, [2, 2, 2])
        assert np.bincount(labels).tolist() == [2, 2, 2]
        assert assignment_cost(cost, labels) == pytest.approx(best, abs=1e-12)
        assert assignment_cost(cost, greedy_assign(cost, [2, 2, 2])) >= best - 1e-12
    # Longer cycles than swaps are needed with more clusters; start from a poor labelling.
    cost = rng.standard_normal((40, 5))
    labels, rounds = exact_assign(cost, [8] * 5, start=np.repeat(np.arange(5), 8))
    assert rounds > 0 and np.bincount(labels).tolist() == [8] * 5
    assert assignment_cost(cost, labels) <= assignment_cost(cost, greedy_assign(cost, [8] * 5)) + 1e-12


@pytest.mark.parametrize("metric", ["l2", "cos"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_kmeans_recovers_a_planted_partition(metric, seed):
    template, truth = planted_rows(seed=seed)
    labels = split_neurons("kmeans", 6, template=template, metric=metric, seed=seed)
    assert adjusted_rand_index(labels, truth) == 1.0


@pytest.mark.parametrize("metric", ["l2", "cos"])
def test_kmeans_is_invariant_under_a_permutation_of_the_neurons(metric):
    rng = np.random.default_rng(5)
    template = rng.standard_normal((96, 16))  # no planted structure: the result is a genuine local optimum
    labels = split_neurons("kmeans", 8, template=template, metric=metric, seed=7)
    for _ in range(3):
        p = rng.permutation(96)
        moved = split_neurons("kmeans", 8, template=template[p], metric=metric, seed=7)
        assert adjusted_rand_index(moved, labels[p]) == 1.0


def test_kmeans_objective_restarts_and_centroids():
    template, _ = planted_rows(seed=4, noise=0.5)
    one = balanced_kmeans(template, 6, seed=0, n_init=1)
    more = balanced_kmeans(template, 6, seed=0, n_init=4)
    assert more["objective"] <= one["objective"] + 1e-9 and one["n_iter"] >= 1
    greedy = balanced_kmeans(template, 6, seed=0, assign="greedy")
    assert np.bincount(greedy["labels"]).tolist() == [8] * 6
    cent = expert_centroids(template, one["labels"], 6)
    unit = template / np.linalg.norm(template, axis=1, keepdims=True)
    assert np.allclose(cent[2], unit[one["labels"] == 2].mean(axis=0))


# ---------------------------------------------------------------------------------------- co-activation graph
def brute_coactivation(h, kernel, bt=8):
    a = {"plain": h, "positive": np.maximum(h, 0), "l1": np.abs(h), "l2": h * h}[kernel].astype(np.float64)
    n_tok, n = a.shape
    A = np.zeros((n, n))
    for b0 in range(0, n_tok, bt):
        for i in range(n):
            for j in range(n):
                A[i, j] += min(1.0, sum(a[t, i] * a[t, j] for t in range(b0, min(n_tok, b0 + bt))))
    return A


@pytest.mark.parametrize("kernel", co.KERNELS)
@pytest.mark.parametrize("scale", ["small", "outlier", "large"])
def test_coactivation_equals_a_brute_force_count_and_is_symmetric(kernel, scale):
    rng = np.random.default_rng(2)
    h = rng.standard_normal((29, 10)) * {"small": 0.1, "outlier": 0.01, "large": 1.5}[scale]
    if scale == "outlier":  # two hot neurons: only their rows are capped, the rest goes through the GEMM
        h[::3, 4] = 4.0
        h[5, 7] = -3.0
    A = co.coactivation_matrix(h, kernel)
    want = brute_coactivation(h, kernel)
    assert np.allclose(A, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(A, A.T)
    acc = co.CoactivationAccumulator(10, kernel)  # uneven chunks: mini-batches span update calls
    for chunk in np.array_split(h, [3, 4, 17]):
        acc.update(chunk)
    assert acc.tokens == 29 and np.allclose(acc.matrix(), want, rtol=1e-5, atol=1e-5)
    capped = co.CoactivationAccumulator(10, kernel, max_tokens=16)
    capped.update(h)
    assert capped.tokens == 16 and capped.full
    assert np.allclose(capped.matrix(), brute_coactivation(h[:16], kernel), rtol=1e-5, atol=1e-5)


def test_threshold_and_graph_arrays_follow_the_decile_rule():
    A = np.zeros((4, 4))
    A[0, 1] = A[1, 0] = 3.0
    A[2, 3] = A[3, 2] = 1.0
    A[0, 2] = A[2, 0] = -2.0  # anti-correlated pair (plain kernel): never an edge
    # 16 entries sorted: −2 −2, ten 0, 1 1 3 3; deciles 10–70 % are ≤ 0, the 80 % one is 1 → τ = 0.99.
    assert co.coactivation_threshold(A) == pytest.approx(0.99)
    xadj, adjncy, w, tau = co.graph_from_coactivation(A)
    assert tau == pytest.approx(0.99)
    assert xadj.tolist() == [0, 1, 2, 3, 4] and adjncy.tolist() == [1, 0, 3, 2] and w.tolist() == [3, 3, 1, 1]
    xadj, adjncy, w, _ = co.graph_from_coactivation(A, threshold=0.5)
    assert xadj.tolist() == [0, 1, 2, 3, 4] and adjncy.tolist() == [1, 0, 3, 2] and w.tolist() == [6, 6, 2, 2]
    with pytest.raises(UserError, match="^coactivation:"):
        co.coactivation_threshold(-np.ones((3, 3)))


@pytest.mark.parametrize("kernel", co.KERNELS)
def test_graph_split_recovers_planted_coactivating_blocks(kernel):
    h, truth = planted_activations(seed=3)
    A = co.coactivation_matrix(h, kernel)
    for seed in (0, 1):
        labels = split_neurons("graph", 4, coactivation=A, seed=seed)
        assert adjusted_rand_index(labels, truth) == 1.0
    acc = co.CoactivationAccumulator(32, kernel)
    acc.update(h)
    assert adjusted_rand_index(co.graph_split(acc, 4, seed=0), truth) == 1.0


@pytest.mark.parametrize("use_affinity", [False, True])
def test_rebalance_yields_equal_sizes_moving_only_surplus(use_affinity):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.array([0] * 14 + [1] * 2 + [2] * 8))  # sizes 14 2 8 0 → 6 each
    affinity = None
    if use_affinity:
        # Part 0's neurons lose 0.5 by leaving, except 8 chosen ones that gain 1 by joining part 3: those move.
        affinity = np.zeros((24, 4))
        zero = np.flatnonzero(labels == 0)
        affinity[zero, 0] = 0.5
        chosen = zero[rng.permutation(14)[:8]]
        affinity[chosen, 0], affinity[chosen, 3] = 0.0, 1.0
    out = co.rebalance(labels, 4, seed=1, affinity=affinity)
    assert np.bincount(out, minlength=4).tolist() == [6, 6, 6, 6]
    moved = out != labels
    assert not moved[(labels == 1)].any()  # parts that were not over-full keep their neurons
    assert moved[labels == 0].sum() == 8 and moved[labels == 2].sum() == 2
    assert np.array_equal(out, co.rebalance(labels, 4, seed=1, affinity=affinity))
    if use_affinity:
        # Part 3 has room for 6 of them; the other 2 take the next best move (to part 1, gain 0 > −0.5).
        assert set(np.flatnonzero(moved & (labels == 0))) == set(chosen) and (out[chosen] == 3).sum() == 6
    else:
        assert not np.array_equal(out, co.rebalance(labels, 4, seed=2))


def test_neuron_affinity_sums_edge_weights_per_part():
    A = np.array([[0, 2, 0, 1], [2, 0, 3, 0], [0, 3, 0, 1], [1, 0, 1, 0]], dtype=float)
    xadj, adjncy, w, _ = co.graph_from_coactivation(A, threshold=1.0)
    labels = np.array([0, 0, 1, 1])
    full = co.neuron_affinity(xadj, adjncy, w, labels, 2)
    assert full.tolist() == [[2, 1], [2, 3], [3, 1], [1, 1]]
    part = co.neuron_affinity(xadj, adjncy, w, labels, 2, rows=[2])
    assert part.tolist() == [[0, 0], [0, 0], [3, 1], [0, 0]]


# ------------------------------------------------------------------------------------------ criteria, metrics
def test_criteria_on_hand_made_vectors():
    labels = np.array([0, 1, 0, 1])  # expert 0 = neurons 0, 2; expert 1 = neurons 1, 3
    h = np.array([[1.0, -2.0, 0.02, 3.0],
                  [-0.5, 0.01, -0.5, -0.03]])
    s = lambda c, **kw: cr.expert_scores(h, labels, 2, c, **kw)  # noqa: E731
    assert np.allclose(s("plain"), [[1.02, 1.0], [-1.0, -0.02]])
    assert np.allclose(s("plain", abs_plain=True), [[1.02, 1.0], [1.0, 0.02]])
    assert np.allclose(s("positive"), [[1.02, 3.0], [0.0, 0.01]])
    assert np.allclose(s("l1_norm"), [[1.02, 5.0], [1.0, 0.04]])
    assert np.allclose(s("l2_norm"), [[1.0004, 13.0], [0.5, 0.0001 + 0.0009]])
    # The seed's threshold: squares ≤ 1e-3 count 0 (0.02² = 4e-4, 0.01², 0.03² = 9e-4 all vanish).
    assert np.allclose(s("l2_norm", l2_threshold=1e-3), [[1.0, 13.0], [0.5, 0.0]])
    with pytest.raises(UserError, match="^l2_threshold:"):
        s("plain", l2_threshold=1e-3)


def test_topk_targets_ground_truth_coverage_and_recall():
    scores = np.array([[0.1, 0.7, 0.2, 0.0],
                       [0.5, 0.5, 0.0, 0.3],
                       [0.0, 0.0, 0.0, 0.0]])
    assert cr.ground_truth_select(scores, 2).tolist() == [[1, 2], [0, 1], [0, 1]]  # ties → lower index
    assert cr.topk_targets(scores, 1).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    chosen = np.array([[1, 3], [3, 2], [0, 1]])
    # token 0: 0.7/1.0; token 1: 0.3/1.3; token 2 has no mass and is skipped.
    assert cr.coverage(scores, chosen) == pytest.approx((0.7 + 0.3 / 1.3) / 2)
    mask = np.zeros((3, 4), dtype=bool)
    mask[:, 1] = True
    assert cr.coverage(scores, mask) == pytest.approx((0.7 + 0.5 / 1.3) / 2)
    assert cr.coverage(scores, cr.ground_truth_select(scores, 4)) == pytest.approx(1.0)
    pred = np.array([[0.0, 1.0, 0.0, 2.0],   # top-2 {3, 1} vs true {1, 2}: 1 hit
                     [1.0, 0.9, 0.0, 0.0],   # {0, 1} vs {0, 1}: 2 hits
                     [0.0, 0.0, 1.0, 1.0]])  # {2, 3} vs {0, 1}: 0 hits
    assert cr.recall_at_k(scores, pred, 2) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert cr.recall_at_k(scores, scores, 3) == 1.0


# -------------------------------------------------------------------------------------------- feature store
def feature_stream(n_batches=7, B=3, T=5, d=6, d_ff=10, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        x = rng.standard_normal((B, T, d)).astype(np.float32)
        h = rng.standard_normal((B, T, d_ff)).astype(np.float32)
        mask = np.ones((B, T), dtype=bool)
        mask[:, T - rng.integers(0, 3):] = False  # right padding of varying length
        mask[0, 0] = True
        yield x, h, mask


def expected_rows(dtype=np.float32, limit=None, **kw):
    xs, hs = zip(*[(x[m], h[m]) for x, h, m in feature_stream(**kw)])
    x, h = np.concatenate(xs)[:limit], np.concatenate(hs)[:limit]
    return x.astype(dtype), h.astype(dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feature_store_reloads_exactly_what_was_written(tmp_path, dtype):
    path = layer_dir(str(tmp_path), 3)
    with FeatureWriter(path, 6, 10, shard_rows=8, x_dtype=dtype, h_dtype=dtype) as w:
        for x, h, m in feature_stream():
            w.add(x, h, m)
    want_x, want_h = expected_rows(np.dtype(dtype))
    r = FeatureReader(path)
    got_x, got_h = r.load()
    assert got_x.dtype == np.dtype(dtype) and np.array_equal(got_x, want_x) and np.array_equal(got_h, want_h)
    assert r.rows == len(want_x) and all(s["rows"] == 8 for s in r.shards[:-1]) and 0 < r.shards[-1]["rows"] <= 8
    assert np.array_equal(r.shard(1, mmap=True)[1], want_h[8:16])
    assert np.array_equal(r.load(max_rows=11)[0], want_x[:11])
    assert json.load(open(os.path.join(path, INDEX)))["complete"] is True


def test_feature_budget_is_respected(tmp_path):
    w = FeatureWriter(str(tmp_path), 6, 10, shard_rows=4, max_tokens=13, x_dtype="float32", h_dtype="float32")
    taken = [w.add(x, h, m) for x, h, m in feature_stream()]
    assert sum(taken) == 13 and w.full and taken[-1] == 0
    w.close()
    x, h = FeatureReader(str(tmp_path)).load()
    want_x, want_h = expected_rows(limit=13)
    assert np.array_equal(x, want_x) and np.array_equal(h, want_h)
    assert [s["rows"] for s in FeatureReader(str(tmp_path)).shards] == [4, 4, 4, 1]


@pytest.mark.parametrize("damage", ["truncate", "no_marker", "stray_tmp", "missing_file"])
def test_killed_feature_run_resumes_from_the_last_complete_shard(tmp_path, damage):
    path = str(tmp_path / "store")
    kw = dict(shard_rows=8, x_dtype="float32", h_dtype="float32")
    w = FeatureWriter(path, 6, 10, **kw)
    for i, (x, h, m) in enumerate(feature_stream()):
        if i == 5:
            break  # "killed": no close(), the buffered rows are lost
        w.add(x, h, m)
    written = [s["rows"] for s in w.shards]
    assert len(written) >= 3
    if damage == "truncate":
        f = os.path.join(path, "h_%05d.npy" % (len(written) - 1))
        os.truncate(f, os.path.getsize(f) - 7)
    elif damage == "stray_tmp":
        open(os.path.join(path, "x_%05d.npy.tmp.123" % len(written)), "wb").write(b"\x93NUMPY partial")
    elif damage == "missing_file":
        os.remove(os.path.join(path, "x_%05d.npy" % (len(written) - 1)))
    with pytest.raises(UserError, match="incomplete"):
        FeatureReader(path)
    w2 = FeatureWriter(path, 6, 10, **kw)
    kept = len(written) - (damage in ("truncate", "missing_file"))
    assert len(w2.shards) == kept and w2.skip_remaining == 8 * kept
    assert not any(".tmp." in f for f in os.listdir(path))
    for x, h, m in feature_stream():  # the same stream from the start: stored rows are skipped
        w2.add(x, h, m)
    w2.close()
    x, h = FeatureReader(path).load()
    want_x, want_h = expected_rows()
    assert np.array_equal(x, want_x) and np.array_equal(h, want_h)
    done = FeatureWriter(path, 6, 10, **kw)  # a complete store is final
    assert done.complete and done.full and done.add(*next(feature_stream())) == 0


def test_feature_store_checks_its_inputs_and_never_unpickles(tmp_path):
    path = str(tmp_path)
    with FeatureWriter(path, 6, 10, shard_rows=4) as w:
        for x, h, m in feature_stream(n_batches=2):
            w.add(x, h, m)
        with pytest.raises(UserError, match="^h:"):
            w.add(np.zeros((2, 6)), np.zeros((2, 9)))
        with pytest.raises(UserError, match="^mask:"):
            w.add(np.zeros((2, 6)), np.zeros((2, 10)), mask=np.ones(3, dtype=bool))
        with pytest.raises(UserError, match="^x: values overflow"):
            w.add(np.full((1, 6), 1e6), np.zeros((1, 10)))
    with pytest.raises(UserError, match="index.json: existing store has d_ff=10"):
        FeatureWriter(path, 6, 12, shard_rows=4)
    np.save(os.path.join(path, "x_00000.npy"), np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="x_00000.npy"):
        FeatureReader(path).shard(0)
