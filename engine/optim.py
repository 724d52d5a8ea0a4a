"""Optimiser pieces of the one training engine: decay groups, AdamW with PyTorch's numerics, global-norm clipping and
dynamic loss scaling.

AdamW takes the gradients as an argument instead of calling backward itself: Jittor's own optimisers count
micro-steps in the bias correction and all-reduce on every `backward()` (see docs/jittor_notes.md); the engine
accumulates gradients, reduces them once per optimizer step and hands them here.
"""
import math

import numpy as np

from Models.kernel_config import enabled, note_used
from Utils.runtime import import_jittor

jt = import_jittor()

V_FLOOR = 1e-36   # a normal float32 (FLT_MIN is 1.2e-38): see AdamW.step
NORM_FLOOR = 1e-30


def param_groups(named_params, weight_decay):
    """No weight decay for 1-D parameters and names ending in `.bias` (norms, biases, gates); decay for the rest."""
    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).append((name, p))
    return [{"named": no_decay, "weight_decay": 0.0}, {"named": decay, "weight_decay": weight_decay}]


class AdamW:
    """torch.optim.AdamW's update on Jittor Vars, driven by gradients passed in (no backward inside).

    p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
    p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε),   t = number of optimizer steps taken.
    Moments are fp32 Vars kept in a plain dict (never module attributes, so they are not parameters).
    """

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8):
        self.param_groups = [dict(g, lr=lr) for g in groups if g["named"]]
        self.betas, self.eps = betas, eps
        self.step_count = 0
        self.state = {name: {"m": jt.zeros(p.shape, "float32"), "v": jt.zeros(p.shape, "float32")}
                      for g in self.param_groups for name, p in g["named"]}

    @property
    def named_params(self):
        return [np_ for g in self.param_groups for np_ in g["named"]]

    def set_lr(self, lr):
        for g in self.param_groups:
            g["lr"] = lr

    def step(self, grads, grad_scale=1.0):
        """Apply one update; `grads` maps parameter name → gradient Var (already averaged over ranks), each
        multiplied by `grad_scale` (loss-scale and clipping factors) inside the update. A parameter missing from
        `grads` is left alone — no decay, no moment update — as torch.optim.AdamW skips a parameter whose .grad is
        None.

        The update runs parameter by parameter: each new weight and its moments are materialised, then the old
        ones and the gradient are released (the gradient's entry is removed from `grads`, which this consumes), so
        the step holds one parameter's temporaries at a time instead of a second copy of the weights and moments
        (torch's in-place update holds none). For fp32 on the CPU each parameter's update is one multi-threaded,
        vectorised kernel (`_ADAMW_SRC`) unless MOA_FUSED_ADAMW=0; elsewhere Jittor's element-wise ops, which run
        on one core on the CPU, compute the same expression."""
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        kernel = _adamw_kernel_on()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            consts = None
            for name, p in group["named"]:
                g = grads.pop(name, None)
                if g is None:
                    continue
                st = self.state[name]
                if kernel and p.dtype == "float32" and g.dtype == "float32":
                    if consts is None:
                        note_used("fused_adamw")
                        consts = jt.array(np.array([b1, 1.0 - b1, b2, 1.0 - b2, bc2_sqrt, self.eps, 1.0 - lr * wd,
                                                    lr / bc1, grad_scale, V_FLOOR], np.float32))
                    # Detached inputs: a jt.code op keeps its (differentiable) inputs alive as long as any of its
                    # outputs lives, so the kept m and v would hold the old p, g, m and v until the next step
                    # (+1.2 GB at the peak for 512 MB of weights). Not stop_grad(): that flags the Var in place,
                    # and p.update() of a stop_grad Var freezes the parameter.
                    new_p, m, v = jt.code([p.shape] * 3, ["float32"] * 3,
                                          [p.detach(), g.detach(), st["m"].detach(), st["v"].detach(), consts],
                                          cpu_header=_ADAMW_HEADER, cpu_src=_ADAMW_SRC)
                else:
                    g = g.float32() if grad_scale == 1.0 else g.float32() * grad_scale
                    m = st["m"] * b1 + g * (1.0 - b1)
                    v = st["v"] * b2 + g * g * (1.0 - b2)
                    # v is floored at a normal float before the sqrt: Jittor's CPU kernels run with flush-to-zero
                    # and fast math, where sqrt of a denormal v (a gradient ~1e-20) can come out NaN inside this
                    # fused expression. sqrt(V_FLOOR) is ~1e-10 of eps, so the update equals PyTorch's in fp32.
                    denom = v.maximum(V_FLOOR).sqrt() / bc2_sqrt + self.eps
                    new_p = p * (1.0 - lr * wd) - (m / denom) * (lr / bc1)
                st["m"], st["v"] = m.detach(), v.detach()
                p.update(new_p.cast(p.dtype))
                del g, m, v, new_p
                jt.sync([p, st["m"], st["v"]])  # no graph is carried into the next step; old buffers freed now

    def state_dict(self):
        return {"step": self.step_count,
                "m": {n: s["m"].numpy().astype(np.float32) for n, s in self.state.items()},
                "v": {n: s["v"].numpy().astype(np.float32) for n, s in self.state.items()}}

    def load_state_dict(self, sd):
        missing = set(self.state) ^ set(sd["m"])
        if missing:
            raise ValueError("optimizer state does not match the parameters (e.g. %s)" % sorted(missing)[0])
        self.step_count = int(sd["step"])
        for n, s in self.state.items():
            if tuple(sd["m"][n].shape) != tuple(s["m"].shape):
                raise ValueError("optimizer state for %s has shape %s, parameter has %s"
                                 % (n, sd["m"][n].shape, tuple(s["m"].shape)))
            s["m"] = jt.array(sd["m"][n].astype(np.float32))
            s["v"] = jt.array(sd["v"][n].astype(np.float32))


# One parameter's AdamW update on the CPU: p, g, m, v read once, new p, m, v written, in 16 K-element blocks over
# the threads. The loop is in a function compiled without errno semantics for sqrtf, so GCC vectorises it (Jittor
# builds at -O2, where a sqrtf that may set errno stays scalar: the same kernel without this ran slower than
# Jittor's one-core element-wise ops, 55 against 43 ms for 30 M parameters; vectorised it takes 19 ms). Constants
# come in a small array so the kernel never recompiles as lr and the bias corrections change:
# [β1, 1−β1, β2, 1−β2, √(1−β2ᵗ), ε, 1−lr·wd, lr/(1−β1ᵗ), grad_scale, V_FLOOR].
_ADAMW_HEADER = r"""
#include <cmath>
#include <cstdint>
__attribute__((optimize("no-math-errno", "tree-vectorize")))
static void moa_adamw_block(int64_t lo, int64_t hi, const float* __restrict__ p, const float* __restrict__ gr,
                            const float* __restrict__ m0, const float* __restrict__ v0, float* __restrict__ po,
                            float* __restrict__ mo, float* __restrict__ vo, const float* __restrict__ c) {
    const float b1 = c[0], cb1 = c[1], b2 = c[2], cb2 = c[3], bc2s = c[4], eps = c[5], decay = c[6], stp = c[7];
    const float gs = c[8], vfloor = c[9];
    for (int64_t i = lo; i < hi; i++) {
        const float g = gr[i] * gs;
        const float m = m0[i] * b1 + g * cb1;
        const float v = v0[i] * b2 + g * g * cb2;
        const float d = sqrtf(v > vfloor ? v : vfloor) / bc2s + eps;   // floored as in the Jittor expression
        mo[i] = m;
        vo[i] = v;
        po[i] = p[i] * decay - (m / d) * stp;
    }
}
"""
_ADAMW_SRC = r"""
    const int64_t n = in0->num, B = 16384, nb = (n + B - 1) / B;
    #pragma omp parallel for schedule(static) if(n > 65536)
    for (int64_t b = 0; b < nb; b++)
        moa_adamw_block(b * B, (b + 1) * B < n ? (b + 1) * B : n, in0_p, in1_p, in2_p, in3_p, out0_p, out1_p,
                        out2_p, in4_p);
"""


def _adamw_kernel_on():
    return not jt.flags.use_cuda and jt.flags.cc_type in ("g++", "clang") and enabled("fused_adamw")


def clip_coefficient(max_norm, norm):
    """torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), from a float norm (on the host, so
    no division of an underflowing value happens inside a fused kernel)."""
    coef = max_norm / (max(norm, NORM_FLOOR) + 1e-6)
    return 1.0 if coef >= 1.0 or not math.isfinite(norm) else coef


# Σ g² of one fp32 gradient on the CPU, multi-threaded: float partial sums of 4096-element blocks, added in double in
# block order, so the value does not depend on the thread count. Jittor's own reduction runs on one core in float32
# (25 ms against 4 ms for 30 M gradients, and 0.2 % low from float32 accumulation).
_SQUARES_SRC = r"""
    const int64_t n = in0_shape0, B = 4096, nb = (n + B - 1) / B;
    const float* __restrict__ g = in0_p;
    std::vector<float> part(nb);
    #pragma omp parallel for schedule(static) if(n > 65536)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t e = (b + 1) * B < n ? (b + 1) * B : n;
        float acc = 0.f;
        for (int64_t i = b * B; i < e; i++) acc += g[i] * g[i];
        part[b] = acc;
    }
    double s = 0.0;
    for (int64_t b = 0; b < nb; b++) s += part[b];
    out0_p[0] = (float)s;
"""


def _sum_of_squares(g):
    if (g.dtype == "float32" and not jt.flags.use_cuda and jt.flags.cc_type in ("g++", "clang")
            and enabled("grad_norm")):
        note_used("grad_norm")
        n = 1
        for s in g.shape:
            n *= s
        return jt.code((1,), "float32", [g.reshape(n)], cpu_header="#include <vector>\n", cpu_src=_SQUARES_SRC)
    return (g.float32() * g.float32()).sum().reshape(1)


def global_norm(grads):
    """sqrt(Σ‖g‖²) over a list of gradient Vars, as a Python float (one sync; the per-gradient sums are added in
    float64 on the host)."""
    if not grads:
        return 0.0
    sums = jt.concat([_sum_of_squares(g) for g in grads]).numpy().astype(np.float64)
    return math.sqrt(max(float(sums.sum()), 0.0))


def clip_by_global_norm(grads, max_norm, norm=None):
    """torch.nn.utils.clip_grad_norm_: scale every gradient by min(1, max_norm / (norm + 1e-6)).

    Returns (clipped grads, the norm before clipping). The coefficient is computed on the host from a float norm,
    so no division of an underflowing value happens inside a fused kernel.
    """
    norm = global_norm(grads) if norm is None else norm
    coef = clip_coefficient(max_norm, norm)
    return (list(grads) if coef == 1.0 else [g * coef for g in grads]), norm


class LossScaler:
    """Dynamic loss scaling for fp16 training on CUDA (torch.cuda.amp.GradScaler's rule): the loss is multiplied by
    `scale` before backward; a step whose gradients hold inf/NaN is skipped and the scale halved; after
    `growth_interval` good steps the scale doubles. Disabled (scale 1, never skips) for fp32 and bf16. The Trainer
    unscales: the norm on the host, the gradients inside the AdamW update (its grad_scale)."""

    def __init__(self, enabled, init_scale=2.0 ** 16, growth_interval=2000, backoff=0.5, growth=2.0):
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_interval, self.backoff, self.growth = growth_interval, backoff, growth
        self.good_steps = 0

    def update(self, finite):
        if not self.enabled:
            return
        if not finite:
            self.scale *= self.backoff
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state_dict(self):
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, sd):
        self.enabled, self.scale, self.good_steps = bool(sd["enabled"]), float(sd["scale"]), int(sd["good_steps"])
