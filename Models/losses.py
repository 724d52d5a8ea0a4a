"""The output projection and cross-entropy fused into one differentiable op (the training loss of docs/moa.md §5.3).

With a 128k vocabulary the projection h·Wᵀ is most of a small model's training FLOPs, and the [rows, V] logits are
its largest tensors. Left to autograd, `logits - max`, `exp`, the softmax sum and their gradients each materialise
another [rows, V] fp32 buffer and make another pass over memory. On CPU (fp32), `head_cross_entropy` goes through
the vocabulary in chunks of HEAD_CHUNK columns: oneDNN's sgemm writes a chunk of logits z into a cache-sized buffer
and one multi-threaded pass with a vectorised exp turns it into E = exp(z − M), where M is the row maximum so far
(the online-softmax recurrence: when a chunk raises M, the row's sums are rescaled by exp(M_old − M_new)), adding
up S = ΣE. The loss is log S + M − z_target.

Frozen head (fine-tuning): the GEMM of the backward runs in the same pass, on each chunk of E while it is still in
cache, accumulating P = Σ_v E_v·W_v; then dL/dh = c·(P/S − W[target]) with c = dL/dloss / rows. Nothing of size
[rows, V] is kept or written to memory. Trainable head (pretraining): E is kept chunk-major with each chunk's own
(m_c, s_c), and the backward builds G = softmax − one-hot a chunk at a time and accumulates dL/dh = Σ_c G_c·W_c and
dL/dW_c = G_cᵀ·h.

Elsewhere (CUDA, other dtypes, MOA_FUSED_HEAD=0) the same formulas run as Jittor ops on whole [rows, V] tensors.
"""
from Models.kernel_config import enabled, note_used
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
        dnnl_sgemm('T', 'N', w, d, m, 1.f, buf, w, in5_p, d, 0.f, out1_p + c0 * d, d);
    }
    ::free(buf);
"""
_ONE_PASS_SRC = r"""
    // Frozen head: in0 h [m, d], in1 W [V, d], in2 target [m] → out0 M [m] (row max), out1 S [m] = Σ exp(z − M),
    // out2 z_target [m] (, out3 P [m, d] = Σ_v exp(z_v − M)·W_v: the softmax-weighted rows of W, unnormalised).
    // M grows chunk by chunk; when it does, S and P of that row are rescaled (the online-softmax recurrence).
    const int64_t m = in0_shape0, d = in0_shape1, V = in1_shape0, VC = %(chunk)d;
    float* buf = (float*)::aligned_alloc(64, (size_t)(m * VC * sizeof(float) + 63) / 64 * 64);
    for (int64_t c0 = 0; c0 < V; c0 += VC) {
        const int64_t w = V - c0 < VC ? V - c0 : VC;
        dnnl_sgemm('N', 'T', m, w, d, 1.f, in0_p, d, in1_p + c0 * d, d, 0.f, buf, w);
        #pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            float* z = buf + r * w;
            const int64_t t = (int64_t)in2_p[r] - c0;
            if (t >= 0 && t < w) out2_p[r] = z[t];
            const float mx = moa_max(z, w);
            if (c0 == 0) {
                out0_p[r] = mx;
                out1_p[r] = 0.f;
            } else if (mx > out0_p[r]) {
                const float sc = expf(out0_p[r] - mx);
                out1_p[r] *= sc;
                %(rescale)s
                out0_p[r] = mx;
            }
            out1_p[r] += moa_exp_sum_inplace(z, w, out0_p[r]);
        }
        %(accumulate)s
    }
    ::free(buf);
"""
_ONE_PASS_DH = {
    "rescale": "for (int64_t j = 0; j < d; j++) out3_p[r * d + j] *= sc;",
    "accumulate": "dnnl_sgemm('N', 'N', m, d, w, 1.f, buf, w, in1_p + c0 * d, d, c0 == 0 ? 0.f : 1.f, out3_p, d);",
}
_ONE_PASS_NO_DH = {"rescale": "", "accumulate": ""}
_HEADER = VEC_EXP_HEADER + DNNL_SGEMM_DECL + "#include <cstdlib>\n"


def _fused_available(h, weight):
    return (h.dtype == "float32" and weight.dtype == "float32" and not jt.flags.use_cuda
            and jt.flags.cc_type in ("g++", "clang") and enabled("fused_head") and dnnl_available())


class _HeadCrossEntropyCPU(jt.Function):
    """The chunked CPU kernels (see the module notes)."""

    def execute(self, h, weight, target):
        m, V = h.shape[0], weight.shape[0]
        if weight.is_stop_grad():
            return self._frozen_head(h, weight, target)
        nc = -(-V // HEAD_CHUNK)
        e, cm, cs, picked = jt.code([(m * V,), (m, nc), (m, nc), (m,)], ["float32"] * 4, [h, weight, target],
                                    cpu_header=_HEADER, cpu_src=_FWD_SRC % {"chunk": HEAD_CHUNK})
        mx = cm.max(1, keepdims=True)                                    # M
        shift = (cm - mx).exp()                                          # exp(m_c − M)
        s = (cs * shift).sum(1, keepdims=True)                           # S
        # Underscore attribute: no jt.Var may become a public attribute (docs/jittor_notes.md A1).
        self._saved = ("trainable", h, weight, target, e, shift / s)
        return (s.log() + mx - picked.reshape(-1, 1)).mean()

    def _frozen_head(self, h, weight, target):
        # One pass, nothing [rows, V] kept: the GEMM for dL/dh runs here on each chunk of E while it is in cache.
        m, d = h.shape
        want_dh = not jt.flags.no_grad
        parts = dict(_ONE_PASS_DH if want_dh else _ONE_PASS_NO_DH, chunk=HEAD_CHUNK)
        shapes = [(m,), (m,), (m,)] + ([(m, d)] if want_dh else [])
        outs = jt.code(shapes, ["float32"] * len(shapes), [h, weight, target], cpu_header=_HEADER,
                       cpu_src=_ONE_PASS_SRC % parts)
        mx, s, picked = outs[:3]
        # Underscore attribute: no jt.Var may become a public attribute (docs/jittor_notes.md A1).
        self._saved = ("frozen", weight, target, outs[3] if want_dh else None, s)
        return (s.log() + mx - picked).mean()

    def grad(self, g):
        if self._saved[0] == "frozen":          # dL/dh = c·(P/S − W[target])
            _, weight, target, p, s = self._saved
            self._saved = None
            c = (g / p.shape[0]).float32()
            return (p / s.reshape(-1, 1) - weight[target]) * c, None, None
        _, h, weight, target, e, f = self._saved
        self._saved = None
        c = (g / h.shape[0]).float32().reshape((1,))
        ins = [e, weight, f * c, target, c]
        dh, dw = jt.code([h.shape, weight.shape], ["float32"] * 2, ins + [h], cpu_header=_HEADER,
                         cpu_src=_BWD_SRC % {"chunk": HEAD_CHUNK})
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
        # Underscore attribute: no jt.Var may become a public attribute (docs/jittor_notes.md A1).
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
        note_used("fused_head")
        return _HeadCrossEntropyCPU.apply(h, weight, target.int32())
    return _HeadCrossEntropy.apply(h, weight, target)
