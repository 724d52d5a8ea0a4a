"""Co-activation graph split of one FFN layer: accumulate how often neurons fire together, partition with METIS,
rebalance to equal expert sizes (MOE_SPEC §4(a).1, thunlp's `adj.py` + `gpmetis` + `trans_gp.py` in one place).

Accumulation (over tokens t in consecutive mini-batches b of `batch_tokens` = 8 tokens):

    a_t = kernel(h_t)                                   kernel: plain (h), positive (ReLU h), l1 (|h|), l2 (h²)
    A_ij = Σ_b min(1, Σ_{t∈b} a_ti · a_tj)

The cap at 1 per mini-batch makes A a count of "mini-batches in which i and j fired together" rather than a sum
dominated by a few huge activations. Tokens are taken in stream order across `update` calls (a mini-batch may span
two calls), so feeding the features shard by shard gives the same A as one call on everything; a trailing partial
mini-batch counts as a mini-batch. A is symmetrised exactly at the end.

Graph: threshold τ = 0.99 × the first strictly positive decile (10 %, 20 %, … of all entries of A); an edge i–j
(i ≠ j) is kept when A_ij/τ ≥ 1 with integer weight ⌊A_ij/τ⌋. (thunlp stops at the first *non-zero* decile; with
the signed `plain` kernel that decile can be negative, which would keep anti-correlated pairs, so we take the
first positive one.) METIS (pymetis, seeded) cuts it into E parts of roughly equal size; `rebalance` then moves
the surplus neurons of over-full parts to under-full ones so every expert has exactly d_ff/E neurons.
"""
import numpy as np

from Models.moefication.split import check_num_experts
from Utils.errors import UserError

KERNELS = ("plain", "positive", "l1", "l2")
_TILE_ELEMENTS = 1 << 23  # ≈32 MB of float32 per partial product block: big GEMMs, bounded memory


def _hot_neurons(norms):
    """Neurons i with n_i · max_j n_j > 1, i.e. in at least one pair whose norm bound exceeds 1 (sorted)."""
    top = norms.max() if norms.size else 0.0
    return np.flatnonzero(norms * top > 1.0)


def apply_kernel(h, kernel):
    if kernel == "plain":
        return h
    if kernel == "positive":
        return np.maximum(h, 0)
    if kernel == "l1":
        return np.abs(h)
    if kernel == "l2":
        return h * h
    raise UserError("kernel: expected one of %s, got %r" % ("/".join(KERNELS), kernel))


class CoactivationAccumulator:
    """Streaming A for one layer; `update(h)` with per-neuron activations [n, d_ff], `matrix()` at the end."""

    def __init__(self, d_ff, kernel="positive", batch_tokens=8, max_tokens=None):
        if kernel not in KERNELS:
            raise UserError("kernel: expected one of %s, got %r" % ("/".join(KERNELS), kernel))
        if int(batch_tokens) < 1:
            raise UserError("batch_tokens: expected a positive integer, got %r" % (batch_tokens,))
        self.d_ff, self.kernel, self.batch_tokens = int(d_ff), kernel, int(batch_tokens)
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.tokens = 0
        self._A = np.zeros((self.d_ff, self.d_ff), dtype=np.float64)  # exact counts
        self._pending = np.zeros((0, self.d_ff), dtype=np.float32)  # tokens of an unfinished mini-batch
        self._final = False

    @property
    def full(self):
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def update(self, h):
        """Add activations h [n, d_ff] (padding already removed). Returns the number of tokens taken."""
        if self._final:
            raise RuntimeError("CoactivationAccumulator.update after finalize()")
        h = np.asarray(h)
        if h.ndim != 2 or h.shape[1] != self.d_ff:
            raise UserError("activations: expected [n, %d], got shape %s" % (self.d_ff, h.shape))
        if self.max_tokens is not None:
            h = h[:max(0, self.max_tokens - self.tokens)]
        if h.shape[0] == 0:
            return 0
        a = np.concatenate([self._pending, apply_kernel(h.astype(np.float32), self.kernel)])
        whole = a.shape[0] // self.batch_tokens * self.batch_tokens
        self._add_batches(a[:whole].reshape(-1, self.batch_tokens, self.d_ff))
        self._pending = a[whole:].copy()
        self.tokens += h.shape[0]
        return h.shape[0]

    def _add_batches(self, a, out=None):
        """out[i, j] += Σ_b min(1, S_b[i, j]) with S_b = a_bᵀ a_b over the tokens of mini-batch b.

        By Cauchy–Schwarz |S_b[i, j]| ≤ n_i·n_j with n_i = ‖a_b,i‖ over the mini-batch's tokens, so the cap can only
        bite on pairs with n_i·n_j > 1; call H_b the neurons in such a pair. With H_b's columns zeroed, the sum over
        mini-batches is one fp32 GEMM over all tokens (numpy uses syrk for aᵀa), ~10× faster than capping every
        mini-batch's d_ff × d_ff block, and exact to fp32 rounding because every term is ≤ 1 there. The rows of
        H_b are then added capped, in fp64, as rows only: a pair (i ∈ H_b, j ∉ H_b) gets 2·min(1, S) in out[i, j]
        and nothing in out[j, i], which the final (A + Aᵀ)/2 turns into the right value. Mini-batches with a large
        H_b are cheaper capped directly.
        """
        out = self._A if out is None else out
        nb, _, n = a.shape
        if nb == 0:
            return
        norms = np.sqrt(np.einsum("btn,btn->bn", a, a, dtype=np.float64))  # [nb, n]
        hot = [_hot_neurons(norms[b]) for b in range(nb)]
        heavy = np.array([h.size > n // 4 for h in hot], dtype=bool)
        light = np.flatnonzero(~heavy)
        if light.size:
            cold = a[light]  # a copy (fancy index)
            for k, b in enumerate(light):
                cold[k][:, hot[b]] = 0.0
            flat = cold.reshape(-1, n)
            out += flat.T @ flat
            del cold, flat
            for b in light:
                idx = hot[b]
                if idx.size == 0:
                    continue
                ab = a[b].astype(np.float64)
                capped = np.minimum(ab[:, idx].T @ ab, 1.0)  # [|H_b|, n]
                capped *= 2.0
                capped[:, idx] *= 0.5  # pairs inside H_b arrive once from each side already
                out[idx] += capped
        if heavy.any():
            self._add_capped(a[heavy], out)

    @staticmethod
    def _add_capped(a, out):
        """out += Σ_b min(1, a_bᵀ a_b), block by block (rows × mini-batches) so memory stays bounded."""
        nb, _, n = a.shape
        rows = max(1, min(n, _TILE_ELEMENTS // max(1, n * min(nb, 64))))
        group = max(1, min(nb, _TILE_ELEMENTS // (rows * n)))
        for g0 in range(0, nb, group):
            blk = a[g0:g0 + group]
            for r0 in range(0, n, rows):
                p = np.matmul(blk[:, :, r0:r0 + rows].transpose(0, 2, 1), blk)  # [group, rows, n]
                np.minimum(p, 1.0, out=p)
                out[r0:r0 + rows] += p.sum(axis=0)

    def matrix(self):
        """A [d_ff, d_ff] float64, symmetric, including the unfinished mini-batch (the accumulator is unchanged)."""
        if self._final:
            return self._A.copy()
        A = self._A.copy()
        if self._pending.shape[0]:
            self._add_batches(self._pending[None], out=A)
        _symmetrize(A)
        return A

    def finalize(self):
        """Like `matrix()` but in place, without a second d_ff² copy (1.6 GB at d_ff = 14 336); no update after it."""
        if not self._final:
            if self._pending.shape[0]:
                self._add_batches(self._pending[None])
                self._pending = self._pending[:0]
            _symmetrize(self._A)
            self._final = True
        return self._A


def _symmetrize(A, block=256):
    """A ← (A + Aᵀ)/2 in place, bit-symmetric (BLAS may sum a_ti a_tj and a_tj a_ti in different orders).

    Block by block: a whole-matrix `A += A.T` walks memory by columns and takes ~20 s at d_ff = 14 336."""
    n = A.shape[0]
    for r0 in range(0, n, block):
        for c0 in range(r0, n, block):
            avg = (A[r0:r0 + block, c0:c0 + block] + A[c0:c0 + block, r0:r0 + block].T) * 0.5
            A[r0:r0 + block, c0:c0 + block] = avg
            A[c0:c0 + block, r0:r0 + block] = avg.T


def coactivation_matrix(h, kernel="positive", batch_tokens=8):
    acc = CoactivationAccumulator(np.asarray(h).shape[-1], kernel, batch_tokens)
    acc.update(h)
    return acc.matrix()


def coactivation_threshold(A):
    """0.99 × the first strictly positive decile of all entries of A (thunlp's rule, see the module note)."""
    deciles = np.percentile(np.asarray(A).reshape(-1), np.arange(10, 101, 10))  # one partition pass for all ten
    for t in deciles:
        if t > 0:
            return 0.99 * float(t)
    raise UserError("coactivation: no positive co-activation (all activations zero or negative for this kernel)")


def graph_from_coactivation(A, threshold=None, chunk_rows=1024):
    """METIS CSR arrays (xadj, adjncy, eweights) as int64 from A, and the threshold used."""
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise UserError("coactivation: expected a square [d_ff, d_ff] matrix, got shape %s" % (A.shape,))
    tau = coactivation_threshold(A) if threshold is None else float(threshold)
    n = A.shape[0]
    cols, weights, degree = [], [], np.zeros(n, dtype=np.int64)
    for r0 in range(0, n, chunk_rows):  # by rows so the boolean mask and indices stay small at d_ff = 14 336
        block = A[r0:r0 + chunk_rows]
        keep = block >= tau  # A/τ ≥ 1 without dividing the whole block
        keep[np.arange(block.shape[0]), np.arange(r0, r0 + block.shape[0])] = False  # no self-loops
        cols.append(np.nonzero(keep)[1].astype(np.int64))
        # Boolean indexing walks the block in the same row-major order as nonzero, and is faster than a gather.
        # max(1, ·): A ≥ τ can still round to A/τ = 0.999…; every kept edge weighs at least 1, as METIS requires.
        weights.append(np.maximum(np.floor(block[keep] / tau), 1).astype(np.int64))
        degree[r0:r0 + block.shape[0]] = keep.sum(axis=1)
    xadj = np.concatenate([[0], np.cumsum(degree)]).astype(np.int64)
    return xadj, np.concatenate(cols), np.concatenate(weights), tau


def metis_parts(xadj, adjncy, eweights, num_experts, seed=0):
    """Labels from METIS k-way partitioning (not necessarily balanced)."""
    n = len(xadj) - 1
    if num_experts == 1 or len(adjncy) == 0:
        # METIS needs at least one edge; without any, every neuron is alone and the balance step decides.
        return np.zeros(n, dtype=np.int64) if num_experts == 1 else np.arange(n, dtype=np.int64) % num_experts
    try:
        import pymetis
    except ImportError as e:  # pragma: no cover - pymetis is in requirements.txt
        raise UserError("method: the graph split needs pymetis (pip install -r requirements.txt)") from e
    # ufactor 1 = 0.1 % imbalance allowed: METIS then leaves almost nothing for the rebalance step to move.
    opts = pymetis.Options(seed=int(seed), ufactor=1)
    graph = pymetis.CSRAdjacency(xadj, adjncy)
    _, parts = pymetis.part_graph(int(num_experts), graph, eweights=eweights, options=opts)
    return np.asarray(parts, dtype=np.int64)


def neuron_affinity(xadj, adjncy, eweights, labels, num_experts, rows=None):
    """conn [n, E]: total edge weight from each neuron to the neurons of each part (only `rows` filled if given:
    the rebalance needs just the neurons of over-full parts, and the full graph has ~10⁸ edges at LLaMA size)."""
    n = len(xadj) - 1
    rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    counts = xadj[rows + 1] - xadj[rows]
    # Edge positions of the chosen rows: each row's run xadj[r]..xadj[r+1] laid end to end.
    starts = np.repeat(xadj[rows] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    pos = starts + np.arange(counts.sum(), dtype=np.int64)
    local = np.repeat(np.arange(rows.size, dtype=np.int64), counts)
    flat = np.bincount(local * num_experts + labels[adjncy[pos]], weights=eweights[pos],
                       minlength=rows.size * num_experts)
    out = np.zeros((n, num_experts))
    out[rows] = flat.reshape(rows.size, num_experts)
    return out


def rebalance(labels, num_experts, seed=0, affinity=None):
    """Move surplus neurons of over-full parts to under-full ones until every part has d_ff/E neurons.

    With `affinity` ([n, E], e.g. `neuron_affinity`), the moves that lose the least connection go first
    (gain = affinity[i, target] − affinity[i, own]); without it the surplus neurons are chosen at random, as thunlp
    does. Ties and the random choice follow `seed`; neurons of parts that are not over-full never move.
    """
    labels = np.array(labels, dtype=np.int64)
    size = check_num_experts(labels.size, num_experts)
    counts = np.bincount(labels, minlength=num_experts)
    surplus = np.maximum(counts - size, 0)
    deficit = np.maximum(size - counts, 0)
    if not surplus.any():
        return labels
    rng = np.random.default_rng(seed)
    cand = np.flatnonzero(surplus[labels] > 0)
    targets = np.flatnonzero(deficit > 0)
    i = np.repeat(cand, targets.size)
    q = np.tile(targets, cand.size)
    tiebreak = rng.random(i.size)
    if affinity is None:
        order = np.lexsort((tiebreak,))
    else:
        affinity = np.asarray(affinity, dtype=np.float64)
        gain = affinity[i, q] - affinity[i, labels[i]]
        order = np.lexsort((tiebreak, -gain))  # largest gain first, seeded order among equals
    moved = np.zeros(labels.size, dtype=bool)
    for k in order.tolist():
        p, t = int(i[k]), int(q[k])
        own = labels[p]
        # A skipped pair is never needed later: a full target or a balanced source stays that way.
        if moved[p] or surplus[own] == 0 or deficit[t] == 0:
            continue
        labels[p] = t
        moved[p] = True
        surplus[own] -= 1
        deficit[t] -= 1
    return labels


def graph_split(coactivation, num_experts, seed=0, threshold=None, balance="affinity"):
    """Labels [d_ff] from a co-activation matrix (or a `CoactivationAccumulator`): threshold → METIS → rebalance."""
    A = coactivation.finalize() if isinstance(coactivation, CoactivationAccumulator) else np.asarray(coactivation)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise UserError("coactivation: expected a square [d_ff, d_ff] matrix, got shape %s" % (A.shape,))
    check_num_experts(A.shape[0], num_experts)
    if balance not in ("affinity", "random"):
        raise UserError("balance: expected affinity or random, got %r" % (balance,))
    xadj, adjncy, eweights, _ = graph_from_coactivation(A, threshold)
    parts = metis_parts(xadj, adjncy, eweights, num_experts, seed)
    affinity = None
    if balance == "affinity":
        over = np.bincount(parts, minlength=num_experts) > A.shape[0] // num_experts
        affinity = neuron_affinity(xadj, adjncy, eweights, parts, num_experts, rows=np.flatnonzero(over[parts]))
    return rebalance(parts, num_experts, seed, affinity)
