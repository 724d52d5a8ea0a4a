"""Capacity-constrained assignment of points to clusters (the step that keeps MoEfication's experts equal-sized).

Given a cost matrix C [n, E] and capacities cap [E] with Σ cap = n, find labels minimising Σ_i C[i, labels_i]
with exactly cap[e] points in cluster e. `greedy_assign` takes (point, cluster) pairs in increasing cost while
capacity lasts; `exact_assign` then removes every improving exchange, which makes the result a true optimum:

    An assignment is optimal iff the "exchange graph" on the E clusters, whose edge e→f costs the cheapest move of
    one member of e to f (C[i, f] − C[i, e]), has no negative cycle (the optimality condition of the
    transportation problem, of which this is the case with unit supplies). A negative cycle e1→e2→…→e1 moves one
    point along each edge: every cluster loses one and gains one, so sizes stay, and the total cost drops.

The exchange graph has only E nodes, so finding a cycle is cheap (Bellman–Ford on E ≤ a few hundred nodes) and each
round costs O(n·E). Started from the greedy result or from the previous k-means labels, few rounds are needed.
Both functions depend only on the cost values (ties aside), not on the order of the points, which is what makes the
k-means split invariant under a permutation of the neurons.
"""
import numpy as np


def _check(cost, capacity):
    cost = np.asarray(cost, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    if cost.ndim != 2 or capacity.shape != (cost.shape[1],) or capacity.sum() != cost.shape[0] or (capacity < 0).any():
        raise ValueError("assignment needs cost [n, E] and E non-negative capacities summing to n, got %s and %s"
                         % (cost.shape, capacity.tolist()))
    return cost, capacity


def greedy_assign(cost, capacity):
    """Labels [n] from (point, cluster) pairs taken in increasing cost while the cluster has room."""
    cost, capacity = _check(cost, capacity)
    n, E = cost.shape
    labels = np.full(n, -1, dtype=np.int64)
    left = capacity.copy()
    todo = n
    # A stable sort of the flattened matrix: equal costs keep (point, cluster) order, so the result is reproducible.
    order = np.argsort(cost, axis=None, kind="stable")
    points, clusters = np.divmod(order, E)
    for p, c in zip(points.tolist(), clusters.tolist()):
        if labels[p] < 0 and left[c] > 0:
            labels[p] = c
            left[c] -= 1
            todo -= 1
            if todo == 0:
                break
    return labels


def _negative_cycle(w, tol):
    """A cycle [c0, c1, …] (edges c_i → c_{i+1}, last → c0) of negative total weight in the dense graph w, or None."""
    E = w.shape[0]
    dist = np.zeros(E)  # a virtual source reaches every node at cost 0
    pred = np.full(E, -1, dtype=np.int64)
    cols = np.arange(E)
    updated = None
    for _ in range(E):
        cand = dist[:, None] + w
        src = cand.argmin(axis=0)
        best = cand[src, cols]
        updated = best < dist - tol
        if not updated.any():
            return None
        dist[updated] = best[updated]
        pred[updated] = src[updated]
    # Still improving after E rounds: a path of E edges beats every shorter one, so it repeats a node, and walking
    # E predecessors back from an improved node lands on a cycle of the predecessor graph.
    v = int(np.flatnonzero(updated)[0])
    for _ in range(E):
        v = int(pred[v])
    cycle = [v]
    u = int(pred[v])
    while u != v:
        cycle.append(u)
        u = int(pred[u])
    cycle.reverse()
    total = sum(w[cycle[i], cycle[(i + 1) % len(cycle)]] for i in range(len(cycle)))
    return cycle if total < -tol else None


def _pair_swap(w, tol):
    """The most improving 2-cycle (a swap of one member between two clusters), or None."""
    two = w + w.T
    np.fill_diagonal(two, np.inf)
    e, f = np.unravel_index(np.argmin(two), two.shape)
    return [int(e), int(f)] if two[e, f] < -tol else None


def exact_assign(cost, capacity, start=None, max_rounds=None):
    """Optimal labels [n] with exactly capacity[e] points per cluster.

    `start` is a feasible labelling to improve (default: the greedy one). Returns (labels, rounds) where rounds is
    the number of cycles cancelled.
    """
    cost, capacity = _check(cost, capacity)
    n, E = cost.shape
    labels = greedy_assign(cost, capacity) if start is None else np.array(start, dtype=np.int64)
    if np.bincount(labels, minlength=E).tolist() != capacity.tolist():
        raise ValueError("start labelling does not match the capacities")
    if E < 2 or n == 0:
        return labels, 0
    # Relative tolerance: a "gain" below rounding noise must not loop forever.
    tol = 1e-12 * max(1.0, float(np.abs(cost).max()))
    rows = np.arange(n)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        reduced = cost - cost[rows, labels][:, None]  # reduced[i, f]: change in cost if point i moved to f
        w = np.full((E, E), np.inf)
        who = np.zeros((E, E), dtype=np.int64)
        for e in range(E):
            members = np.flatnonzero(labels == e)
            if members.size == 0:
                continue
            r = reduced[members]
            j = r.argmin(axis=0)
            w[e] = r[j, np.arange(E)]
            who[e] = members[j]
        np.fill_diagonal(w, np.inf)
        # Swaps are the common case and the cheapest to find; longer cycles only when no swap improves.
        cycle = _pair_swap(w, tol) or _negative_cycle(np.where(np.isfinite(w), w, 1e300), tol)
        if cycle is None:
            break
        moves = [(who[cycle[i], cycle[(i + 1) % len(cycle)]], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]
        for point, target in moves:
            labels[point] = target
        rounds += 1
    return labels, rounds


def assignment_cost(cost, labels):
    """Σ_i cost[i, labels_i]."""
    cost = np.asarray(cost)
    return float(cost[np.arange(cost.shape[0]), labels].sum())
