"""Attention softmax with an additive bias, fused: softmax(scale·scores + bias) over the last axis and its gradient,
one multi-threaded CPU pass each way (fp32).

Why: the encoder–decoder's bias (padding masks, causal mask, T5 relative positions) rules out the project's
causal-only kernel (Models/kernels.causal_softmax), and Jittor's element-wise softmax with the broadcast bias and
its gradient ran single-threaded: ~120 ms of a 570 ms training step at bench/seq2seq.py's small shape (profiled
with jt.profiler). scores [B·H, T, S]; bias [Bb, Hb, Tb, S] with each of Bb, Hb, Tb either 1 or B, H, T
(broadcast by index arithmetic, never materialised). The gradient of the bias is the scores' gradient summed
over its broadcast axes (a Jittor reduction; none when the bias is a constant mask). Elsewhere (CUDA, other
dtypes, MOA_FUSED_SOFTMAX=0) `Attention` uses Jittor's ops.
"""
import numpy as np

from Models.kernel_config import enabled, note_used
from Models.kernels import VEC_EXP_HEADER
from Utils.runtime import import_jittor

jt = import_jittor()

_FWD = r"""
    // in0 scores [N, T, S], in1 bias [Bb, Hb, Tb, S], in2 meta [2] = {H, scale}
    const int64_t N = in0_shape0, T = in0_shape1, S = in0_shape2;
    const int64_t Bb = in1_shape0, Hb = in1_shape1, Tb = in1_shape2;
    const int64_t H = (int64_t)in2_p[0];
    const float scale = in2_p[1];
    #pragma omp parallel for schedule(static) if(N * T * S > 32768)
    for (int64_t i = 0; i < N * T; i++) {
        const int64_t n = i / T, t = i % T, b = n / H, h = n % H;
        const float* bias = in1_p + (((Bb == 1 ? 0 : b) * Hb + (Hb == 1 ? 0 : h)) * Tb + (Tb == 1 ? 0 : t)) * S;
        const float* x = in0_p + i * S;
        float* p = out0_p + i * S;
        for (int64_t s = 0; s < S; s++) p[s] = x[s] * scale + bias[s];
        const float sum = moa_exp_sum_inplace(p, S, moa_max(p, S));   // vectorised exp (Models/kernels.py)
        const float inv = 1.f / sum;   // sum >= 1: the maximum contributes exp(0)
        for (int64_t s = 0; s < S; s++) p[s] *= inv;
    }
"""
_BWD = r"""
    // in0 p [N, T, S], in1 g → out0 dz = p·(g − Σ p·g) (the gradient of the biased logits)
    const int64_t rows = in0_shape0 * in0_shape1, S = in0_shape2;
    #pragma omp parallel for schedule(static) if(rows * S > 32768)
    for (int64_t i = 0; i < rows; i++) {
        const float* p = in0_p + i * S;
        const float* g = in1_p + i * S;
        float* dz = out0_p + i * S;
        float dot = 0.f;
        for (int64_t s = 0; s < S; s++) dot += p[s] * g[s];
        for (int64_t s = 0; s < S; s++) dz[s] = p[s] * (g[s] - dot);
    }
"""
_HEADER = VEC_EXP_HEADER


class _BiasedSoftmax(jt.Function):
    def execute(self, scores, bias, meta, H, scale, bias_needs_grad):
        p = jt.code(scores.shape, "float32", [scores, bias, meta], cpu_header=_HEADER, cpu_src=_FWD)
        self._saved = (p, tuple(bias.shape), H, scale, bias_needs_grad)   # underscore: not a parameter
        return p

    def grad(self, g):
        p, bshape, H, scale, bias_needs_grad = self._saved
        self._saved = None
        dz = jt.code(p.shape, "float32", [p, g.float32()], cpu_header=_HEADER, cpu_src=_BWD)
        d_scores = dz * scale if scale != 1.0 else dz
        return d_scores, bias_gradient(dz, bshape, H) if bias_needs_grad else None, None, None, None, None


def bias_gradient(dz, bshape, H):
    """The gradient of a bias [Bb, Hb, Tb, S] broadcast to [B, H, T, S]: dz [B·H, T, S] (the gradient of the biased
    logits) summed over the axes the bias was broadcast along."""
    N, T, S = dz.shape
    full = dz.reshape(N // H, H, T, S)
    axes = [a for a, n in enumerate(bshape[:3]) if n == 1 and full.shape[a] != 1]
    return full.sum(axes, keepdims=True) if axes else full


def biased_softmax_available(scores):
    return scores.dtype == "float32" and not jt.flags.use_cuda and enabled("fused_softmax")


def biased_softmax(scores, bias, n_heads, scale=1.0):
    """softmax(scale·scores + bias, −1) for fp32 scores [B·H, T, S] and a bias broadcastable to [B, H, T, S]
    given as 4-D [Bb, Hb, Tb, S]; differentiable in both."""
    note_used("fused_softmax")
    meta = jt.array(np.array([n_heads, scale], np.float32)).stop_grad()
    bias = bias.float32()
    return _BiasedSoftmax.apply(scores, bias, meta, int(n_heads), float(scale), not bias.is_stop_grad())
