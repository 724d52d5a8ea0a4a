"""Gradient checkpointing for the encoder–decoder: a block's forward is run without keeping its graph and run
again, from its saved inputs, when the backward reaches it.

Jittor 1.3.11 has no checkpoint utility (nothing in jittor/ recomputes), so this is a `jt.Function`: `execute` runs
the block under no_grad and keeps only its inputs; `grad` re-runs it with gradients on and differentiates
Σ_i out_i·g_i with respect to the inputs and the block's trainable parameters (passed as extra inputs so Jittor
routes their gradients). The recomputation must be the same function: Jittor gives every random op its seed when
the op is created, so a second forward would draw other dropout masks and other router jitter. Every draw goes
through `jittor.random` (jt.rand, jt.randn and nn.Dropout call it); during `execute` the draws are recorded and
during `grad` the recorded Vars are handed back in the same order, so the recomputed forward is bit-identical and
the gradients equal those of the plain forward (tests/test_seq2seq.py checks it with dropout and jitter on).
"""
import contextlib

from Models.kernel_config import override
from Utils.runtime import import_jittor

jt = import_jittor()


@contextlib.contextmanager
def _random_tape(tape, replay):
    """Record (replay=False) or hand back (replay=True) every `jittor.random` draw made inside the block."""
    import jittor
    original = jittor.random
    pos = [0]

    def random(shape, dtype="float32", type="uniform"):
        if not replay:
            v = original(shape, dtype, type)
            tape.append(v)
            return v
        if pos[0] >= len(tape) or tuple(tape[pos[0]].shape) != tuple(shape):
            raise RuntimeError("gradient checkpointing: the recomputed forward drew different random numbers")
        v = tape[pos[0]]
        pos[0] += 1
        return v

    jittor.random = random
    try:
        yield
    finally:
        jittor.random = original


def _is_float(v):
    return v.dtype in ("float32", "float16", "bfloat16", "float64")


class _Recompute(jt.Function):
    def __init__(self, fn, n_inputs, params):
        self._fn, self._n, self._params = fn, n_inputs, params   # not jt.Var attributes: jittor_notes A1
        self._saved = None

    def execute(self, *args):
        inputs = args[:self._n]
        tape = []
        # the decode-time few-rows kernels key on no_grad; this no_grad pass is training, and its values must be the
        # recomputation's (oneDNN) bit for bit, so they stay off here
        with jt.no_grad(), override(few_rows=False), _random_tape(tape, replay=False):
            outs = list(self._fn(*inputs))
        # which inputs need a gradient is read now: Jittor marks the taped inputs stop-grad before grad() runs
        needs = [isinstance(x, jt.Var) and _is_float(x) and not x.is_stop_grad() for x in inputs]
        self._saved = (inputs, needs, tape)
        # outputs made under no_grad are stop-grad: fresh float leaves let a following op (another checkpointed
        # block) see that they need a gradient; this op's grad() is what connects them to the inputs
        leaves = []
        for o in outs:
            o = o.detach()
            if _is_float(o):
                o.start_grad()
            leaves.append(o)
        return leaves

    def grad(self, *grads):
        inputs, needs, tape = self._saved
        self._saved = None
        xs, wants = [], []
        for x, need in zip(inputs, needs):
            if need:
                x = x.detach()
                x.start_grad()
                wants.append(x)
            xs.append(x)
        with jt.enable_grad(), _random_tape(tape, replay=True):
            outs = list(self._fn(*xs))
        total = None
        for o, g in zip(outs, grads):
            if g is None or not _is_float(o):
                continue
            # the incoming gradient is a constant here: its own graph reaches back into this op's outputs
            term = (o * g.detach().cast(o.dtype)).sum()
            total = term if total is None else total + term
        targets = wants + list(self._params)
        if total is None or not targets:
            return [None] * (len(inputs) + len(self._params))
        got = iter(jt.grad(total, targets))
        out = []
        for x in xs:
            out.append(next(got) if any(x is w for w in wants) else None)
        return out + [next(got) for _ in self._params]


def checkpoint(fn, inputs, params):
    """fn(*inputs) -> list of Vars, with its activations recomputed in the backward. `params`: the trainable
    parameters fn reads (their gradients come back through this op). Under no_grad it is a plain call."""
    if jt.flags.no_grad:
        return list(fn(*inputs))
    params = [p for p in params if not p.is_stop_grad()]
    return _Recompute(fn, len(inputs), params)(*inputs, *params)
