"""CPU kernels where Jittor's own path is slow: batched GEMM for attention, the decode-time vocabulary head, the
causal attention softmax, SwiGLU, ReLU, RMSNorm and RoPE (each forward and backward), and a vectorised exp they
share.
The head's cross-entropy kernels are in Models/losses.py.

**batched_matmul.** 
Jittor's `jt.matmul` on 3-D/4-D inputs is a fused broadcast-multiply-sum loop on CPU (docs/jittor_notes.md A8); only the
2-D form is relayed to oneDNN. At the benchmark shape that loop ran attention at ~50 GFLOP/s where oneDNN's sgemm
gives ~210. `batched_matmul` calls `dnnl_sgemm` once per batch entry from a small JIT kernel, with the
transposes folded into the GEMM flags (no copies), and defines its gradient with the same kernel. The entries are
shared out over the threads, each one a single-threaded GEMM: at the seq2seq bench's attention shapes (64 entries
of 128×32×128 and the like) that ran at 180–210 GFLOP/s where one multi-threaded GEMM after another gave 70–170.
Everything else — CUDA (cuBLAS batched GEMM through jt.matmul), non-fp32 dtypes, a Jittor without oneDNN, or
MOA_DNNL_BMM=0 — takes `jt.matmul`.

The kernel reads the shapes at run time, so one compiled kernel per transpose combination serves every shape
(a growing KV cache does not recompile).

**few_rows_matmul_t.** While decoding, the head multiplies a handful of rows (one per sequence) by the [V, d]
vocabulary matrix: pure weight streaming. oneDNN's sgemm took ~18 ms for 8 × 512 × 128,256 here; a kernel that
keeps 8 rows' partial sums in vector registers while each weight row streams through once, blocked so that a
block of weight rows is reused from cache by every 8-row group, took ~7 ms (16 rows: 10 vs 31 ms; 50 rows: 26 vs
41 ms). Each step prefetches the weight row four rows ahead: on an Intel Xeon VM that took 8 rows from 24 ms to
12 ms, the time of merely reading the matrix. Inference only (no gradient); used by
`Transformer.execute(last_only=True)` under no_grad. The same blocks serve two more decode-time calls on at most
FEW_ROWS_MAX rows: `few_rows_projections` (q, k and v in one call) and `few_rows_swiglu` (gate and up projections
and silu(gate)·up in one call). The other projections (wo, w2) stay with oneDNN, which was faster on those small
matrices (0.036 vs 0.061 ms for 512×512, 0.15 vs 0.30 ms for 512×1792 with 8 rows); in turn-by-turn decode runs,
this split took the median step from 28.8 to 26.6 ms.
"""
import functools

import numpy as np

from Models.kernel_config import enabled, note_used
from Utils.runtime import import_jittor

jt = import_jittor()

DNNL_SGEMM_DECL = r"""
#include <cstdint>
extern "C" int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
"""
_state = {"ok": None}


def _gemm_source(ta, tb):
    # op(A) is [n, m], op(B) is [m, k]; A and B are row-major [batch, rows, cols].
    n = "in0_shape2" if ta else "in0_shape1"
    m = "in0_shape1" if ta else "in0_shape2"
    k = "in1_shape1" if tb else "in1_shape2"
    # Batch entries are dealt to the threads, each a single-threaded sgemm (oneDNN runs sequentially inside a
    # parallel region), when they split evenly or are many; a few entries get multi-threaded GEMMs in turn.
    return """
    const int64_t batch = in0_shape0, n = %s, m = %s, k = %s;
    const int64_t sa = in0_shape1 * in0_shape2, sb = in1_shape1 * in1_shape2;
    const int T = omp_get_max_threads();
    #pragma omp parallel for schedule(static) if(T > 1 && batch > 1 && (batch %% T == 0 || batch >= 4 * T))
    for (int64_t i = 0; i < batch; i++)
        dnnl_sgemm('%s', '%s', n, k, m, 1.f, in0_p + i * sa, in0_shape2, in1_p + i * sb, in1_shape2,
                   0.f, out0_p + i * n * k, k);
    """ % (n, m, k, "T" if ta else "N", "T" if tb else "N")


def _gemm(a, b, ta, tb):
    """op(a) @ op(b) per batch entry, a/b fp32 [batch, rows, cols]; no gradient."""
    n = a.shape[2] if ta else a.shape[1]
    k = b.shape[1] if tb else b.shape[2]
    return jt.code((a.shape[0], n, k), "float32", [a, b], cpu_header=DNNL_SGEMM_DECL + "#include <omp.h>\n",
                   cpu_src=_gemm_source(ta, tb))


class _BatchedMatmul(jt.Function):
    def execute(self, a, b, transpose_b):
        self._saved = (a, b, transpose_b)  # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        return _gemm(a, b, False, transpose_b)

    def grad(self, g):
        a, b, transpose_b = self._saved
        self._saved = None
        if transpose_b:   # C = A·Bᵀ:  dA = G·B,  dB = Gᵀ·A
            return _gemm(g, b, False, False), _gemm(g, a, True, False), None
        # C = A·B:  dA = G·Bᵀ,  dB = Aᵀ·G
        return _gemm(g, b, False, True), _gemm(a, g, True, False), None


def dnnl_available():
    """True when JIT kernels can call oneDNN's dnnl_sgemm (CPU, a Jittor built with oneDNN); checked once."""
    if _state["ok"] is None:
        ok = (not jt.flags.use_cuda
              and getattr(jt.compile_extern, "mkl_ops", None) is not None)
        if ok:  # one tiny self-check: the kernel must compile, link dnnl_sgemm and agree with jt.matmul
            import numpy as np
            try:
                rng = np.random.default_rng(0)
                a = rng.standard_normal((2, 3, 4)).astype(np.float32)
                b = rng.standard_normal((2, 5, 4)).astype(np.float32)
                with jt.no_grad():
                    got = _gemm(jt.array(a), jt.array(b), False, True).numpy()
                ok = bool(np.allclose(got, a @ b.transpose(0, 2, 1), rtol=1e-4, atol=1e-5))
            except Exception:  # noqa: BLE001 — any failure means: use jt.matmul
                ok = False
        _state["ok"] = ok
    return _state["ok"]


def batched_matmul(a, b, transpose_b=False):
    """a [N, n, m] @ b [N, m, k] (or bᵀ for b [N, k, m] when transpose_b) → [N, n, k]; differentiable."""
    if a.dtype == "float32" and b.dtype == "float32" and enabled("dnnl_bmm") and dnnl_available():
        note_used("dnnl_bmm")
        return _BatchedMatmul.apply(a, b, transpose_b)
    return jt.matmul(a, b.transpose(0, 2, 1) if transpose_b else b)


_ROWS_HEADER = r"""
#include <cstdint>
// One accumulator vector per row: 16 floats where the CPU has 512-bit registers, 8 with AVX2 (a 16-float GCC vector
// is split in two there, and MB = 8 rows of split accumulators spill: 4x slower than oneDNN on an AVX2-only EPYC).
#if defined(__AVX512F__) || !defined(__AVX__)
#define MOA_VW 16
#else
#define MOA_VW 8
#endif
typedef float moa_v16 __attribute__((vector_size(MOA_VW * 4), aligned(4)));
template <int MB>
static inline void moa_dot_rows(const float* __restrict__ x, const float* __restrict__ w, int64_t K, float* out,
                                int64_t ldo) {
    moa_v16 acc[MB];
    for (int m = 0; m < MB; m++) acc[m] = (moa_v16){};
    int64_t k = 0;
    for (; k + MOA_VW <= K; k += MOA_VW) {
        __builtin_prefetch(w + 4 * K + k);
        const moa_v16 wv = *(const moa_v16*)(w + k);
        for (int m = 0; m < MB; m++) acc[m] += *(const moa_v16*)(x + m * K + k) * wv;
    }
    for (int m = 0; m < MB; m++) {
        float s = 0.f;
        for (int l = 0; l < MOA_VW; l++) s += acc[m][l];
        for (int64_t kk = k; kk < K; kk++) s += x[m * K + kk] * w[kk];
        out[m * ldo] = s;
    }
}
"""
_ROWS_HEADER += r"""
// x [M, K] (M <= FEW_ROWS_MAX) times rows n0..n1 of w [N, K]: out[m * ldo + (n - n0)]
static inline void moa_rows_block(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1,
                                  float* out, int64_t ldo) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8)
        for (int64_t n = n0; n < n1; n++) moa_dot_rows<8>(x + m * K, w + n * K, K, out + m * ldo + (n - n0), ldo);
    for (; m + 4 <= M; m += 4)
        for (int64_t n = n0; n < n1; n++) moa_dot_rows<4>(x + m * K, w + n * K, K, out + m * ldo + (n - n0), ldo);
    for (; m < M; m++)
        for (int64_t n = n0; n < n1; n++) moa_dot_rows<1>(x + m * K, w + n * K, K, out + m * ldo + (n - n0), ldo);
}
"""
@functools.lru_cache(maxsize=None)
def _multi_rows_src(nw):
    """One or several weights against the same rows in one parallel loop over all their 32-row blocks."""
    return r"""
    const int64_t M = in0_shape0, K = in0_shape1, NB = 32;
    const float* Ws[%(n)d] = {%(ws)s};
    float* Os[%(n)d] = {%(os)s};
    const int64_t Ns[%(n)d] = {%(ns)s};
    int64_t starts[%(n)d + 1];
    starts[0] = 0;
    for (int i = 0; i < %(n)d; i++) starts[i + 1] = starts[i] + (Ns[i] + NB - 1) / NB;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < starts[%(n)d]; b++) {
        int i = 0;
        while (b >= starts[i + 1]) i++;
        const int64_t n0 = (b - starts[i]) * NB, n1 = n0 + NB < Ns[i] ? n0 + NB : Ns[i];
        moa_rows_block(in0_p, M, K, Ws[i], n0, n1, Os[i] + n0, Ns[i]);
    }
    """ % {"n": nw, "ws": ", ".join("in%d_p" % (i + 1) for i in range(nw)),
           "os": ", ".join("out%d_p" % i for i in range(nw)),
           "ns": ", ".join("in%d_shape0" % (i + 1) for i in range(nw))}


_ROWS_SWIGLU_SRC = r"""
    // silu(x·w1ᵀ)·(x·w3ᵀ) for w1, w3 [N, K]: both projections of a 32-row block, then the product, in one pass
    const int64_t M = in0_shape0, K = in0_shape1, N = in1_shape0, NB = 32;
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        const int64_t n1 = n0 + NB < N ? n0 + NB : N, w = n1 - n0;
        float g[64 * 32], u[64 * 32];
        moa_rows_block(in0_p, M, K, in1_p, n0, n1, g, NB);
        moa_rows_block(in0_p, M, K, in2_p, n0, n1, u, NB);
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < w; j++) {
                const float a = g[m * NB + j], e = expf(-fabsf(a)), inv = 1.f / (1.f + e);
                out0_p[m * N + n0 + j] = a * (a < 0.f ? e * inv : inv) * u[m * NB + j];
            }
    }
"""


# Vectorised exp for CPU kernels (GCC vector extensions; -march=native picks AVX-512/AVX2/SSE lanes). Cephes'
# single-precision expf scheme: exp(x) = 2ⁿ·exp(r), n = round(x·log2 e), |r| ≤ ln2/2, a degree-6 polynomial for exp(r);
# relative error ≤ 3e-7 (≈ 2.5 ulp; tests/test_kernels.py measures it). Inputs below −87.3 give exactly 0 (no
# denormals); callers pass x ≤ 0.
VEC_EXP_HEADER = r"""
#include <cstdint>
#include <cmath>
typedef float moa_f16 __attribute__((vector_size(64)));
typedef float moa_f16u __attribute__((vector_size(64), aligned(4)));   // unaligned loads and stores
typedef int32_t moa_i16 __attribute__((vector_size(64)));
static inline moa_f16 moa_load16(const float* p) { return *(const moa_f16u*)p; }
static inline void moa_store16(float* p, moa_f16 v) { *(moa_f16u*)p = v; }
static inline moa_f16 moa_exp16(moa_f16 x) {
    const moa_f16 zero = {};
    const moa_i16 under = x < zero - 87.3f;
    x = x < zero - 87.3f ? zero - 87.3f : x;
    // n = round(x·log2 e): truncation of y ± 0.5 (kernels build with -Ofast, so no (y + 1.5·2²³) − 1.5·2²³ trick)
    const moa_f16 y2 = x * 1.44269504088896341f;
    const moa_i16 ni = __builtin_convertvector(y2 + (y2 < zero ? zero - 0.5f : zero + 0.5f), moa_i16);
    const moa_f16 n = __builtin_convertvector(ni, moa_f16);
    const moa_f16 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    moa_f16 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const moa_f16 y = p * r * r + r + 1.f;
    const moa_i16 bits = (ni + 127) << 23;
    const moa_i16 out = (moa_i16)(y * (moa_f16)bits) & ~under;
    return (moa_f16)out;
}
// max of z[0..n), n >= 1
static inline float moa_max(const float* z, int64_t n) {
    float mx = z[0];
    int64_t j = 0;
    if (n >= 16) {
        moa_f16 m = moa_load16(z);
        for (j = 16; j + 16 <= n; j += 16) { const moa_f16 v = moa_load16(z + j); m = v > m ? v : m; }
        for (int l = 0; l < 16; l++) mx = m[l] > mx ? m[l] : mx;
    }
    for (; j < n; j++) mx = z[j] > mx ? z[j] : mx;
    return mx;
}
// z[j] = exp(z[j] - shift) in place; returns the sum
static inline float moa_exp_sum_inplace(float* z, int64_t n, float shift) {
    moa_f16 acc = {};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) { const moa_f16 e = moa_exp16(moa_load16(z + j) - shift); moa_store16(z + j, e); acc += e; }
    if (j < n) {
        moa_f16 v = {};
        v = v - 1e30f;
        for (int64_t k = j; k < n; k++) v[k - j] = z[k] - shift;
        const moa_f16 e = moa_exp16(v);
        for (int64_t k = j; k < n; k++) z[k] = e[k - j];
        acc += e;
    }
    float s = 0.f;
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}
"""
FEW_ROWS_MAX = 64  # above this many rows oneDNN's blocked GEMM is the better choice


def _few_rows_use(x, weights):
    return (jt.flags.no_grad and x.dtype == "float32" and all(w.dtype == "float32" for w in weights)
            and x.ndim >= 2 and not jt.flags.use_cuda and jt.flags.cc_type in ("g++", "clang")
            and enabled("few_rows"))


def _rows_of(x):
    rows = 1
    for s in x.shape[:-1]:
        rows *= s
    return rows


def few_rows_matmul_t(x, weight):
    """x [M, K] · weightᵀ for weight [N, K] → [M, N], no gradient: the decode-time head (see the module notes).

    Falls back to nn.matmul_transpose outside no_grad, on CUDA, for non-fp32 inputs, more than FEW_ROWS_MAX rows,
    a compiler other than g++/clang (the kernel uses GCC vector extensions), or MOA_FEW_ROWS_KERNEL=0.
    """
    if not (_few_rows_use(x, [weight]) and x.shape[0] <= FEW_ROWS_MAX):
        return jt.nn.matmul_transpose(x, weight)
    note_used("few_rows")
    return jt.code((x.shape[0], weight.shape[0]), "float32", [x, weight], cpu_header=_ROWS_HEADER,
                   cpu_src=_multi_rows_src(1))


def few_rows_projections(x, linears):
    """[lin(x) for lin in linears] for bias-free Linears sharing the input (q/k/v) in one kernel call, when
    decoding (gradient-free, ≤ FEW_ROWS_MAX rows, fp32 on CPU); None otherwise (the caller calls each Linear)."""
    weights = [lin.weight for lin in linears]
    if any(lin.bias is not None for lin in linears) or not _few_rows_use(x, weights):
        return None
    rows = _rows_of(x)
    if rows > FEW_ROWS_MAX:
        return None
    note_used("few_rows")
    outs = jt.code([(rows, w.shape[0]) for w in weights], ["float32"] * len(weights),
                   [x.reshape(rows, x.shape[-1])] + weights, cpu_header=_ROWS_HEADER,
                   cpu_src=_multi_rows_src(len(weights)))
    return [o.reshape(tuple(x.shape[:-1]) + (w.shape[0],)) for o, w in zip(outs, weights)]


def few_rows_swiglu(x, w1, w3):
    """silu(w1(x))·w3(x) for bias-free Linears in one kernel call when decoding (as few_rows_projections);
    None otherwise."""
    if w1.bias is not None or w3.bias is not None or not _few_rows_use(x, [w1.weight, w3.weight]):
        return None
    rows = _rows_of(x)
    if rows > FEW_ROWS_MAX or w1.weight.shape != w3.weight.shape:
        return None
    note_used("few_rows")
    out = jt.code((rows, w1.weight.shape[0]), "float32", [x.reshape(rows, x.shape[-1]), w1.weight, w3.weight],
                  cpu_header="#include <cmath>\n" + _ROWS_HEADER, cpu_src=_ROWS_SWIGLU_SRC)
    return out.reshape(tuple(x.shape[:-1]) + (w1.weight.shape[0],))


_CONSTS = {}


def _const(value, dtype):
    """A cached 1-element stop-grad Var holding `value`: the kernels' runtime scalars (eps, scale, T, sign), so a
    decode step does not build dozens of tiny host arrays."""
    key = (value, dtype)
    if key not in _CONSTS:
        _CONSTS[key] = jt.array(np.array([value], dtype=dtype)).stop_grad()
    return _CONSTS[key]


# The element-wise kernels below go multi-threaded only above 32768 elements: a decode step calls them on a few rows,
# where waking the OpenMP team costs more than the work.

# ------------------------------------------------------------------------------------ causal softmax
# Attention's softmax over [B·H_kv, n_rep·T, S] scores with the causal mask of `Models.llama.causal_mask(T, S − T)`
# (query row r is position t = r mod T and sees keys s ≤ S − T + t). Jittor's fused element-wise softmax and its
# gradient ran single-threaded here, ~0.35 s of a 2.7 s training step at the benchmark shape; this is one
# multi-threaded pass each way. T and the scale are runtime inputs, so varying sequence lengths share one kernel.
_SOFTMAX_FWD = r"""
    const int64_t rows = in0_shape0 * in0_shape1, R = in0_shape1, S = in0_shape2;
    const int64_t T = in1_p[0];
    const float scale = in2_p[0];
    #pragma omp parallel for schedule(static) if(rows * S > 32768)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t lim = S - T + (i % R) % T + 1;   // keys 0 .. lim-1 are visible
        const float* x = in0_p + i * S;
        float* p = out0_p + i * S;
        for (int64_t s = 0; s < lim; s++) p[s] = x[s] * scale;
        const float sum = moa_exp_sum_inplace(p, lim, moa_max(p, lim));   // vectorised exp
        const float inv = 1.f / sum;
        for (int64_t s = 0; s < lim; s++) p[s] *= inv;
        for (int64_t s = lim; s < S; s++) p[s] = 0.f;
    }
"""
_SOFTMAX_BWD = r"""
    const int64_t rows = in0_shape0 * in0_shape1, S = in0_shape2;
    const float scale = in2_p[0];
    #pragma omp parallel for schedule(static) if(rows * S > 32768)
    for (int64_t i = 0; i < rows; i++) {
        const float* p = in0_p + i * S;
        const float* g = in1_p + i * S;
        float* dx = out0_p + i * S;
        float dot = 0.f;
        for (int64_t s = 0; s < S; s++) dot += p[s] * g[s];
        for (int64_t s = 0; s < S; s++) dx[s] = scale * p[s] * (g[s] - dot);
    }
"""


class _CausalSoftmax(jt.Function):
    def execute(self, scores, t_var, scale_var):
        p = jt.code(scores.shape, "float32", [scores, t_var, scale_var], cpu_header=VEC_EXP_HEADER,
                    cpu_src=_SOFTMAX_FWD)
        self._saved = (p, scale_var)  # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        return p

    def grad(self, g):
        p, scale_var = self._saved
        self._saved = None
        dx = jt.code(p.shape, "float32", [p, g.float32(), scale_var], cpu_header="#include <cstdint>",
                     cpu_src=_SOFTMAX_BWD)
        return dx, None, None


def causal_softmax_available(scores):
    return scores.dtype == "float32" and not jt.flags.use_cuda and enabled("fused_softmax")


def causal_softmax(scores, T, scale):
    """softmax(scale·scores + causal mask) over the last axis of fp32 [N, R, S] scores, R = n_rep·T, as
    Attention computes it with `causal_mask(T, S − T)`; differentiable. CPU only (see causal_softmax_available)."""
    note_used("fused_softmax")
    t_var = _const(int(T), np.int64)
    scale_var = _const(float(scale), np.float32)
    return _CausalSoftmax.apply(scores, t_var, scale_var)


# ------------------------------------------------------------------------------------ SwiGLU
# u = silu(gate)·up, the FFN's element-wise middle, and its gradient: one multi-threaded vectorised pass each way
# (Jittor's fused element-wise ops run on one core). σ(a) is taken as 1/(1+e) or e/(1+e) with e = exp(−|a|), so the
# exp never overflows.
_SWIGLU_HEADER = VEC_EXP_HEADER + r"""
static inline moa_f16 moa_sigmoid16(moa_f16 a) {
    const moa_f16 zero = {};
    const moa_f16 e = moa_exp16(a < zero ? a : zero - a);
    const moa_f16 inv = 1.f / (1.f + e);
    return a < zero ? e * inv : inv;
}
"""
_SWIGLU_FWD = r"""
    const int64_t n = in0_shape0 * in0_shape1, blocks = (n + 15) / 16;
    #pragma omp parallel for schedule(static) if(n > 32768)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t i = b * 16;
        if (i + 16 <= n) {
            const moa_f16 a = moa_load16(in0_p + i);
            moa_store16(out0_p + i, a * moa_sigmoid16(a) * moa_load16(in1_p + i));
        } else {
            moa_f16 a = {}, u = {};
            for (int64_t k = i; k < n; k++) { a[k - i] = in0_p[k]; u[k - i] = in1_p[k]; }
            const moa_f16 o = a * moa_sigmoid16(a) * u;
            for (int64_t k = i; k < n; k++) out0_p[k] = o[k - i];
        }
    }
"""
_SWIGLU_BWD = r"""
    // in0 gate, in1 up, in2 g → out0 d gate = g·up·σ·(1 + a(1 − σ)), out1 d up = g·a·σ
    const int64_t n = in0_shape0 * in0_shape1, blocks = (n + 15) / 16;
    #pragma omp parallel for schedule(static) if(n > 32768)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t i = b * 16;
        moa_f16 a = {}, u = {}, g = {};
        const bool full = i + 16 <= n;
        if (full) { a = moa_load16(in0_p + i); u = moa_load16(in1_p + i); g = moa_load16(in2_p + i); }
        else for (int64_t k = i; k < n; k++) { a[k - i] = in0_p[k]; u[k - i] = in1_p[k]; g[k - i] = in2_p[k]; }
        const moa_f16 s = moa_sigmoid16(a);
        const moa_f16 da = g * u * s * (1.f + a * (1.f - s));
        const moa_f16 du = g * a * s;
        if (full) { moa_store16(out0_p + i, da); moa_store16(out1_p + i, du); }
        else for (int64_t k = i; k < n; k++) { out0_p[k] = da[k - i]; out1_p[k] = du[k - i]; }
    }
"""


class _SwiGLU(jt.Function):
    def execute(self, gate, up):
        self._saved = (gate, up)  # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        return jt.code(gate.shape, "float32", [gate, up], cpu_header=_SWIGLU_HEADER, cpu_src=_SWIGLU_FWD)

    def grad(self, g):
        gate, up = self._saved
        self._saved = None
        return jt.code([gate.shape, up.shape], ["float32"] * 2, [gate, up, g.float32()], cpu_header=_SWIGLU_HEADER,
                       cpu_src=_SWIGLU_BWD)


def swiglu(gate, up):
    """silu(gate)·up, differentiable: one multi-threaded kernel each way for fp32 on CPU (g++/clang), unless
    MOA_FUSED_SWIGLU=0; Jittor's ops otherwise."""
    use = (gate.dtype == "float32" and up.dtype == "float32" and gate.shape == up.shape and not jt.flags.use_cuda
           and jt.flags.cc_type in ("g++", "clang") and enabled("fused_swiglu"))
    if not use:
        return jt.nn.silu(gate) * up
    note_used("fused_swiglu")
    shape = gate.shape
    cols = shape[-1]
    out = _SwiGLU.apply(gate.reshape(-1, cols), up.reshape(-1, cols))
    return out.reshape(shape)


# ------------------------------------------------------------------------------------ ReLU
# The plain FFN's max(a, 0) and its gradient g·[out > 0], one multi-threaded pass each way: Jittor's relu backward
# (a broadcast-and-select on one core) took 3.1 ms per [1024, 1024] activation in the seq2seq bench's step. The
# backward reads the output, which the down projection keeps for its own gradient anyway, so no extra tensor is held.
_RELU_FWD = r"""
    const int64_t n = in0_shape0 * in0_shape1, blocks = (n + 15) / 16;
    #pragma omp parallel for schedule(static) if(n > 32768)
    for (int64_t b = 0; b < blocks; b++) {
        const moa_f16 zero = {};
        const int64_t i = b * 16;
        if (i + 16 <= n) {
            const moa_f16 a = moa_load16(in0_p + i);
            moa_store16(out0_p + i, a < zero ? zero : a);
        } else {
            for (int64_t k = i; k < n; k++) out0_p[k] = in0_p[k] < 0.f ? 0.f : in0_p[k];
        }
    }
"""
_RELU_BWD = r"""
    // in0 out = relu(a), in1 g → out0 da = 0 where out <= 0, else g (torch's rule; a NaN passes both ways)
    const int64_t n = in0_shape0 * in0_shape1, blocks = (n + 15) / 16;
    #pragma omp parallel for schedule(static) if(n > 32768)
    for (int64_t b = 0; b < blocks; b++) {
        const moa_f16 zero = {};
        const int64_t i = b * 16;
        if (i + 16 <= n) {
            const moa_f16 o = moa_load16(in0_p + i), g = moa_load16(in1_p + i);
            moa_store16(out0_p + i, o <= zero ? zero : g);
        } else {
            for (int64_t k = i; k < n; k++) out0_p[k] = in0_p[k] <= 0.f ? 0.f : in1_p[k];
        }
    }
"""


class _Relu(jt.Function):
    def execute(self, a):
        out = jt.code(a.shape, "float32", [a], cpu_header=VEC_EXP_HEADER, cpu_src=_RELU_FWD)
        self._saved = out  # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        return out

    def grad(self, g):
        out, self._saved = self._saved, None
        return jt.code(out.shape, "float32", [out, g.float32()], cpu_header=VEC_EXP_HEADER, cpu_src=_RELU_BWD)


def relu(x):
    """max(x, 0), differentiable (gradient 0 at 0 and NaN kept, as torch): one multi-threaded kernel each way for
    fp32 on CPU (g++/clang) unless MOA_FUSED_SWIGLU=0 (the switch of the FFN's element-wise middle); Jittor's
    otherwise."""
    use = (x.dtype == "float32" and not jt.flags.use_cuda and jt.flags.cc_type in ("g++", "clang")
           and enabled("fused_swiglu") and len(x.shape) >= 1)
    if not use:
        return jt.nn.relu(x)
    note_used("fused_swiglu")
    shape = x.shape
    return _Relu.apply(x.reshape(-1, shape[-1])).reshape(shape)


# ------------------------------------------------------------------------------------ RMSNorm
# y = x·r·w with r = 1/sqrt(mean(x²) + eps) per row, and dx = r·(g·w − x·r²·mean(g·w·x)): one multi-threaded pass
# each way instead of Jittor's single-threaded element-wise ops and reductions.
_RMS_FWD = r"""
    const int64_t rows = in0_shape0, D = in0_shape1;
    const float eps = in2_p[0];
    #pragma omp parallel for schedule(static) if(rows * D > 32768)
    for (int64_t i = 0; i < rows; i++) {
        const float* x = in0_p + i * D;
        float* y = out0_p + i * D;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < D; j++) ss += x[j] * x[j];
        const float r = 1.f / sqrtf(ss / D + eps);
        out1_p[i] = r;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) y[j] = x[j] * r * in1_p[j];
    }
"""
_RMS_BWD = r"""
    // in0 x, in1 w, in2 r [rows], in3 g → out0 dx
    const int64_t rows = in0_shape0, D = in0_shape1;
    #pragma omp parallel for schedule(static) if(rows * D > 32768)
    for (int64_t i = 0; i < rows; i++) {
        const float* x = in0_p + i * D;
        const float* g = in3_p + i * D;
        float* dx = out0_p + i * D;
        const float r = in2_p[i];
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t j = 0; j < D; j++) dot += g[j] * in1_p[j] * x[j];
        const float k = r * r * dot / D;
        #pragma omp simd
        for (int64_t j = 0; j < D; j++) dx[j] = r * (g[j] * in1_p[j] - x[j] * k);
    }
"""


class _RMSNorm(jt.Function):
    def execute(self, x, weight, eps_var):
        y, r = jt.code([x.shape, (x.shape[0],)], ["float32"] * 2, [x, weight, eps_var],
                       cpu_header="#include <cmath>\n#include <cstdint>", cpu_src=_RMS_FWD)
        # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        self._saved = (x, weight, r, weight.is_stop_grad())
        return y

    def grad(self, g):
        x, weight, r, weight_frozen = self._saved
        self._saved = None
        g = g.float32()
        dx = jt.code(x.shape, "float32", [x, weight, r, g], cpu_header="#include <cstdint>", cpu_src=_RMS_BWD)
        dw = None if weight_frozen else (g * x * r.reshape(-1, 1)).sum(0)
        return dx, dw, None


def rms_norm(x, weight, eps):
    """x·rsqrt(mean(x², −1) + eps)·weight, differentiable; one multi-threaded kernel each way for fp32 on CPU unless
    MOA_FUSED_NORM=0. Returns None when the kernel does not apply (the caller then uses Jittor's ops)."""
    if not (x.dtype == "float32" and weight.dtype == "float32" and not jt.flags.use_cuda and enabled("fused_norm")):
        return None
    note_used("fused_norm")
    shape = x.shape
    eps_var = _const(float(eps), np.float32)
    return _RMSNorm.apply(x.reshape(-1, shape[-1]), weight, eps_var).reshape(shape)


# ------------------------------------------------------------------------------------ RoPE
# Meta's interleaved rotary embedding of x [B, T, H, hd] by cos/sin [T, hd/2]; the gradient is the rotation by the
# opposite angle, so the same kernel serves both ways (Jittor's stack/index ops for it were ~40 ms of a step).
_ROPE_SRC = r"""
    // in0 x [B, T, H, hd], in1 cos [T, hd/2], in2 sin [T, hd/2], in3 sign [1] (+1 forward, −1 backward)
    const int64_t B = in0_shape0, T = in0_shape1, H = in0_shape2, hd = in0_shape3, half = hd / 2;
    const float sg = in3_p[0];
    #pragma omp parallel for schedule(static) if(B * T * H * hd > 32768)
    for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t t = bt % T;
        const float* c = in1_p + t * half;
        const float* s = in2_p + t * half;
        for (int64_t h = 0; h < H; h++) {
            const float* x = in0_p + (bt * H + h) * hd;
            float* y = out0_p + (bt * H + h) * hd;
            #pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                const float x0 = x[2 * j], x1 = x[2 * j + 1], sn = sg * s[j];
                y[2 * j] = x0 * c[j] - x1 * sn;
                y[2 * j + 1] = x0 * sn + x1 * c[j];
            }
        }
    }
"""


def _rope(x, cos, sin, sign):
    return jt.code(x.shape, "float32", [x, cos, sin, sign], cpu_header="#include <cstdint>", cpu_src=_ROPE_SRC)


class _Rope(jt.Function):
    def execute(self, x, cos, sin):
        self._saved = (cos, sin)  # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        return _rope(x, cos, sin, _const(1.0, np.float32))

    def grad(self, g):
        cos, sin = self._saved
        self._saved = None
        return _rope(g.float32(), cos, sin, _const(-1.0, np.float32)), None, None


def rope(x, cos, sin):
    """Interleaved-pair rotation of fp32 x [B, T, H, hd] by cos/sin [T, hd/2] (Models.llama.apply_rotary_emb),
    differentiable in x; one multi-threaded kernel each way on CPU unless MOA_FUSED_ROPE=0. Returns None when the
    kernel does not apply."""
    if not (x.dtype == "float32" and cos.dtype == "float32" and not jt.flags.use_cuda and enabled("fused_rope")):
        return None
    note_used("fused_rope")
    return _Rope.apply(x, cos.stop_grad(), sin.stop_grad())
