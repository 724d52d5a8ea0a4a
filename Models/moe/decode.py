"""Decode-time fast path of the MoE core: a handful of token rows through top-k selection and their experts in one
CPU kernel call, reading only the selected experts' weight rows.

Why: while generating, an MoE layer sees one row per sequence. The generic path (select() → sort-once dispatch →
grouped experts → gather back) is a dozen small Jittor ops whose fixed cost, ~0.5–2 ms per layer here, is larger
than the expert work itself at small and medium widths, so a k/E = 25 % MoEfied FFN came out slower than the dense
one it was cut from (bench/moefy_ffn.py). Under no_grad in eval mode, with at most FEW_ROWS_MAX rows, no capacity
limit, fp32 on the CPU and a width up to WIDE_DIM (or a single row), `MoEFeedForward` calls `few_rows_moe` instead,
which does in one pass:

1. per row, the k experts of largest score — probabilities for scoring "softmax_topk", logits otherwise — ties to
   the lower index, and their weights exactly as `selection.select` forms them (softmax over all experts, optionally
   renormalised; softmax over the k kept logits; or 1), × score_scale;
2. per selected expert, in 32-row weight blocks spread over the threads: act(x·w1ᵀ)(·x·w3ᵀ) × weight for the rows
   that chose it (the decode-time few-rows dot products of Models/kernels.py: each weight row is read once for all
   of them);
3. the down projection y[t] += h[t, j]·w2[j] over the selected experts' rows only, in up to 8 contiguous shares of
   those rows (each w2 row streamed whole, once), each share into its own partial sum, added in a fixed order: the
   result does not depend on the thread count. (Splitting by column ranges instead read every row in pieces and ran
   1.5x slower at batch 8 on the AMD EPYC VM: 2.6 against 1.7 ms per layer.)

So the work and the bytes read are those of the selected experts (the union over the rows). Everything else falls
back to the generic path; MOA_FEW_ROWS_KERNEL=0 switches this off with the other few-rows kernels. Tests compare the
two paths (tests/test_moefication.py).
"""
import functools

from Models.kernel_config import enabled, note_used
from Models.kernels import _ROWS_HEADER, FEW_ROWS_MAX
from Models.moe.experts import _header as _act_header
from Utils.runtime import import_jittor

jt = import_jittor()

_SRC = r"""
    // in0 x [M, D], in1 z [M, E] router scores, in2 w1 [S, D], in3 w2 [S, D], (in4 w3), last: wo [E+1] int32
    const int64_t M = in0_shape0, D = in0_shape1, E = in1_shape1, K = %(k)d, NB = 32;
    const float *x = in0_p, *z = in1_p, *w1 = in2_p, *w2 = in3_p;
    %(w3_decl)s
    const int32_t* wo = %(wo)s_p;
    float* y = out0_p;
    std::vector<int64_t> idx(M * K);
    std::vector<float> wt(M * K), sc(E);
    for (int64_t m = 0; m < M; m++) {
        const float* zm = z + m * E;
        float mx = zm[0];
        for (int64_t e = 1; e < E; e++) mx = zm[e] > mx ? zm[e] : mx;
        float sum = 0.f;
        if (%(by_prob)d) {   // softmax over all experts, as softmax32
            for (int64_t e = 0; e < E; e++) { sc[e] = expf(zm[e] - mx); sum += sc[e]; }
            for (int64_t e = 0; e < E; e++) sc[e] = sc[e] / sum;
        } else {
            for (int64_t e = 0; e < E; e++) sc[e] = zm[e];
        }
        for (int64_t j = 0; j < K; j++) {   // k passes of "largest, lowest index among equals"
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                bool taken = false;
                for (int64_t i = 0; i < j; i++) taken |= idx[m * K + i] == e;
                if (!taken && (best < 0 || sc[e] > sc[best])) best = e;
            }
            idx[m * K + j] = best;
        }
        float* wm = wt.data() + m * K;
        if (%(mode)d == 0) {          // softmax_topk
            float s = 0.f;
            for (int64_t j = 0; j < K; j++) { wm[j] = sc[idx[m * K + j]]; s += wm[j]; }
            if (%(renorm)d) for (int64_t j = 0; j < K; j++) wm[j] = wm[j] / (s > 1e-30f ? s : 1e-30f);
        } else if (%(mode)d == 1) {   // topk_softmax: softmax over the kept logits
            const float top = zm[idx[m * K]];
            float s = 0.f;
            for (int64_t j = 0; j < K; j++) { wm[j] = expf(zm[idx[m * K + j]] - top); s += wm[j]; }
            for (int64_t j = 0; j < K; j++) wm[j] = wm[j] / s;
        } else {                      // topk_unweighted
            for (int64_t j = 0; j < K; j++) wm[j] = 1.f;
        }
        for (int64_t j = 0; j < K; j++) wm[j] *= %(scale)s;
    }
    // assignments grouped by expert (CSR), x rows gathered once per assignment
    std::vector<int64_t> cnt(E + 1, 0), tok(M * K);
    std::vector<float> aw(M * K);
    for (int64_t a = 0; a < M * K; a++) cnt[idx[a] + 1]++;
    for (int64_t e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    std::vector<int64_t> fill(cnt.begin(), cnt.end() - 1);
    for (int64_t a = 0; a < M * K; a++) { const int64_t p = fill[idx[a]]++; tok[p] = a / K; aw[p] = wt[a]; }
    int64_t fmax = 1;
    for (int64_t e = 0; e < E; e++) fmax = wo[e + 1] - wo[e] > fmax ? wo[e + 1] - wo[e] : fmax;
    std::vector<float> xs(M * K * D), hb(M * K * fmax);
    for (int64_t a = 0; a < M * K; a++) memcpy(xs.data() + a * D, x + tok[a] * D, sizeof(float) * D);
    std::vector<int64_t> blocks;   // (expert, first weight row) of every 32-row block of a selected expert
    for (int64_t e = 0; e < E; e++)
        if (cnt[e + 1] > cnt[e])
            for (int64_t n0 = wo[e]; n0 < wo[e + 1]; n0 += NB) { blocks.push_back(e); blocks.push_back(n0); }
    const int64_t nblk = (int64_t)blocks.size() / 2;
    #pragma omp parallel for schedule(dynamic)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t e = blocks[2 * b], n0 = blocks[2 * b + 1], f0 = wo[e];
        const int64_t n1 = n0 + NB < wo[e + 1] ? n0 + NB : wo[e + 1], a0 = cnt[e], ne = cnt[e + 1] - a0;
        float g[64 * 32], u[64 * 32];
        moe_rows(xs.data() + a0 * D, ne, D, w1, n0, n1, g, NB);
        %(up)s
        for (int64_t m = 0; m < ne; m++)
            for (int64_t j = 0; j < n1 - n0; j++)
                hb[(a0 + m) * fmax + (n0 - f0) + j] = %(h)s * aw[a0 + m];
    }
    // the down projection split by weight rows: NCH contiguous shares of the selected experts' w2 rows (whole rows,
    // each read once), each into its own [M, D] partial sum, then the partials added in a fixed order (NCH depends
    // on the shapes only, so the result does not depend on the thread count)
    std::vector<int64_t> sel, srow(1, 0);   // selected experts and the prefix of their row counts
    for (int64_t e = 0; e < E; e++)
        if (cnt[e + 1] > cnt[e]) { sel.push_back(e); srow.push_back(srow.back() + wo[e + 1] - wo[e]); }
    const int64_t R = srow.back(), NCH = R >= 2048 ? 8 : (R >= 256 ? R / 256 : 1);
    std::vector<float> part(NCH * M * D, 0.f);
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < NCH; c++) {
        float* __restrict__ yp = part.data() + c * M * D;
        int64_t s = 0;
        for (int64_t r = R * c / NCH; r < R * (c + 1) / NCH; r++) {
            while (r >= srow[s + 1]) s++;
            const int64_t e = sel[s], j = r - srow[s];
            const float* __restrict__ wr = w2 + (wo[e] + j) * D;
            for (int64_t a = cnt[e]; a < cnt[e + 1]; a++) {
                float* __restrict__ yr = yp + tok[a] * D;
                const float hv = hb[a * fmax + j];
                #pragma GCC ivdep
                for (int64_t i = 0; i < D; i++) yr[i] += hv * wr[i];
            }
        }
    }
    #pragma omp parallel for schedule(static) if(M * D > 32768)
    for (int64_t i = 0; i < M * D; i++) {
        float acc = part[i];
        for (int64_t c = 1; c < NCH; c++) acc += part[c * M * D + i];
        y[i] = acc;
    }
"""

# Rows of one expert against a block of its weight rows with one pass over each weight row for up to 8 rows at a
# time (moa_dot_rows<MB> keeps MB partial sums in registers); Models/kernels.py's moa_rows_block only has 8/4/1.
_ROWS_ANY = r"""
static inline void moe_rows(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, float* out,
                            int64_t ldo) {
    for (int64_t m = 0; m < M; m += 8) {
        const int64_t mb = M - m < 8 ? M - m : 8;
        for (int64_t n = n0; n < n1; n++) {
            const float* xm = x + m * K; const float* wn = w + n * K; float* o = out + m * ldo + (n - n0);
            switch (mb) {
                case 1: moa_dot_rows<1>(xm, wn, K, o, ldo); break;
                case 2: moa_dot_rows<2>(xm, wn, K, o, ldo); break;
                case 3: moa_dot_rows<3>(xm, wn, K, o, ldo); break;
                case 4: moa_dot_rows<4>(xm, wn, K, o, ldo); break;
                case 5: moa_dot_rows<5>(xm, wn, K, o, ldo); break;
                case 6: moa_dot_rows<6>(xm, wn, K, o, ldo); break;
                case 7: moa_dot_rows<7>(xm, wn, K, o, ldo); break;
                default: moa_dot_rows<8>(xm, wn, K, o, ldo);
            }
        }
    }
}
"""
_MODES = {"softmax_topk": 0, "topk_softmax": 1, "topk_unweighted": 2}
# Above this width the generic path (oneDNN GEMMs per expert) wins from 2 rows on: a token row no longer fits in L1
# beside the weight stream (bench/moefy_ffn.py on the AMD EPYC VM, quiet, top-4 of 16, batch 2/4/8: d 4096 kernel
# 7.2/13.8/23.2 ms against generic 5.6/10.4/16.5; d 2048 1.2/3.0/4.7 against 1.5/3.1/4.9; d 1024 and 512 the kernel
# 1.5-2x faster).
WIDE_DIM = 2048


@functools.lru_cache(maxsize=None)
def _source(k, scoring, renorm, scale, gated):
    return _SRC % dict(
        k=k, by_prob=int(scoring == "softmax_topk"), mode=_MODES[scoring], renorm=int(bool(renorm)),
        scale="%.9ef" % scale, wo="in5" if gated else "in4",
        w3_decl="const float* w3 = in4_p;" if gated else "",
        up="moe_rows(xs.data() + a0 * D, ne, D, w3, n0, n1, u, NB);" if gated else "(void)u;",
        h="moe_act(g[m * NB + j]) * u[m * NB + j]" if gated else "moe_act(g[m * NB + j])")


def few_rows_moe_applies(layer, x2d):
    """True when `few_rows_moe` may replace the generic path for this layer call (see the module notes)."""
    ex = layer.experts
    return (jt.flags.no_grad and not layer.is_training() and not jt.flags.use_cuda
            and enabled("few_rows") and jt.flags.cc_type in ("g++", "clang") and x2d.shape[0] <= FEW_ROWS_MAX
            and (x2d.shape[1] <= WIDE_DIM or x2d.shape[0] == 1)
            and layer.cfg.scoring in _MODES and layer.cfg.capacity(1, layer.n_experts) == 0
            and x2d.dtype == "float32" and all(w.dtype == "float32" for w in ex._weights())
            and layer.cfg.top_k <= layer.n_experts)


def few_rows_moe(x2d, scores, experts, cfg):
    """y [M, d] = Σ over each row's top-k experts of weight · expert(x) (the generic path's result), in one call."""
    note_used("few_rows")
    if experts._offsets_var is None:
        experts._offsets_var = jt.array(experts._offsets).stop_grad()
    ins = [x2d, scores.float32(), experts.w1, experts.w2] + ([experts.w3] if experts.gated else [])
    src = _source(cfg.top_k, cfg.scoring, cfg.norm_topk_prob, cfg.score_scale, experts.gated)
    header = _act_header(experts.act) + _ROWS_HEADER + _ROWS_ANY + "#include <cstring>\n#include <omp.h>\n"
    return jt.code(x2d.shape, "float32", ins + [experts._offsets_var], cpu_header=header, cpu_src=src)
