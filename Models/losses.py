"""The output projection and cross-entropy fused into one differentiable op (the training loss of SPEC §5.3).

With a 128k vocabulary the projection h·Wᵀ is most of a small model's training FLOPs, and the [rows, V] logits are
its largest tensors. Left to autograd, `logits - max`, `exp`, the softmax sum and their gradients each materialise
another [rows, V] fp32 buffer and make another pass over memory (single-threaded on CPU). `head_cross_entropy`
makes one pass over the logits in the forward — row max, E = exp(z − max) and its row sum s, in a multi-threaded
kernel on CPU — and keeps only E and s. The backward needs no [rows, V] pass at all: with c = dL/dloss / rows,

    dL/dh = (E·W) · c/s − c·W[target]         (softmax − one-hot, times W, with the row scaling after the GEMM)
    dL/dW = (E·c/s − c·onehot)ᵀ·h             only when W is trainable (the base is frozen in fine-tuning).
"""
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn

_STATS_SRC = r"""
    const int64_t rows = in0_shape0, V = in0_shape1;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float* z = in0_p + r * V;
        float* e = out0_p + r * V;
        float mx = z[0];
        for (int64_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < V; j++) { const float v = expf(z[j] - mx); e[j] = v; s += v; }
        out1_p[r] = mx;
        out2_p[r] = s;
    }
"""


def softmax_stats(logits):
    """fp32 [m, V] → (E = exp(z − rowmax) [m, V], rowmax [m, 1], s = ΣE [m, 1]); not differentiable."""
    if jt.flags.use_cuda:
        mx = logits.max(1, keepdims=True)
        e = (logits - mx).exp()
        return e, mx, e.sum(1, keepdims=True)
    m = logits.shape[0]
    return jt.code([logits.shape, (m, 1), (m, 1)], ["float32"] * 3, [logits],
                   cpu_header="#include <cmath>\n#include <cstdint>", cpu_src=_STATS_SRC)


class _HeadCrossEntropy(jt.Function):
    def execute(self, h, weight, target):
        logits = nn.matmul_transpose(h, weight)          # [m, V]: the 2-D oneDNN path on CPU
        if logits.dtype != "float32":
            logits = logits.float32()
        e, mx, s = softmax_stats(logits.detach())
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
    return _HeadCrossEntropy.apply(h, weight, target.stop_grad())
