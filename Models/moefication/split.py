"""Partition of one FFN layer's d_ff intermediate neurons into E equal groups (MoEfication's expert construction).

`split_neurons(method, E, ...)` returns `labels` (int64 [d_ff], the expert of each neuron). Methods (MOE_SPEC §4(a).1):

* `random`     — a seeded shuffle of E·[d_ff/E] balanced labels (llama-moe's random split, its best method);
* `contiguous` — blocks of d_ff/E consecutive neurons (thunlp's "random" split);
* `kmeans`     — balanced k-means on the L2-normalised template rows (W_gate or W_up, [d_ff, d]), metric "l2"
                 (centroid = mean) or "cos" (centroid direction = normalised mean), sizes exactly d_ff/E;
* `graph`      — co-activation graph partitioned by METIS, then rebalanced (see `coactivation.py`).

Every method is deterministic given its seed. k-means is also invariant (up to relabelling) under a permutation of
the neurons: its initialisation is chosen from the rows' values (a seeded random direction, then farthest points),
never from their positions, and the assignment step is an exact optimum, which does not depend on the order.
"""
import numpy as np

from Models.moefication.assign import exact_assign, greedy_assign
from Utils.errors import UserError

METHODS = ("random", "contiguous", "kmeans", "graph")
METRICS = ("l2", "cos")


def check_num_experts(d_ff, num_experts, what="num_experts"):
    """Group size d_ff/E, or a UserError naming the argument."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, (int, np.integer)) or num_experts < 1:
        raise UserError("%s: expected a positive integer, got %r" % (what, num_experts))
    if d_ff % num_experts:
        raise UserError("%s: %d does not divide d_ff=%d into equal experts" % (what, num_experts, d_ff))
    return d_ff // int(num_experts)


def check_labels(labels, num_experts, d_ff=None, what="labels"):
    """Labels as int64 [d_ff], each expert holding exactly d_ff/E neurons, or a UserError naming the argument."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError("%s: expected a 1-D integer array, got shape %s dtype %s" % (what, labels.shape, labels.dtype))
    if d_ff is not None and labels.size != d_ff:
        raise UserError("%s: %d neurons, the layer has d_ff=%d" % (what, labels.size, d_ff))
    size = check_num_experts(labels.size, num_experts)
    if labels.min() < 0 or labels.max() >= num_experts:
        raise UserError("%s: values must lie in [0, %d)" % (what, num_experts))
    counts = np.bincount(labels, minlength=num_experts)
    if (counts != size).any():
        raise UserError("%s: expert sizes %s, expected %d each" % (what, counts.tolist(), size))
    return labels.astype(np.int64)


def groups_from_labels(labels, num_experts):
    """[E] sorted int64 index arrays: the neurons of each expert (rows of W_gate/W_up, columns of W_down)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # stable: indices inside each group stay increasing
    bounds = np.searchsorted(labels[order], np.arange(num_experts + 1))
    return [order[bounds[e]:bounds[e + 1]].astype(np.int64) for e in range(num_experts)]


def permutation(labels):
    """Neuron order that puts expert 0's neurons first, then expert 1's, … (each group in increasing index).

    `W_gate[perm]` reshaped to [E, d_ff/E, d] gives the stacked experts; `np.argsort(perm)` undoes it.
    """
    return np.argsort(np.asarray(labels), kind="stable").astype(np.int64)


def random_split(d_ff, num_experts, seed=0):
    size = check_num_experts(d_ff, num_experts)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_experts, dtype=np.int64), size))


def contiguous_split(d_ff, num_experts):
    size = check_num_experts(d_ff, num_experts)
    return np.arange(d_ff, dtype=np.int64) // size


def _template(template):
    t = np.asarray(template)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise UserError("template: expected a 2-D weight [d_ff, d] (rows of W_gate or W_up), got shape %s"
                        % (t.shape,))
    if not np.issubdtype(t.dtype, np.number):
        raise UserError("template: expected a numeric array, got dtype %s" % t.dtype)
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise UserError("template: contains NaN or Inf")
    return t


def normalize_rows(template):
    """Rows scaled to unit L2 norm (a zero row stays zero) — what the clustering and the router init see."""
    t = np.asarray(template, dtype=np.float64)
    norm = np.linalg.norm(t, axis=1, keepdims=True)
    return t / np.where(norm > 0, norm, 1.0)


def _costs(X, centres, metric):
    """Assignment cost [n, E]; constants per point are dropped since they do not change a balanced assignment."""
    if metric == "l2":  # ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²
        return (centres * centres).sum(axis=1)[None, :] - 2.0 * (X @ centres.T)
    return -(X @ normalize_rows(centres).T)  # cos distance 1 − x·ĉ


def _centroids(X, labels, num_experts):
    # Groups are equal-sized, so the sorted rows reshape to [E, size, d] (np.add.at is far slower at LLaMA size).
    return X[permutation(labels)].reshape(num_experts, -1, X.shape[1]).mean(axis=1)


def _objective(X, labels, centres, metric):
    c = _costs(X, centres, metric)[np.arange(X.shape[0]), labels].sum()
    return float(c + ((X * X).sum() if metric == "l2" else X.shape[0]))  # the dropped ‖x‖² (or the cos "1 −")


def _init_centres(X, num_experts, direction):
    """E rows picked by value: the one furthest along `direction`, then repeatedly the farthest from those picked."""
    first = int(np.argmax(X @ direction))
    chosen = [first]
    mind = ((X - X[first]) ** 2).sum(axis=1)
    for _ in range(1, num_experts):
        nxt = int(np.argmax(mind))
        chosen.append(nxt)
        mind = np.minimum(mind, ((X - X[nxt]) ** 2).sum(axis=1))
    return X[chosen].copy()


def balanced_kmeans(template, num_experts, metric="l2", seed=0, max_iter=500, n_init=1, assign="exact"):
    """Balanced k-means of the L2-normalised template rows. Returns a dict with labels, centres, objective, n_iter.

    Each iteration: centroids → cost matrix → assignment with capacity d_ff/E (`assign="exact"`: optimal, see
    assign.py; `"greedy"`: sorted-cost greedy only, faster but the objective may stall). With exact assignment the
    objective never increases, and the loop stops when the labels stop changing or after max_iter iterations.
    `n_init` restarts from different seeded directions keep the lowest objective.
    """
    X = normalize_rows(_template(template))
    d_ff = X.shape[0]
    size = check_num_experts(d_ff, num_experts)
    if metric not in METRICS:
        raise UserError("metric: expected one of %s, got %r" % ("/".join(METRICS), metric))
    if assign not in ("exact", "greedy"):
        raise UserError("assign: expected exact or greedy, got %r" % (assign,))
    if int(max_iter) < 1 or int(n_init) < 1:
        raise UserError("max_iter/n_init: expected positive integers, got %r/%r" % (max_iter, n_init))
    capacity = np.full(num_experts, size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(int(n_init)):
        centres = _init_centres(X, num_experts, rng.standard_normal(X.shape[1]))
        labels, n_iter = None, 0
        for n_iter in range(1, int(max_iter) + 1):
            cost = _costs(X, centres, metric)
            new = greedy_assign(cost, capacity)
            if assign == "exact":
                # Warm start from whichever feasible labelling is cheaper: late iterations move few neurons.
                start = new
                if labels is not None and cost[np.arange(d_ff), labels].sum() < cost[np.arange(d_ff), new].sum():
                    start = labels
                new, _ = exact_assign(cost, capacity, start=start)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            centres = _centroids(X, labels, num_experts)
        objective = _objective(X, labels, centres, metric)
        if best is None or objective < best["objective"] - 1e-12 * abs(objective):
            best = {"labels": labels, "centres": centres, "objective": objective, "n_iter": n_iter}
    return best


def kmeans_split(template, num_experts, metric="l2", seed=0, max_iter=500, n_init=1, assign="exact"):
    return balanced_kmeans(template, num_experts, metric, seed, max_iter, n_init, assign)["labels"]


def expert_centroids(template, labels, num_experts):
    """[E, d] mean of each expert's L2-normalised template rows (the MLP router's first-layer init, thunlp/seed)."""
    X = normalize_rows(_template(template))
    return _centroids(X, check_labels(labels, num_experts, X.shape[0]), num_experts)


def split_neurons(method, num_experts, template=None, d_ff=None, seed=0, metric="l2", max_iter=500, n_init=1,
                  assign="exact", coactivation=None, **graph_kw):
    """Labels [d_ff] for one layer. `template` [d_ff, d] is needed by kmeans (and gives d_ff to the others);
    `coactivation` (a [d_ff, d_ff] matrix or a `CoactivationAccumulator`) is needed by graph."""
    if method not in METHODS:
        raise UserError("method: expected one of %s, got %r" % ("/".join(METHODS), method))
    if template is not None:
        d_ff = _template(template).shape[0] if d_ff is None else d_ff
        if np.asarray(template).shape[0] != d_ff:
            raise UserError("template: %d rows, expected d_ff=%d" % (np.asarray(template).shape[0], d_ff))
    if method == "kmeans":
        if template is None:
            raise UserError("template: the kmeans split needs the template weight [d_ff, d]")
        return kmeans_split(template, num_experts, metric, seed, max_iter, n_init, assign)
    if method == "graph":
        from Models.moefication.coactivation import graph_split
        if coactivation is None:
            raise UserError("coactivation: the graph split needs collected activations (a co-activation matrix)")
        labels = graph_split(coactivation, num_experts, seed=seed, **graph_kw)
        if d_ff is not None and labels.size != d_ff:
            raise UserError("coactivation: %d neurons, expected d_ff=%d" % (labels.size, d_ff))
        return labels
    if d_ff is None:
        raise UserError("d_ff: give the template or d_ff for the %s split" % method)
    return random_split(d_ff, num_experts, seed) if method == "random" else contiguous_split(d_ff, num_experts)


def adjusted_rand_index(a, b):
    """Adjusted Rand index of two labellings (1 = the same partition up to relabelling) — to compare splits."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.float64)
    np.add.at(table, (ai, bi), 1.0)

    def pairs(x):
        return (x * (x - 1) / 2.0).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), a.size * (a.size - 1) / 2.0
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2.0 - expected
    return 1.0 if top == 0 else float((index - expected) / top)
