"""Token dispatch of the MoE core: gather each expert's tokens once, run the experts, weight, and combine.

`combine()` flattens the N·k assignments of a Selection, sorts them by expert once (dropped assignments sort to
the end), gathers the token rows once into expert-contiguous blocks, runs the experts on their blocks, and brings
the rows back to assignment order with the inverse permutation, where the k weighted rows of each token are summed.
Because every assignment row has exactly one destination, the way back is a gather (its gradient is Jittor's
reindex-reduce), not a scatter with duplicate indices (`scatter_(reduce="add")` fails on CUDA, docs/jittor_notes.md A9).

Two ways to run the experts:
* a grouped object with `forward_sorted(x_sorted, offsets)` (`Experts`): offsets [E+1] stay a lazy Var, so the
  whole layer is static-shaped and needs no host sync on the CPU kernel path;
* a callable `run_expert(e, rows_e) -> [n_e, d_out]` (LoRA experts of MoA): the per-expert row counts are read
  on the host (one sync per layer) to cut the blocks.

Dropped assignments are never computed; their rows are exact zeros times weight 0, so they contribute exactly 0.
`gather_rows` / `scatter_rows` are the primitives sparse MoA routing uses directly.
"""
from Utils.runtime import import_jittor

jt = import_jittor()


def gather_rows(x2d, rows):
    """x2d [n, d], rows [m] int → [m, d] (rows may repeat); the gradient scatter-adds back."""
    return x2d[rows]


def scatter_rows(n, rows, values):
    """[n, d] zeros with values [m, d] added at rows [m] (repeated rows are summed); differentiable in values."""
    return values.reindex_reduce("add", [n, values.shape[1]], ["@e0(i0)", "i1"], extras=[rows])


class DispatchPlan:
    """Where each assignment goes: token of every sorted row, the inverse permutation, per-expert offsets."""

    def __init__(self, token_of_row, inverse, offsets):
        self.token_of_row = token_of_row   # [N·k] int32: sorted row → token
        self.inverse = inverse             # [N·k] int32: assignment (token-major) → sorted row
        self.offsets = offsets             # [E+1] int32: expert e owns sorted rows offsets[e]:offsets[e+1]


def plan(sel, n_experts):
    """Sort the kept assignments of `sel` by expert (stable in token order); dropped ones go after expert E−1."""
    N, k, E = sel.n_tokens, sel.top_k, n_experts
    M = N * k
    if (E + 1) * M >= 2 ** 31:
        raise ValueError("%d assignments × %d experts overflow the int32 sort keys; split the batch" % (M, E))
    expert = jt.ternary(sel.kept, sel.index, jt.full(sel.index.shape, E, "int32")).reshape(M)   # [N·k]
    # unique keys: expert-major, then assignment order, so the order is deterministic whatever sort is used
    key = expert * M + jt.arange(M).int32()
    order, _ = jt.argsort(key, dim=0)                                             # sorted row → assignment
    inverse, _ = jt.argsort(order.int32(), dim=0)                                 # assignment → sorted row
    counts = (expert.reshape(M, 1) == jt.arange(E).int32().reshape(1, E)).int32().sum(0)   # [E]
    offsets = jt.concat([jt.zeros((1,), "int32"), jt.cumsum(counts, dim=0).int32()], 0)  # [E+1]
    token_of_row = order.int32() // k                                              # assignment → token
    return DispatchPlan(token_of_row.stop_grad(), inverse.int32().stop_grad(), offsets.stop_grad())


def run_per_expert(x_sorted, offsets, run_expert, n_experts, d_out=None):
    """Call run_expert(e, rows_e) on each non-empty block; zero rows for dropped assignments (host sync)."""
    o = [int(v) for v in offsets.numpy()]
    parts = []
    for e in range(n_experts):
        if o[e + 1] > o[e]:
            parts.append(run_expert(e, x_sorted[o[e]:o[e + 1]]))
    d_out = d_out or (parts[0].shape[1] if parts else x_sorted.shape[1])
    tail = x_sorted.shape[0] - o[n_experts]
    if tail:
        parts.append(jt.zeros((tail, d_out), x_sorted.dtype))
    return parts[0] if len(parts) == 1 else jt.concat(parts, 0)


def combine(x, sel, run_expert, n_experts=None, d_out=None):
    """y [N, d_out] = Σ_j weight[n, j] · expert_{index[n, j]}(x[n]) over kept assignments, for x [N, d].

    run_expert: an object with forward_sorted(x_sorted, offsets) (one grouped call), or a callable
    run_expert(e, rows_e) per expert. Gradients reach x, the experts' weights and, through sel.weight, the router.
    """
    N = x.shape[0]
    E = n_experts or sel.n_experts
    k = sel.top_k
    p = plan(sel, E)
    xs = gather_rows(x, p.token_of_row)                                           # [N·k, d] expert-contiguous
    if hasattr(run_expert, "forward_sorted"):
        ys = run_expert.forward_sorted(xs, p.offsets)
    else:
        ys = run_per_expert(xs, p.offsets, run_expert, E, d_out)
    y = gather_rows(ys, p.inverse).reshape(N, k, ys.shape[1])                     # [N, k, d_out] token-major
    w = sel.weight.cast(y.dtype).reshape(N, k, 1)
    return (y * w).sum(1)


def dense_reference(x, sel, run_expert, n_experts):
    """Every expert on every token times the k-sparse weight matrix: the test oracle for combine()."""
    W = sel.dense_weights()                                                       # [N, E]
    out = None
    for e in range(n_experts):
        term = run_expert(e, x) * W[:, e:e + 1].cast(x.dtype)
        out = term if out is None else out + term
    return out
