"""The output projection and cross-entropy fused into one differentiable op (the training loss of SPEC §5.3).

With a 128k vocabulary the projection h·Wᵀ is most of a small model's training FLOPs, and the [rows, V] logits are
its largest tensors. Left to autograd, `logits - max`, `exp`, the softmax sum and their gradients each materialise
another [rows, V] fp32 buffer and make another pass over memory. On CPU (fp32), `head_cross_entropy` goes through
the vocabulary in chunks of HEAD_CHUNK columns: oneDNN's sgemm writes a chunk of logits z, and while the chunk is
still in cache one multi-threaded pass takes each row's chunk maximum m_c, overwrites z with E = exp(z − m_c) and
sums it (s_c). Only E (one [rows, V] buffer, no separate logits) and the per-chunk (m_c, s_c) are kept; with
M = max_c m_c and S = Σ_c s_c·exp(m_c − M), the loss is log S + M − z_target. The backward, with c = dL/dloss / rows
and G = E·exp(m_c − M)·c/S − c·onehot(target) (softmax − one-hot, scaled), builds G one chunk at a time in a
cache-sized buffer and accumulates

    dL/dh = Σ_c G_c·W_c            and, only when W is trainable (the base is frozen in fine-tuning),
    dL/dW_c = G_cᵀ·h.

Elsewhere (CUDA, other dtypes, MOA_FUSED_HEAD=0) the same formulas run as Jittor ops on whole [rows, V] tensors.
"""
from Utils.runtime import import_jittor
from Models.kernels import VEC_EXP_HEADER, dnnl_available, DNNL_SGEMM_DECL

jt = import_jittor()
nn = jt.nn

HEAD_CHUNK = 2048  # vocabulary columns per chunk: 1024 rows × 2048 × 4 B = 8 MB, cache-resident next to the GEMM

_FWD_SRC = r"""
    const int64_t m = in0_shape0, d = in0_shape1, V = in1_shape0, VC = %(chunk)d, nc = out1_shape1;
    for (int64_t c = 0; c < nc; c++) {
        const int64_t c0 = c * VC, w = V - c0 < VC ? V - c0 : VC;
        float* zc = out0_p + c0 * m;   // chunk-major: chunk c is a contiguous [m, w] block
        dnnl_sgemm('N', 'T', m, w, d, 1.f, in0_p, d, in1_p + c0 * d, d, 0.f, zc, w);
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            float* z = zc + r * w;
            const int64_t t = (int64_t)in2_p[r] - c0;
            if (t >= 0 && t < w) out3_p[r] = z[t];
            const float mx = moa_max(z, w);
            out1_p[r * nc + c] = mx;
            out2_p[r * nc + c] = moa_exp_sum_inplace(z, w, mx);
        }
    }
"""
_BWD_SRC = r"""
    // in0 E (chunk-major [m, V]), in1 W [V, d], in2 f [m, nc] = exp(m_c - M)·c/S, in3 target [m], in4 c [1] (, in5 h [m, d])
    const int64_t m = in3_shape0, V = in1_shape0, d = in1_shape1, VC = %(chunk)d, nc = in2_shape1;
    const float cc = in4_p[0];
    float* buf = (float*)::aligned_alloc(64, (size_t)(m * VC * sizeof(float) + 63) / 64 * 64);
    for (int64_t c = 0; c < nc; c++) {
        const int64_t c0 = c * VC, w = V - c0 < VC ? V - c0 : VC;
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            const float* e = in0_p + c0 * m + r * w;
            float* g = buf + r * w;
            const float f = in2_p[r * nc + c];
            int64_t j = 0;
            for (; j + 16 <= w; j += 16) moa_store16(g + j, moa_load16(e + j) * f);
            for (; j < w; j++) g[j] = e[j] * f;
            const int64_t t = (int64_t)in3_p[r] - c0;
            if (t >= 0 && t < w) g[t] -= cc;
        }
        dnnl_sgemm('N', 'N', m, d, w, 1.f, buf, w, in1_p + c0 * d, d, c == 0 ? 0.f : 1.f, out0_p, d);
        %(dw)s
    }
    ::free(buf);
"""
_DW_SRC = "dnnl_sgemm('T', 'N', w, d, m, 1.f, buf, w, in5_p, d, 0.f, out1_p + c0 * d, d);"
_HEADER = VEC_EXP_HEADER + DNNL_SGEMM_DECL + "#include <cstdlib>\n"


def _fused_available(h, weight):
    import os
    return (h.dtype == "float32" and weight.dtype == "float32" and not jt.flags.use_cuda
            and jt.flags.cc_type in ("g++", "clang") and os.environ.get("MOA_FUSED_HEAD", "1") != "0"
            and dnnl_available())


class _HeadCrossEntropyCPU(jt.Function):
    """The chunked CPU kernels (see the module notes)."""

    def execute(self, h, weight, target):
        m, V = h.shape[0], weight.shape[0]
        nc = -(-V // HEAD_CHUNK)
        e, cm, cs, picked = jt.code([(m * V,), (m, nc), (m, nc), (m,)], ["float32"] * 4, [h, weight, target],
                                    cpu_header=_HEADER, cpu_src=_FWD_SRC % {"chunk": HEAD_CHUNK})
        mx = cm.max(1, keepdims=True)                                    # M
        shift = (cm - mx).exp()                                          # exp(m_c − M)
        s = (cs * shift).sum(1, keepdims=True)                           # S
        # Underscore attribute: no jt.Var may become a public attribute (JITTOR_NOTES A1).
        self._saved = (h, weight, target, e, shift / s, weight.is_stop_grad())
        return (s.log() + mx - picked.reshape(-1, 1)).mean()

    def grad(self, g):
        h, weight, target, e, f, weight_frozen = self._saved
        self._saved = None
        c = (g / h.shape[0]).float32().reshape((1,))
        ins = [e, weight, f * c, target, c]
        if weight_frozen:
            dh = jt.code(h.shape, "float32", ins, cpu_header=_HEADER,
                         cpu_src=_BWD_SRC % {"chunk": HEAD_CHUNK, "dw": ""})
            return dh, None, None
        dh, dw = jt.code([h.shape, weight.shape], ["float32"] * 2, ins + [h], cpu_header=_HEADER,
                         cpu_src=_BWD_SRC % {"chunk": HEAD_CHUNK, "dw": _DW_SRC})
        return dh, dw, None


class _HeadCrossEntropy(jt.Function):
    """Jittor ops on whole [rows, V] tensors: CUDA, non-fp32 dtypes, or MOA_FUSED_HEAD=0."""

    def execute(self, h, weight, target):
        logits = nn.matmul_transpose(h, weight)          # [m, V]
        if logits.dtype != "float32":
            logits = logits.float32()
        z = logits.detach()
        mx = z.max(1, keepdims=True)
        e = (z - mx).exp()
        s = e.sum(1, keepdims=True)
        picked = logits.gather(1, target.reshape(-1, 1))                       # [m, 1]
        # Underscore attribute: no jt.Var may become a public attribute (JITTOR_NOTES A1).
        self._saved = (h, weight, target, e, s, weight.is_stop_grad())
        return (s.log() + mx - picked).mean()

    def grad(self, g):
        h, weight, target, e, s, weight_frozen = self._saved
        self._saved = None
        c = g / h.shape[0]
        w = weight.cast(h.dtype)
        dh = nn.matmul(e.cast(h.dtype), w) * (c / s).cast(h.dtype) - w[target] * c.cast(h.dtype)
        dw = None
        if not weight_frozen:
            m, V = e.shape
            onehot = (jt.index((m, V), dim=1) == target.reshape(-1, 1)).float32()
            G = (e * (c / s) - onehot * c).cast(h.dtype)
            dw = nn.matmul(G.transpose(1, 0), h)                               # [V, d]
        return dh.cast(h.dtype), dw, None


def head_cross_entropy(h, weight, target):
    """mean_i [logsumexp_v (h_i·W_v) − h_i·W_{target_i}] for h [m, d], weight [V, d], int target [m] (all ≥ 0).

    Same value and gradients as the textbook composition; the target's gradient is None.
    """
    target = target.stop_grad()
    if _fused_available(h, weight):
        return _HeadCrossEntropyCPU.apply(h, weight, target.int32())
    return _HeadCrossEntropy.apply(h, weight, target)
