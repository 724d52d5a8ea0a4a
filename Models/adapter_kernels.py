"""Decode-time CPU kernels for MoA's adapters: the type router, LoRA, the prompt adapter and the parallel adapter.

While decoding, every adapter works on a handful of rows (one per sequence), so its small matrices cost no time;
what costs is the number of Jittor ops: each op of a step is built, scheduled and run at some tens of µs, and soft
MoA (LoRA on Q, K, V, O and FFN_DOWN, prompt, parallel adapter, SwiGLU router) added ~450 ops to the ~190 of a
base decode step at the benchmark shape. Here each piece is one `jt.code` call:

* `type_weights` — the type router (Linear or SwiGLU router) and its sigmoid; for sparse MoA also Γ, the mask
  1[w − Γ ≥ 0] and the masked weights;
* `lora_projections` — q, k and v (or the FFN's gate and up projections with silu(gate)·up) streamed once for all
  rows as `kernels.few_rows_projections` does, the LoRA A projections in the same call, then each output's
  B·(A x)·(α/r)·(route weight) added block by block;
* `lora_add` — base + B·(A x)·(α/r)·(route weight) onto a projection oneDNN already computed (wo, w2: oneDNN is the
  faster choice for those small matrices, see kernels.py);
* `prompt_attention_add` — the zero-gated prompt (scores against the prompt's keys, softmax, per-head gate, × values,
  × route weight) added onto the attention output;
* `parallel_adapter_add` — h + ffn + up(silu(down x))·(route weight), the block's last sum.

Sparse MoA's adapters run on every row and are multiplied by the masked weight, which is exactly 0 where an adapter
is off, instead of a gather / scatter per adapter whose `jt.nonzero` syncs with the host (the numbers of the
selected rows are the same). The prompt's keys and values depend only on the frozen wk / wv and the prompt table:
`Models.adapters.prompt_keys_values` keeps them from a generation's first forward to its last step.

Each function returns None where it does not apply — with gradients (training), on CUDA, for non-fp32 tensors,
more than FEW_ROWS_MAX rows, a compiler other than g++/clang, adapters it does not cover (MoLoRA / HydraLoRA /
Top-K / AdaMoLE experts, prompt or parallel-adapter experts, biased q/k/v projections) or MOA_FUSED_ADAPTERS=0 —
and the caller then takes the generic path (`Models.routing`, `Models.adapters`). Same numbers either way, up to
float rounding: tests/test_adapter_kernels.py checks each kernel against numpy and whole models with the switch on
and off.
"""
import functools

import numpy as np

from Models.adapters import MOELoraLayer
from Models.kernel_config import enabled, note_used
from Models.kernels import _ROWS_HEADER, FEW_ROWS_MAX, _rows_of
from Utils.runtime import import_jittor

jt = import_jittor()

_HEADER = "#include <cmath>\n#include <vector>\n" + _ROWS_HEADER + r"""
// Jittor's own sigmoid (1/(1+exp(min(-a, 30)))) and silu, so the routers match the ops they replace
static inline float moa_sigmoid(float a) { return 1.f / (1.f + expf(fminf(-a, 30.f))); }
// the route weight of column col for each of M rows; rw [RW, NC] holds one row per token (RW = M), per sequence
// (RW = M / T: instance routes, UniPEFT gates) or a single row of ones (RW = 1: no router)
static inline void moa_route_column(const float* rw, int64_t RW, int64_t NC, int64_t col, int64_t M, float* w) {
    for (int64_t m = 0; m < M; m++) w[m] = rw[(m * RW / M) * NC + col];
}
// out[m·ldo + (n − n0)] += ((B[n]·h[m])·s)·w[m] for n in [n0, n1): a LoRA up-projection of rank R, scaled by α/r
// and the route weight in the order the Jittor ops take them
static inline void moa_lora_up(const float* h, int64_t M, int64_t R, const float* B, int64_t n0, int64_t n1,
                               float s, const float* w, float* out, int64_t ldo) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float t = 0.f;
            for (int64_t r = 0; r < R; r++) t += B[n * R + r] * h[m * R + r];
            out[m * ldo + (n - n0)] += (t * s) * w[m];
        }
}
"""

_CONSTS = {}


def _floats(values, shape=None):
    """A cached stop-grad float32 Var of `values` (kernel parameters: scales, columns, thresholds), so a decode
    step builds no host arrays."""
    key = (tuple(values), shape)
    if key not in _CONSTS:
        _CONSTS[key] = jt.array(np.array(values, np.float32).reshape(shape or (len(values),))).stop_grad()
    return _CONSTS[key]


def applies(rows, *tensors):
    """True when decoding allows the adapter kernels: no gradient, at most FEW_ROWS_MAX rows (tokens), fp32
    tensors on the CPU with g++/clang, MOA_FUSED_ADAPTERS on."""
    return (jt.flags.no_grad and rows <= FEW_ROWS_MAX and enabled("fused_adapters") and not jt.flags.use_cuda
            and jt.flags.cc_type in ("g++", "clang") and all(t.dtype == "float32" for t in tensors))


def plain_lora(module):
    """(A [r, in], B [out, r], α/r) of a one-expert LoRA; None for anything else (MoLoRA, HydraLoRA, MoE-LoRA)."""
    if not isinstance(module, MOELoraLayer) or module.expert_num != 1:
        return None
    return module.lora_A.weight, module.lora_B.weight, float(module.scaling)


def _route_weights(route, name):
    """([R1, R2, n] weights, column) weighting adapter `name`: the route's own (masked for sparse MoA) or a single
    1 when the block has no router."""
    found = route.weight_of(name)
    return found if found is not None else (_floats([1.0], (1, 1, 1)), 0)


# ------------------------------------------------------------------------------------ type router
@functools.lru_cache(maxsize=None)
def _router_src(swiglu, gamma):
    """in0 x [M, D], in1 [Γ_max, threshold-gradient mode], then the router's weights and biases (Linear: W, b;
    SwiGLU: W1, b1, W3, b3, W2, b2), then Γ's W, b when learned. out0 the (masked) weights [M, n]; with Γ also
    out1 Γ [M, 1] and out2 the mask as 0/1 [M, n]; the SwiGLU router's hidden rows are the last output."""
    src = ["const int64_t M = in0_shape0, D = in0_shape1;"]
    if swiglu:
        src.append(r"""
    const int64_t Hd = in2_shape0, n = in6_shape0;
    float* g = out%(hid)d_p;
    std::vector<float> u(M * Hd);
    moa_rows_block(in0_p, M, D, in2_p, 0, Hd, g, Hd);
    moa_rows_block(in0_p, M, D, in4_p, 0, Hd, u.data(), Hd);
    for (int64_t i = 0; i < M * Hd; i++) {
        const float a = g[i] + in3_p[i %% Hd];
        g[i] = a * moa_sigmoid(a) * (u[i] + in5_p[i %% Hd]);
    }
    moa_rows_block(g, M, Hd, in6_p, 0, n, out0_p, n);
    const float* bias = in7_p;""" % {"hid": 3 if gamma else 1})
        nxt = 8
    else:
        src.append(r"""
    const int64_t n = in2_shape0;
    moa_rows_block(in0_p, M, D, in2_p, 0, n, out0_p, n);
    const float* bias = in3_p;""")
        nxt = 4
    src.append("for (int64_t i = 0; i < M * n; i++) out0_p[i] = moa_sigmoid(out0_p[i] + bias[i % n]);")
    if gamma:
        src.append("const float gmax = in1_p[0]; const int mode = (int)in1_p[1];")
        if gamma == "learned":
            src.append(r"""
    moa_rows_block(in0_p, M, D, in%(w)d_p, 0, 1, out1_p, 1);
    for (int64_t m = 0; m < M; m++) out1_p[m] = gmax * moa_sigmoid(out1_p[m] + in%(b)d_p[0]);""" % {
                "w": nxt, "b": nxt + 1})
        else:
            src.append("for (int64_t m = 0; m < M; m++) out1_p[m] = gmax;")
        src.append(r"""
    // sparse MoA: mask 1[w − Γ ≥ 0]; weights w·mask (threshold_grad none / ste forward) or (w − Γ)·mask (shifted)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < n; c++) {
            const float w = out0_p[m * n + c], d = w - out1_p[m], k = d >= 0.f ? 1.f : 0.f;
            out2_p[m * n + c] = k;
            out0_p[m * n + c] = (mode == 2 ? d : w) * k;
        }""")
    return "\n".join(src)


_GRAD_MODES = {"none": 0, "ste": 1, "shifted": 2}


def type_weights(block, x):
    """The type weights of a soft / sparse MoA block from x [B, T, d] in one call: (weights [B, T, n], Γ [B, T, 1]
    or None, mask [B, T, n] as 0/1 or None); the weights are masked for sparse MoA. None where the kernel does not
    apply (Models.routing.build_route then runs the router's modules)."""
    router = block.adapter_type_router
    swiglu = hasattr(router, "w3")
    parts = [router.w1, router.w3, router.w2] if swiglu else [router]
    if any(p.bias is None for p in parts):
        return None
    gamma_mod = getattr(block, "adapter_threshold_fn", None)
    gamma = None if gamma_mod is None else ("const" if gamma_mod.const else "learned")
    weights = []
    for p in parts:
        weights += [p.weight, p.bias]
    if gamma == "learned":
        weights += [gamma_mod.weight, gamma_mod.bias]
    B, T, D = x.shape
    if not applies(B * T, x, *weights):
        return None
    note_used("fused_adapters")
    M, n = B * T, parts[-1].weight.shape[0]
    meta = _floats([gamma_mod.max_threshold if gamma else 0.0, _GRAD_MODES[block.threshold_grad] if gamma else 0])
    shapes, dtypes = [(M, n)], ["float32"]
    if gamma:
        shapes += [(M, 1), (M, n)]
        dtypes += ["float32"] * 2
    if swiglu:
        shapes.append((M, router.w1.weight.shape[0]))
        dtypes.append("float32")
    outs = jt.code(shapes, dtypes, [x.reshape(M, D), meta] + weights, cpu_header=_HEADER,
                   cpu_src=_router_src(swiglu, gamma))
    w = outs[0].reshape(B, T, n)
    if not gamma:
        return w, None, None
    return w, outs[1].reshape(B, T, 1), outs[2].reshape(B, T, n)


# ------------------------------------------------------------------------------------ LoRA
@functools.lru_cache(maxsize=None)
def _projections_src(lora_of, swiglu):
    """Projections of in0 x [M, K] by the weights in3.. (each [N_i, K]), with a LoRA on the weights whose entry of
    `lora_of` is its index j (its A_j, B_j follow the weights); in1 route weights [R1, R2, NC], in2 (α/r, column)
    per LoRA. Outputs: each projection (or, with swiglu, silu(gate)·up of the two), then the LoRAs' A x rows."""
    nw, nl = len(lora_of), sum(1 for j in lora_of if j >= 0)
    w_in = ["in%d" % (3 + i) for i in range(nw)]
    a_in = ["in%d" % (3 + nw + 2 * j) for j in range(nl)]
    b_in = ["in%d" % (4 + nw + 2 * j) for j in range(nl)]
    n_out = 1 if swiglu else nw
    h_out = ["out%d_p" % (n_out + j) for j in range(nl)]
    src = r"""
    const int64_t M = in0_shape0, K = in0_shape1, NB = 32, RW = in1_shape0 * in1_shape1, NC = in1_shape2;
    const float* W[%(nw)d] = {%(w)s};
    const int64_t N[%(nw)d] = {%(n)s};
    const int L[%(nw)d] = {%(l)s};
    const float* A[%(nl)d] = {%(a)s};
    const float* Bu[%(nl)d] = {%(b)s};
    const int64_t R[%(nl)d] = {%(r)s};
    float* Hs[%(nl)d] = {%(h)s};
    float S[%(nl)d], C[%(nl)d][64];
    for (int j = 0; j < %(nl)d; j++) {
        S[j] = in2_p[2 * j];
        moa_route_column(in1_p, RW, NC, (int64_t)in2_p[2 * j + 1], M, C[j]);
    }
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int j = 0; j < %(nl)d; j++) moa_rows_block(in0_p, M, K, A[j], 0, R[j], Hs[j], R[j]);
    """ % {"nw": nw, "nl": nl, "w": ", ".join(p + "_p" for p in w_in), "n": ", ".join(p + "_shape0" for p in w_in),
           "l": ", ".join(str(j) for j in lora_of), "a": ", ".join(p + "_p" for p in a_in),
           "b": ", ".join(p + "_p" for p in b_in), "r": ", ".join(p + "_shape0" for p in a_in), "h": ", ".join(h_out)}
    if swiglu:
        src += r"""
        // silu(gate)·up a block of 32 columns at a time, each with its LoRA, as kernels.few_rows_swiglu
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N[0]; n0 += NB) {
            const int64_t n1 = n0 + NB < N[0] ? n0 + NB : N[0], w = n1 - n0;
            float g[64 * 32], u[64 * 32];
            moa_rows_block(in0_p, M, K, W[0], n0, n1, g, NB);
            moa_rows_block(in0_p, M, K, W[1], n0, n1, u, NB);
            if (L[0] >= 0) moa_lora_up(Hs[L[0]], M, R[L[0]], Bu[L[0]], n0, n1, S[L[0]], C[L[0]], g, NB);
            if (L[1] >= 0) moa_lora_up(Hs[L[1]], M, R[L[1]], Bu[L[1]], n0, n1, S[L[1]], C[L[1]], u, NB);
            for (int64_t m = 0; m < M; m++)
                for (int64_t j = 0; j < w; j++) {
                    const float a = g[m * NB + j], e = expf(-fabsf(a)), inv = 1.f / (1.f + e);
                    out0_p[m * N[0] + n0 + j] = a * (a < 0.f ? e * inv : inv) * u[m * NB + j];
                }
        }
    }
    """
    else:
        src += r"""
        // every 32-row block of every weight, its LoRA added while the block is in cache
        float* O[%(nw)d] = {%(o)s};
        int64_t starts[%(nw)d + 1];
        starts[0] = 0;
        for (int i = 0; i < %(nw)d; i++) starts[i + 1] = starts[i] + (N[i] + NB - 1) / NB;
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < starts[%(nw)d]; b++) {
            int i = 0;
            while (b >= starts[i + 1]) i++;
            const int64_t n0 = (b - starts[i]) * NB, n1 = n0 + NB < N[i] ? n0 + NB : N[i];
            moa_rows_block(in0_p, M, K, W[i], n0, n1, O[i] + n0, N[i]);
            if (L[i] >= 0) moa_lora_up(Hs[L[i]], M, R[L[i]], Bu[L[i]], n0, n1, S[L[i]], C[L[i]], O[i] + n0, N[i]);
        }
    }
    """ % {"nw": nw, "o": ", ".join("out%d_p" % i for i in range(nw))}
    return src


def _lora_inputs(loras, names, route):
    """(lora_of, route weights, meta, [A_j, B_j, ...], ranks) for the LoRAs present; None if one is not plain."""
    lora_of, meta, ab, ranks, rw = [], [], [], [], None
    for mod, name in zip(loras, names):
        if mod is None:
            lora_of.append(-1)
            continue
        parts = plain_lora(mod)
        if parts is None:
            return None
        a, b, scale = parts
        w, col = _route_weights(route, name)
        if rw is not None and w is not rw:
            return None   # one route weight tensor per call (always so: one block, one route)
        rw = w
        lora_of.append(len(ranks))
        meta += [scale, col]
        ab += [a, b]
        ranks.append(a.shape[0])
    if not ranks:
        return None
    return tuple(lora_of), rw, _floats(meta), ab, ranks


def lora_projections(x, linears, loras, names, route):
    """[lin(x) + route-weighted LoRA(x) for each] for bias-free Linears sharing x [.., K] (q, k, v) in one call,
    when decoding with at least one plain LoRA among `loras` (None entries: no LoRA); None otherwise."""
    got = _lora_inputs(loras, names, route)
    if got is None or any(lin.bias is not None for lin in linears):
        return None
    lora_of, rw, meta, ab, ranks = got
    weights = [lin.weight for lin in linears]
    if not applies(_rows_of(x), x, rw, *weights, *ab):
        return None
    note_used("fused_adapters")
    M, K = _rows_of(x), x.shape[-1]
    shapes = [(M, w.shape[0]) for w in weights] + [(M, r) for r in ranks]
    outs = jt.code(shapes, ["float32"] * len(shapes), [x.reshape(M, K), rw, meta] + weights + ab,
                   cpu_header=_HEADER, cpu_src=_projections_src(lora_of, False))
    return [o.reshape(tuple(x.shape[:-1]) + (w.shape[0],)) for o, w in zip(outs, weights)]


def lora_swiglu(x, w1, w3, lora_gate, lora_up, route):
    """silu(w1 x + LoRA_GATE) · (w3 x + LoRA_UP) with the route's weights, in one call when decoding with a plain
    LoRA on the gate and / or up projection; None otherwise."""
    got = _lora_inputs([lora_gate, lora_up], ["lora_GATE", "lora_UP"], route)
    if got is None or w1.bias is not None or w3.bias is not None or w1.weight.shape != w3.weight.shape:
        return None
    lora_of, rw, meta, ab, ranks = got
    if not applies(_rows_of(x), x, rw, w1.weight, w3.weight, *ab):
        return None
    note_used("fused_adapters")
    M, K, N = _rows_of(x), x.shape[-1], w1.weight.shape[0]
    shapes = [(M, N)] + [(M, r) for r in ranks]
    outs = jt.code(shapes, ["float32"] * len(shapes), [x.reshape(M, K), rw, meta, w1.weight, w3.weight] + ab,
                   cpu_header=_HEADER, cpu_src=_projections_src(lora_of, True))
    return outs[0].reshape(tuple(x.shape[:-1]) + (N,))


_LORA_ADD_SRC = r"""
    // in0 base [M, N], in1 x [M, K], in2 route weights, in3 (α/r, column), in4 A [R, K], in5 B [N, R]
    const int64_t N = in0_shape1, M = in1_shape0, K = in1_shape1, R = in4_shape0;
    float c[64];
    moa_route_column(in2_p, in2_shape0 * in2_shape1, in2_shape2, (int64_t)in3_p[1], M, c);
    moa_rows_block(in1_p, M, K, in4_p, 0, R, out1_p, R);
    for (int64_t i = 0; i < M * N; i++) out0_p[i] = in0_p[i];
    moa_lora_up(out1_p, M, R, in5_p, 0, N, in3_p[0], c, out0_p, N);
"""


def lora_add(base, module, x, route, name):
    """base + LoRA(x)·(route weight of `name`) in one call for a plain LoRA when decoding; None otherwise."""
    got = _lora_inputs([module], [name], route)
    if got is None:
        return None
    _, rw, meta, ab, ranks = got
    if not applies(_rows_of(x), x, base, rw, *ab):
        return None
    note_used("fused_adapters")
    M, N = _rows_of(x), base.shape[-1]
    out, _ = jt.code([(M, N), (M, ranks[0])], ["float32"] * 2,
                     [base.reshape(M, N), x.reshape(M, x.shape[-1]), rw, meta] + ab,
                     cpu_header=_HEADER, cpu_src=_LORA_ADD_SRC)
    return out.reshape(base.shape)


def add_adapter(base, name, module, x, route):
    """base + the route-weighted adapter `module`(x) (base alone when there is no adapter): one kernel call for a
    plain LoRA while decoding, else the route's generic `apply`."""
    if module is None:
        return base
    fused = lora_add(base, module, x, route, name)
    if fused is not None:
        return fused
    delta = route.apply(name, module, x)
    return base if delta is None else base + delta.cast(base.dtype)


# ------------------------------------------------------------------------------------ prompt
_PROMPT_SRC = r"""
    // in0 attention output o [B, H, T, hd], in1 q [B·H_kv, n_rep·T, hd] (head h = j·n_rep + r under KV head j),
    // in2 / in3 the prompt's keys / values [P, H_kv·hd], in4 gate [H], in5 route weights, in6 (column, √hd)
    const int64_t B = in0_shape0, H = in0_shape1, T = in0_shape2, hd = in0_shape3;
    const int64_t G = in1_shape0, RT = in1_shape1, P = in2_shape0, KW = in2_shape1;
    const int64_t Hkv = G / B, rep = H / Hkv;
    const float sq = in6_p[1];
    std::vector<float> c(B * T), p(P), acc(hd);
    moa_route_column(in5_p, in5_shape0 * in5_shape1, in5_shape2, (int64_t)in6_p[0], B * T, c.data());
    for (int64_t i = 0; i < B * H * T * hd; i++) out0_p[i] = in0_p[i];
    for (int64_t bj = 0; bj < G; bj++) {
        const int64_t b = bj / Hkv, j = bj % Hkv;
        for (int64_t row = 0; row < RT; row++) {
            const int64_t h = j * rep + row / T, t = row % T;
            const float* qv = in1_p + (bj * RT + row) * hd;
            for (int64_t s = 0; s < P; s++) {
                const float* k = in2_p + s * KW + j * hd;
                float d = 0.f;
                for (int64_t e = 0; e < hd; e++) d += qv[e] * k[e];
                p[s] = d / sq;
            }
            float mx = p[0];
            for (int64_t s = 1; s < P; s++) mx = p[s] > mx ? p[s] : mx;
            float sum = 0.f;
            for (int64_t s = 0; s < P; s++) { p[s] = expf(p[s] - mx); sum += p[s]; }
            const float g = in4_p[h];
            for (int64_t e = 0; e < hd; e++) acc[e] = 0.f;
            for (int64_t s = 0; s < P; s++) {
                const float ps = (p[s] / sum) * g;
                const float* v = in3_p + s * KW + j * hd;
                for (int64_t e = 0; e < hd; e++) acc[e] += ps * v[e];
            }
            float* dst = out0_p + ((b * H + h) * T + t) * hd;
            const float w = c[b * T + t];
            for (int64_t e = 0; e < hd; e++) dst[e] += acc[e] * w;
        }
    }
"""


def prompt_attention_add(attention, q, output, kv, route):
    """output + the route-weighted zero-gated prompt attention (Models.adapters.prompt_attention, one prompt
    expert) in one call when decoding; q as Attention groups it, kv the prompt's keys and values
    (prompt_keys_values). None otherwise."""
    if attention.prompt_experts != 1:
        return None
    import math
    kp, vp = kv
    rw, col = _route_weights(route, "prompt")
    gate = attention.prompt_gate
    B, H, T, _ = output.shape
    if not applies(B * T, q, output, kp, vp, gate, rw):
        return None
    note_used("fused_adapters")
    return jt.code(output.shape, "float32", [output, q, kp, vp, gate.reshape(-1), rw,
                                             _floats([col, math.sqrt(attention.head_dim)])],
                   cpu_header=_HEADER, cpu_src=_PROMPT_SRC)


# ------------------------------------------------------------------------------------ parallel adapter
_PA_SRC = r"""
    // in0 h, in1 ffn output, in2 x (ffn-normed) [M, D], in3 down [S, D], in4 its bias, in5 up [D, S], in6 its bias,
    // in7 route weights, in8 (column): out0 = (h + f) + (up(silu(down x)))·w; out1 the adapter's hidden rows
    const int64_t M = in2_shape0, D = in2_shape1, S = in3_shape0;
    float c[64];
    moa_route_column(in7_p, in7_shape0 * in7_shape1, in7_shape2, (int64_t)in8_p[0], M, c);
    moa_rows_block(in2_p, M, D, in3_p, 0, S, out1_p, S);
    for (int64_t i = 0; i < M * S; i++) { const float a = out1_p[i] + in4_p[i % S]; out1_p[i] = a * moa_sigmoid(a); }
    moa_rows_block(out1_p, M, S, in5_p, 0, D, out0_p, D);
    for (int64_t m = 0; m < M; m++)
        for (int64_t d = 0; d < D; d++) {
            const int64_t i = m * D + d;
            out0_p[i] = (in0_p[i] + in1_p[i]) + (out0_p[i] + in6_p[d]) * c[m];
        }
"""


def parallel_adapter_add(h, f, adapter, x, route):
    """h + f + the route-weighted parallel adapter up(silu(down x)) in one call when decoding with a one-expert
    adapter; None otherwise."""
    if adapter.expert_num != 1:
        return None
    down, up = adapter.down_proj, adapter.up_proj
    rw, col = _route_weights(route, "p_adapter")
    if not applies(_rows_of(x), x, h, f, rw, down.weight, down.bias, up.weight, up.bias):
        return None
    note_used("fused_adapters")
    M, D = _rows_of(x), x.shape[-1]
    out, _ = jt.code([(M, D), (M, down.weight.shape[0])], ["float32"] * 2,
                     [h.reshape(M, D), f.reshape(M, D), x.reshape(M, D), down.weight, down.bias, up.weight, up.bias,
                      rw, _floats([col])], cpu_header=_HEADER, cpu_src=_PA_SRC)
    return out.reshape(h.shape)
