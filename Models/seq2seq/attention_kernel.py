"""The encoder–decoder's attention core fused on the CPU: softmax(scale·Q·Kᵀ + bias)·V and its gradients, one
multi-threaded kernel each way (fp32).

Why: unfused, a training step ran two batched GEMMs, the biased softmax and four head transposes per attention as
separate passes over [B·H, T, S] and [B, T, H, hd] buffers (about 30 ms of the seq2seq bench's 390 ms step). Here
each (batch, head) pair is one task on one thread: its scores are written, turned into probabilities and
multiplied by V in the same [T, S] block while it is in cache, and Q, K, V and the output are read and written in
the projections' [B, T, H·hd] layout (a head is a column block, so the GEMMs take a row stride of H·hd and no
transpose is materialised). The probabilities are kept for the backward, as the unfused path keeps them.

Backward per (b, h): dP = dO·Vᵀ, dZ = P ⊙ (dP − rowsum(dP ⊙ P)) (the gradient of the biased logits),
dV = Pᵀ·dO, dQ = scale·dZ·K, dK = scale·dZᵀ·Q. The bias's gradient is dZ summed over the axes it was broadcast
along (a Jittor reduction, only when the bias is trainable: T5's relative positions). The bias is any
[Bb, Hb, Tb, S] with each of Bb, Hb, Tb either 1 or B, H, T, read by index arithmetic. With at least as many (b, h)
pairs as threads, each runs on one thread with single-threaded GEMMs, so the result does not depend on the
thread count.

Used by `Attention` for the whole-sequence forward (no KV cache) in fp32 on the CPU with oneDNN, when no dropout
applies to the probabilities, unless MOA_FUSED_ATTENTION=0; otherwise the unfused path runs.
"""
import numpy as np

from Models.kernel_config import enabled, note_used
from Models.kernels import DNNL_SGEMM_DECL, VEC_EXP_HEADER, dnnl_available
from Models.seq2seq.softmax import bias_gradient
from Utils.runtime import import_jittor

jt = import_jittor()

_HEADER = VEC_EXP_HEADER + DNNL_SGEMM_DECL + "#include <omp.h>\n#include <vector>\n"

# in0 q [B, T, H·hd], in1 k [B, S, H·hd], in2 v [B, S, H·hd], in3 bias [Bb, Hb, Tb, S], in4 meta [2] = {H, scale}
# → out0 o [B, T, H·hd], out1 p [B·H, T, S]
_FWD = r"""
    const int64_t B = in0_shape0, T = in0_shape1, D = in0_shape2, S = in1_shape1;
    const int64_t H = (int64_t)in4_p[0], hd = D / H;
    const float scale = in4_p[1];
    const int64_t Bb = in3_shape0, Hb = in3_shape1, Tb = in3_shape2;
    const int NT = omp_get_max_threads();
    #pragma omp parallel for schedule(static) num_threads(B * H >= NT ? NT : 1)
    for (int64_t n = 0; n < B * H; n++) {
        const int64_t b = n / H, h = n % H;
        float* p = out1_p + n * T * S;
        dnnl_sgemm('N', 'T', T, S, hd, scale, in0_p + b * T * D + h * hd, D, in1_p + b * S * D + h * hd, D,
                   0.f, p, S);
        for (int64_t t = 0; t < T; t++) {
            const float* bias = in3_p + (((Bb == 1 ? 0 : b) * Hb + (Hb == 1 ? 0 : h)) * Tb + (Tb == 1 ? 0 : t)) * S;
            float* row = p + t * S;
            for (int64_t s = 0; s < S; s++) row[s] += bias[s];
            const float inv = 1.f / moa_exp_sum_inplace(row, S, moa_max(row, S));   // the sum is >= 1
            for (int64_t s = 0; s < S; s++) row[s] *= inv;
        }
        dnnl_sgemm('N', 'N', T, hd, S, 1.f, p, S, in2_p + b * S * D + h * hd, D, 0.f, out0_p + b * T * D + h * hd, D);
    }
"""

# in0 q, in1 k, in2 v, in3 p [B·H, T, S], in4 do [B, T, H·hd], in5 meta
# → out0 dq, out1 dk, out2 dv (the shapes of q, k, v), out3 dz [B·H, T, S]
_BWD = r"""
    const int64_t B = in0_shape0, T = in0_shape1, D = in0_shape2, S = in1_shape1;
    const int64_t H = (int64_t)in5_p[0], hd = D / H;
    const float scale = in5_p[1];
    const int NT = omp_get_max_threads();
    #pragma omp parallel for schedule(static) num_threads(B * H >= NT ? NT : 1)
    for (int64_t n = 0; n < B * H; n++) {
        const int64_t b = n / H, h = n % H;
        const float* p = in3_p + n * T * S;
        const float* dout = in4_p + b * T * D + h * hd;
        float* dz = out3_p + n * T * S;
        dnnl_sgemm('N', 'T', T, S, hd, 1.f, dout, D, in2_p + b * S * D + h * hd, D, 0.f, dz, S);   // dP
        for (int64_t t = 0; t < T; t++) {
            const float* pr = p + t * S;
            float* dr = dz + t * S;
            float dot = 0.f;
            for (int64_t s = 0; s < S; s++) dot += pr[s] * dr[s];
            for (int64_t s = 0; s < S; s++) dr[s] = pr[s] * (dr[s] - dot);
        }
        dnnl_sgemm('T', 'N', S, hd, T, 1.f, p, S, dout, D, 0.f, out2_p + b * S * D + h * hd, D);            // dV
        dnnl_sgemm('N', 'N', T, hd, S, scale, dz, S, in1_p + b * S * D + h * hd, D, 0.f,
                   out0_p + b * T * D + h * hd, D);                                                         // dQ
        dnnl_sgemm('T', 'N', S, hd, T, scale, dz, S, in0_p + b * T * D + h * hd, D, 0.f,
                   out1_p + b * S * D + h * hd, D);                                                         // dK
    }
"""


class _FusedAttention(jt.Function):
    def execute(self, q, k, v, bias, meta, H, bias_needs_grad):
        B, T, D = q.shape
        S = k.shape[1]
        o, p = jt.code([(B, T, D), (B * H, T, S)], ["float32"] * 2, [q, k, v, bias, meta], cpu_header=_HEADER,
                       cpu_src=_FWD)
        # underscore: no public jt.Var attributes (docs/jittor_notes.md A1)
        self._saved = (q, k, v, p, meta, tuple(bias.shape), H, bias_needs_grad)
        return o

    def grad(self, g):
        q, k, v, p, meta, bshape, H, bias_needs_grad = self._saved
        self._saved = None
        dq, dk, dv, dz = jt.code([q.shape, k.shape, v.shape, p.shape], ["float32"] * 4,
                                 [q, k, v, p, g.float32(), meta], cpu_header=_HEADER, cpu_src=_BWD)
        return dq, dk, dv, bias_gradient(dz, bshape, H) if bias_needs_grad else None, None, None, None


def fused_attention_available(q, bias):
    return (q.dtype == "float32" and not jt.flags.use_cuda and jt.flags.cc_type in ("g++", "clang")
            and bias is not None and len(bias.shape) == 4 and enabled("fused_attention") and dnnl_available())


def fused_attention(q, k, v, bias, n_heads, scale=1.0):
    """softmax(scale·q_h·k_hᵀ + bias)·v_h for every head h, for fp32 q [B, T, H·hd], k and v [B, S, H·hd] (the
    projections' layout) and a bias [Bb, Hb, Tb, S] broadcastable to [B, H, T, S] → [B, T, H·hd]; differentiable
    in q, k, v and the bias."""
    note_used("fused_attention")
    meta = jt.array(np.array([n_heads, scale], np.float32)).stop_grad()
    bias = bias.float32()
    return _FusedAttention.apply(q.float32(), k.float32(), v.float32(), bias, meta, int(n_heads),
                                 not bias.is_stop_grad())
