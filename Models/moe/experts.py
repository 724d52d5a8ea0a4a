"""Experts of the MoE core: E feed-forward experts of per-expert widths in stacked weights, and shared experts.

Layout (one matrix per projection, experts stacked along rows; expert e owns rows offsets[e]:offsets[e+1]):
`w1` [ΣF_e, d] gate (or the plain FFN's input projection), `w3` [ΣF_e, d] up (gated experts only), `w2`
[ΣF_e, d] down, stored transposed so that expert e computes y = act(x·w1_eᵀ)(·x·w3_eᵀ)·w2_e. The dense FFN's
Linear weights map onto it directly (`from_dense`): upcycling copies them into every expert, MoEfication gives
expert e the rows S_e of the gate/up weights and the columns S_e of the down weight, so the experts' sum is the
dense FFN.

`forward_sorted(x_sorted, offsets)` runs every expert on its contiguous block of rows (the dispatcher sorts them).
On CPU in fp32 it is one JIT kernel each way (`_GroupedFFN`): dnnl_sgemm per expert block straight on the stacked
weights (no slicing copies), the activation as a multi-threaded loop, and the row offsets read at run time, so
the layer has static shapes and no host sync. Elsewhere — CUDA, other dtypes, no oneDNN, or MOA_GROUPED_EXPERTS=0
(read once at import) — Jittor ops run per expert after reading the offsets on the host.
"""
import numpy as np

from Models.adapters import linear
from Models.kernel_config import enabled, note_used
from Models.kernels import DNNL_SGEMM_DECL, dnnl_available, swiglu
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


# Activation and its derivative per name; σ(a) from e = exp(−|a|) so the exp never overflows.
_ACT_C = {
    "silu": ("return a * moe_sigmoid(a);",
             "const float s = moe_sigmoid(a); return s * (1.f + a * (1.f - s));"),
    "relu": ("return a > 0.f ? a : 0.f;", "return a > 0.f ? 1.f : 0.f;"),
    "gelu": ("return 0.5f * a * (1.f + erff(a * 0.70710678f));",
             "return 0.5f * (1.f + erff(a * 0.70710678f)) + a * 0.39894228f * expf(-0.5f * a * a);"),
    "gelu_tanh": ("const float t = tanhf(0.79788456f * (a + 0.044715f * a * a * a)); return 0.5f * a * (1.f + t);",
                  "const float t = tanhf(0.79788456f * (a + 0.044715f * a * a * a));"
                  " return 0.5f * (1.f + t) + 0.5f * a * (1.f - t * t) * 0.79788456f * (1.f + 0.134145f * a * a);"),
}


def _header(act):
    f, df = _ACT_C[act]
    return ("#include <algorithm>\n#include <cmath>\n#include <cstring>\n#include <omp.h>\n#include <vector>\n"
            + DNNL_SGEMM_DECL + r"""
static inline float moe_sigmoid(float a) {
    const float e = expf(-fabsf(a)), inv = 1.f / (1.f + e);
    return a < 0.f ? e * inv : inv;
}
static inline float moe_act(float a) { %s }
static inline float moe_dact(float a) { %s }
// offsets must rise from 0 to at most M, or nothing is computed (bad offsets must not touch foreign memory)
static inline bool moe_offsets_ok(const int32_t* ro, int64_t E, int64_t M) {
    if (ro[0] != 0) return false;
    for (int64_t e = 0; e < E; e++) if (ro[e + 1] < ro[e]) return false;
    return ro[E] <= M;
}
// Experts to threads. With at least as many experts as threads, the experts are dealt out longest first (work =
// rows x width) to the least loaded thread; if every thread's share stays within 5/4 of an even split, each thread
// runs its experts whole, and oneDNN's sgemm, called inside the parallel region, runs single-threaded: one small
// GEMM per core instead of every GEMM split over the cores. Each expert's arithmetic is then the same whichever
// thread runs it. Otherwise (few experts, or one expert holding most rows) plan stays empty: the experts run one
// after another with multi-threaded GEMMs.
static inline void moe_plan(const int32_t* ro, const int32_t* wo, int64_t E, bool ok,
                            std::vector<std::vector<int64_t>>& plan) {
    plan.clear();
    const int T = omp_get_max_threads();
    if (!ok || T < 2 || E < T) return;
    std::vector<int64_t> order(E), load(T, 0);
    int64_t total = 0;
    for (int64_t e = 0; e < E; e++) { order[e] = e; total += (int64_t)(ro[e + 1] - ro[e]) * (wo[e + 1] - wo[e]); }
    if (total == 0) return;
    std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) {
        return (int64_t)(ro[p + 1] - ro[p]) * (wo[p + 1] - wo[p]) > (int64_t)(ro[q + 1] - ro[q]) * (wo[q + 1] - wo[q]);
    });
    plan.assign(T, std::vector<int64_t>());
    for (int64_t e : order) {
        int t = 0;
        for (int u = 1; u < T; u++) if (load[u] < load[t]) t = u;
        load[t] += (int64_t)(ro[e + 1] - ro[e]) * (wo[e + 1] - wo[e]);
        plan[t].push_back(e);
    }
    for (int t = 0; t < T; t++) if (load[t] * 4 * T > total * 5) { plan.clear(); return; }
}
// Run one(e, thread) for every expert: by the plan on its threads, or in order on thread 0.
template <class F>
static inline void moe_each_expert(const std::vector<std::vector<int64_t>>& plan, int64_t E, F one) {
    if (plan.empty()) { for (int64_t e = 0; e < E; e++) one(e, 0); return; }
    #pragma omp parallel num_threads((int)plan.size())
    {
        const int t = omp_get_thread_num();
        for (int64_t e : plan[t]) one(e, t);
    }
}
""" % (f, df))


# Inputs: x [M, D], w1 [S, D], w2 [S, D], (w3 [S, D]), ro [E+1] token-row offsets, wo [E+1] weight-row offsets.
_FWD = r"""
    const int64_t M = in0_shape0, D = in0_shape1, E = %(ro)s_shape0 - 1, FM = out1_shape1;
    const int32_t* ro = %(ro)s_p; const int32_t* wo = %(wo)s_p;
    const float *x = in0_p, *w1 = in1_p, *w2 = in2_p;
    float *y = out0_p, *a = out1_p;
    %(gated_decl)s
    const bool ok = moe_offsets_ok(ro, E, M);
    int64_t maxn = 0;
    if (ok) for (int64_t e = 0; e < E; e++) maxn = ro[e + 1] - ro[e] > maxn ? ro[e + 1] - ro[e] : maxn;
    std::vector<std::vector<int64_t>> plan;
    moe_plan(ro, wo, E, ok, plan);
    const size_t per = (size_t)(maxn * FM > 0 ? maxn * FM : 1);
    std::vector<float> hbuf(per * (plan.empty() ? 1 : plan.size()));
    if (ok) moe_each_expert(plan, E, [&](int64_t e, int t) {
        const int64_t r0 = ro[e], n = ro[e + 1] - r0, f0 = wo[e], F = wo[e + 1] - f0;
        float* h = hbuf.data() + per * t;
        if (n == 0) return;
        if (F == 0) { memset(y + r0 * D, 0, sizeof(float) * n * D); return; }
        dnnl_sgemm('N', 'T', n, F, D, 1.f, x + r0 * D, D, w1 + f0 * D, D, 0.f, a + r0 * FM, FM);
        %(gated_up)s
        #pragma omp parallel for schedule(static) if(plan.empty() && n * F > 32768)
        for (int64_t i = 0; i < n; i++) {
            const float* ai = a + (r0 + i) * FM;
            float* hi = h + i * FM;
            %(gated_h)s
        }
        dnnl_sgemm('N', 'N', n, D, F, 1.f, h, FM, w2 + f0 * D, D, 0.f, y + r0 * D, D);
    });
    const int64_t tail0 = ok ? ro[E] : 0;
    if (M > tail0) memset(y + tail0 * D, 0, sizeof(float) * (M - tail0) * D);
"""
_FWD_GATED = dict(
    gated_decl="const float* w3 = in3_p; float* b = out2_p;",
    gated_up="dnnl_sgemm('N', 'T', n, F, D, 1.f, x + r0 * D, D, w3 + f0 * D, D, 0.f, b + r0 * FM, FM);",
    gated_h="const float* bi = b + (r0 + i) * FM; for (int64_t j = 0; j < F; j++) hi[j] = moe_act(ai[j]) * bi[j];")
_FWD_PLAIN = dict(gated_decl="", gated_up="", gated_h="for (int64_t j = 0; j < F; j++) hi[j] = moe_act(ai[j]);")

# Inputs: x, w1, w2, (w3), a, (b), g [M, D], ro, wo. Outputs: dx [M, D], then (need_dw) dw1, dw2, (dw3) [S, D].
# Per expert: dh = g·w2ᵀ, then one element-wise pass giving h (for dw2), da = dh·(b)·act'(a) and db = dh·act(a),
# then dw2 = hᵀ·g, dw1 = daᵀ·x, dw3 = dbᵀ·x, dx = da·w1 (+ db·w3).
_BWD = r"""
    const int64_t M = in0_shape0, D = in0_shape1, E = %(ro)s_shape0 - 1, FM = %(a)s_shape1;
    const int32_t* ro = %(ro)s_p; const int32_t* wo = %(wo)s_p;
    const float *x = in0_p, *w1 = in1_p, *w2 = in2_p, *a = %(a)s_p, *g = %(g)s_p;
    float* dx = out0_p;
    %(decl)s
    const bool ok = moe_offsets_ok(ro, E, M);
    int64_t maxn = 0;
    if (ok) for (int64_t e = 0; e < E; e++) maxn = ro[e + 1] - ro[e] > maxn ? ro[e + 1] - ro[e] : maxn;
    std::vector<std::vector<int64_t>> plan;
    moe_plan(ro, wo, E, ok, plan);
    const size_t per = (size_t)(maxn * FM > 0 ? maxn * FM : 1), nt = plan.empty() ? 1 : plan.size();
    std::vector<float> hbuf(%(need_dw)d ? per * nt : 1), dabuf(per * nt), dbbuf(%(gated)d ? per * nt : 1);
    moe_each_expert(plan, E, [&](int64_t e, int t) {
        const int64_t r0 = ok ? ro[e] : 0, n = ok ? ro[e + 1] - r0 : 0, f0 = wo[e], F = wo[e + 1] - f0;
        float *h = hbuf.data() + (%(need_dw)d ? per * t : 0), *da = dabuf.data() + per * t;
        float* db = dbbuf.data() + (%(gated)d ? per * t : 0);
        (void)h; (void)db;
        if (n == 0 || F == 0) {   // an expert without tokens gets an exact zero gradient
            %(zero_dw)s
            if (n) memset(dx + r0 * D, 0, sizeof(float) * n * D);
            return;
        }
        const float* ge = g + r0 * D;
        dnnl_sgemm('N', 'T', n, F, D, 1.f, ge, D, w2 + f0 * D, D, 0.f, da, FM);          // dh = g·w2ᵀ
        #pragma omp parallel for schedule(static) if(plan.empty() && n * F > 32768)
        for (int64_t i = 0; i < n; i++) {
            const float* ai = a + (r0 + i) * FM;
            float* di = da + i * FM;
            float* hi = h + i * FM;
            %(elementwise)s
        }
        %(dw)s
        dnnl_sgemm('N', 'N', n, D, F, 1.f, da, FM, w1 + f0 * D, D, 0.f, dx + r0 * D, D);
        %(dx3)s
    });
    const int64_t tail0 = ok ? ro[E] : 0;
    if (M > tail0) memset(dx + tail0 * D, 0, sizeof(float) * (M - tail0) * D);
"""


def _bwd_parts(gated, need_dw):
    p = {"gated": int(gated), "need_dw": int(need_dw), "decl": "", "zero_dw": "", "dw": "", "dx3": ""}
    keep_h = "hi[j] = h_;" if need_dw else "(void)hi;"
    if gated:
        p["decl"] = "const float *w3 = in3_p, *b = in5_p;"
        p["elementwise"] = ("const float* bi = b + (r0 + i) * FM; float* dbi = db + i * FM;"
                            " for (int64_t j = 0; j < F; j++) { const float dh = di[j], fa = moe_act(ai[j]),"
                            " h_ = fa * bi[j]; %s dbi[j] = dh * fa; di[j] = dh * bi[j] * moe_dact(ai[j]); }" % keep_h)
        p["dx3"] = "dnnl_sgemm('N', 'N', n, D, F, 1.f, db, FM, w3 + f0 * D, D, 1.f, dx + r0 * D, D);"
    else:
        p["elementwise"] = ("for (int64_t j = 0; j < F; j++) { const float h_ = moe_act(ai[j]); %s"
                            " di[j] *= moe_dact(ai[j]); }" % keep_h)
    if need_dw:
        outs = ["dw1", "dw2"] + (["dw3"] if gated else [])
        p["decl"] += " " + " ".join("float* %s = out%d_p;" % (o, i + 1) for i, o in enumerate(outs))
        p["zero_dw"] = "if (F) { %s }" % " ".join("memset(%s + f0 * D, 0, sizeof(float) * F * D);" % o for o in outs)
        p["dw"] = ("dnnl_sgemm('T', 'N', F, D, n, 1.f, h, FM, ge, D, 0.f, dw2 + f0 * D, D);"
                   " dnnl_sgemm('T', 'N', F, D, n, 1.f, da, FM, x + r0 * D, D, 0.f, dw1 + f0 * D, D);"
                   + (" dnnl_sgemm('T', 'N', F, D, n, 1.f, db, FM, x + r0 * D, D, 0.f, dw3 + f0 * D, D);"
                      if gated else ""))
    n_w = 4 if gated else 3
    p["a"] = "in%d" % n_w
    p["g"] = "in%d" % (n_w + (2 if gated else 1))
    p["ro"] = "in%d" % (n_w + (3 if gated else 2))
    p["wo"] = "in%d" % (n_w + (4 if gated else 3))
    return p


class _GroupedFFN(jt.Function):
    """Every expert on its block of sorted rows, forward and backward, as one oneDNN-backed kernel each way."""

    def execute(self, x, w1, w2, w3, row_offsets, weight_offsets, act, f_max):
        gated = w3 is not None
        ws = [w1, w2] + ([w3] if gated else [])
        need_dw = not all(w.is_stop_grad() for w in ws)
        n_in = len(ws) + 1
        M = x.shape[0]
        src = _FWD % dict(_FWD_GATED if gated else _FWD_PLAIN, ro="in%d" % n_in, wo="in%d" % (n_in + 1))
        outs = jt.code([x.shape, (M, f_max)] + ([(M, f_max)] if gated else []), ["float32"] * (3 if gated else 2),
                       [x] + ws + [row_offsets, weight_offsets], cpu_header=_header(act), cpu_src=src)
        # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        self._saved = (x, ws, list(outs[1:]), row_offsets, weight_offsets, act, need_dw)
        return outs[0]

    def grad(self, g):
        x, ws, pre, row_offsets, weight_offsets, act, need_dw = self._saved
        self._saved = None
        gated = len(ws) == 3
        shapes = [x.shape] + ([w.shape for w in ws] if need_dw else [])
        outs = jt.code(shapes, ["float32"] * len(shapes), [x] + ws + pre + [g.float32(), row_offsets, weight_offsets],
                       cpu_header=_header(act), cpu_src=_BWD % _bwd_parts(gated, need_dw))
        dw = outs[1:] if need_dw else [None] * len(ws)
        return outs[0], dw[0], dw[1], (dw[2] if gated else None), None, None, None, None


def grouped_kernel_available(x, weights):
    """True when the CPU grouped kernel applies: fp32, CPU, oneDNN present, MOA_GROUPED_EXPERTS not 0."""
    return (enabled("grouped_experts") and not jt.flags.use_cuda and x.dtype == "float32"
            and all(w.dtype == "float32" for w in weights) and dnnl_available())


def activation(name, a):
    """The experts' activation in Jittor ops (the fall-back path and the references)."""
    if name == "silu":
        return jt.nn.silu(a)
    if name == "relu":
        return jt.nn.relu(a)
    if name == "gelu":
        return 0.5 * a * (1.0 + jt.erf(a * 0.7071067811865476))
    return 0.5 * a * (1.0 + jt.tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))


def _as_np(w):
    return w.numpy() if isinstance(w, jt.Var) else np.asarray(w, dtype=np.float32)


def _ffn(x, w1, w3, w2, act):
    """act(x·w1ᵀ)(·x·w3ᵀ)·w2 for stacked-layout slices (w2 is [F, d])."""
    a = nn.matmul_transpose(x, w1)
    if w3 is None:
        h = activation(act, a)
    elif act == "silu":
        h = swiglu(a, nn.matmul_transpose(x, w3))
    else:
        h = activation(act, a) * nn.matmul_transpose(x, w3)
    return nn.matmul(h, w2)


class Experts(nn.Module):
    """E experts of widths `sizes` on d-wide tokens: `w1`, (`w3`), `w2` [ΣF_e, d]; N(0, init_std) weights."""

    def __init__(self, d, sizes, act="silu", gated=True, init_std=0.02):
        self.d, self.sizes, self.act, self.gated = int(d), tuple(int(s) for s in sizes), act, bool(gated)
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError("expert sizes must be positive, got %r" % (self.sizes,))
        rows = sum(self.sizes)
        self.w1 = jt.init.gauss((rows, d), "float32", 0.0, init_std)
        self.w3 = jt.init.gauss((rows, d), "float32", 0.0, init_std) if gated else None
        self.w2 = jt.init.gauss((rows, d), "float32", 0.0, init_std)
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int32)
        self._offsets_var = None

    @property
    def n_experts(self):
        return len(self.sizes)

    @property
    def offsets(self):
        """Weight-row offsets [E+1] (numpy): expert e owns rows offsets[e]:offsets[e+1]."""
        return self._offsets.copy()

    def _weights(self):
        return [self.w1, self.w2] + ([self.w3] if self.gated else [])

    def expert(self, e):
        """(w1_e, w3_e or None, w2_e) slices of expert e."""
        a, b = int(self._offsets[e]), int(self._offsets[e + 1])
        return self.w1[a:b], (self.w3[a:b] if self.gated else None), self.w2[a:b]

    def run(self, e, x):
        """Expert e on rows x [n, d] with Jittor ops → [n, d] (the per-expert path and the references)."""
        w1, w3, w2 = self.expert(e)
        return _ffn(x, w1, w3, w2, self.act)

    def forward_sorted(self, x_sorted, offsets):
        """x_sorted [M, d] in expert-contiguous blocks, offsets [E+1] int32 (rows past offsets[E] are dropped
        assignments) → [M, d], zero rows for the dropped ones."""
        if grouped_kernel_available(x_sorted, self._weights()):
            note_used("grouped_experts")
            if self._offsets_var is None:
                self._offsets_var = jt.array(self._offsets).stop_grad()
            return _GroupedFFN.apply(x_sorted, self.w1, self.w2, self.w3 if self.gated else None,
                                     offsets.int32().stop_grad(), self._offsets_var, self.act, max(self.sizes))
        from Models.moe.dispatch import run_per_expert
        return run_per_expert(x_sorted, offsets, self.run, self.n_experts, self.d)

    def execute(self, x_sorted, offsets):
        return self.forward_sorted(x_sorted, offsets)

    @classmethod
    def from_dense(cls, w1, w3, w2, n_experts, partition=None, noise=0.0, rng=None, act="silu"):
        """Experts built from a dense FFN's Linear weights: w1 (gate) and w3 (up, None for a plain FFN) [F, d],
        w2 (down) [d, F] as nn.Linear stores it.

        partition None: upcycling, every expert an exact copy (+ N(0, noise²) per weight when noise > 0, drawn
        from rng, a numpy Generator). Otherwise MoEfication: a label per neuron ([F] ints in 0..E-1) or a list of
        E index arrays S_e; expert e gets rows S_e of w1/w3 and columns S_e of w2 (ascending neuron order).
        """
        w1, w2 = _as_np(w1), _as_np(w2)
        w3 = None if w3 is None else _as_np(w3)
        F, d = w1.shape
        if w2.shape != (d, F) or (w3 is not None and w3.shape != (F, d)):
            raise ValueError("dense shapes do not fit: w1 %s, w3 %s, w2 %s (expected w2 [d, F])"
                             % (w1.shape, None if w3 is None else w3.shape, w2.shape))
        if partition is None:
            groups = [np.arange(F)] * n_experts
        else:
            groups = _partition_groups(partition, n_experts, F)
        down = w2.T                                                                 # [F, d]: the stacked layout
        rng = rng if rng is not None else np.random.default_rng(0)

        def stack(m):
            parts = [m[idx] for idx in groups]
            if partition is None and noise > 0:
                parts = [p + noise * rng.standard_normal(p.shape) for p in parts]
            return jt.array(np.concatenate(parts, 0).astype(np.float32))

        out = cls(d, [len(g) for g in groups], act=act, gated=w3 is not None, init_std=0.0)
        out.w1, out.w2 = stack(w1), stack(down)
        if w3 is not None:
            out.w3 = stack(w3)
        return out


def _partition_groups(partition, n_experts, F):
    arr = None if isinstance(partition, (list, tuple)) else np.asarray(partition)
    if arr is not None and arr.ndim == 1 and arr.shape[0] == F and np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() >= n_experts:
            raise ValueError("partition labels must lie in 0..%d" % (n_experts - 1))
        groups = [np.nonzero(arr == e)[0] for e in range(n_experts)]
    else:
        groups = [np.sort(np.asarray(g, dtype=np.int64).reshape(-1)) for g in partition]
        if len(groups) != n_experts:
            raise ValueError("partition has %d groups for %d experts" % (len(groups), n_experts))
        if any(g.size and (g.min() < 0 or g.max() >= F) for g in groups):
            raise ValueError("partition indices must lie in 0..%d" % (F - 1))
    if any(g.size == 0 for g in groups):
        raise ValueError("partition leaves an expert without neurons")
    return groups


class SharedExperts(nn.Module):
    """n always-on experts of width `hidden`, run as one dense FFN of width n·hidden (the same sum); with `gate`,
    y = sigmoid(gate·x)·FFN(x) (Qwen2-MoE's shared_expert_gate, `gate.weight` [1, d])."""

    def __init__(self, d, n, hidden, act="silu", gated=True, gate=False, init_std=0.02):
        self.act, self.gated = act, bool(gated)
        rows = int(n) * int(hidden)
        self.w1 = jt.init.gauss((rows, d), "float32", 0.0, init_std)
        self.w3 = jt.init.gauss((rows, d), "float32", 0.0, init_std) if gated else None
        self.w2 = jt.init.gauss((rows, d), "float32", 0.0, init_std)
        self.gate = linear(d, 1, bias=False) if gate else None

    def execute(self, x):
        y = _ffn(x, self.w1, self.w3, self.w2, self.act)
        if self.gate is not None:
            y = y * jt.sigmoid(self.gate(x.float32())).cast(y.dtype)
        return y
