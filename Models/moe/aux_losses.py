"""Auxiliary losses of the MoE core, each a function of the Selections of all MoE layers of one forward.

Every loss excludes padding through the Selections' token_mask and returns an unweighted fp32 scalar; the model
multiplies by the coefficients of `MoEConfig.aux_weights()`. Closed forms (tests/test_moe_core.py checks them):

* switch "mixtral" — HF transformers `load_balancing_loss_func` of Mixtral / Qwen2-MoE (layers concatenated):
  E·Σ_e f_e·P̄_e with f_e = (#choices of e)/(#tokens) summed over the k choices; k at balance, E at collapse.
* switch "switch_t5" — HF SwitchTransformers: per group (batch row, layers concatenated along the sequence)
  f_ge = share of tokens routed to e, P̄_ge = mean probability; E²·mean_{g,e} f_ge·P̄_ge; 1 at balance for k = 1.
* switch "normalized" — the mixtral form divided by k (ModuleFormer's normalisation): 1 at balance for any k.
* seq (minimind / DeepSeek): per group c_ge = count_ge·E/(L_g·k); mean_g Σ_e c_ge·P̄_ge; 1 at balance.
* cv2 (Shazeer / llama-moe): CV²(importance) + CV²(load), CV² = var/mean² with torch's unbiased variance as the
  anchors use; load = counts, or the smooth normal-CDF estimate under noisy gating; 0 at balance.
* mi (ModuleFormer): −(H(P̄) − mean_t H(p_t)) ∈ [−log E, 0].
* z (ST-MoE / HF Switch): mean over tokens of logsumexp(z)².

The switch forms concatenate the layers as HF does; seq, cv2, mi and z are per layer, then reduced over layers by
`reduce` ("mean", or "sum" as minimind, ModuleFormer and llama-moe add their layers' losses). Counts use `index`,
the choices before capacity (as HF Switch); the gradient reaches the router only (through probs / weight).
"""
import math

import numpy as np

from Utils.runtime import import_jittor

jt = import_jittor()

_LOG_FLOOR = 1e-30    # probabilities are clamped to this normal float before log (fast-math denormals)
_CV_EPS = 1e-10       # the anchors' CV² denominator guard


def _onehot_counts(sel):
    """[N, E] float32: how many of token t's k choices went to expert e (0/1 for distinct choices)."""
    E, k = sel.n_experts, sel.top_k
    oh = (sel.index.reshape(-1, k, 1) == jt.arange(E).int32().reshape(1, 1, E)).float32()    # [N, k, E]
    return oh.sum(1)


def _reduce(values, reduce):
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total / len(values) if reduce == "mean" else total


def _check(sels):
    if not sels:
        raise ValueError("no Selections: the forward ran no MoE layer")
    E = sels[0].n_experts
    if any(s.n_experts != E for s in sels):
        raise ValueError("the switch loss concatenates layers: every layer needs the same expert count")
    return E


def switch_loss(sels, form="mixtral"):
    """The load-balancing loss f·P in HF's "mixtral" (also Qwen2-MoE), "switch_t5" or "normalized" form."""
    E = _check(sels)
    if form == "switch_t5":
        G = sels[0].n_groups
        f = jt.zeros((G, E), "float32")
        p = jt.zeros((G, E), "float32")
        n = jt.zeros((G, 1), "float32")
        for s in sels:
            m = s.mask_f().reshape(G, s.group_size, 1)                                  # [G, S, 1]
            routed = (_onehot_counts(s) > 0).float32().reshape(G, s.group_size, E)     # token went to e at all
            f = f + (routed * m).sum(1)
            p = p + (s.probs.reshape(G, s.group_size, E) * m).sum(1)
            n = n + m.sum(1)
        valid = (n > 0).float32()                                                       # groups with a real token
        per_group = (f / jt.maximum(n, 1.0)) * (p / jt.maximum(n, 1.0)) * valid
        return per_group.sum() / (jt.maximum(valid.sum(), 1.0) * E) * (E * E)
    if form not in ("mixtral", "normalized"):
        raise ValueError("unknown switch loss form %r" % (form,))
    counts = jt.zeros((E,), "float32")
    prob_sum = jt.zeros((E,), "float32")
    rows = jt.zeros((1,), "float32")
    for s in sels:
        m = s.mask_f().reshape(-1, 1)                                                    # [N, 1]
        counts = counts + (_onehot_counts(s) * m).sum(0)
        prob_sum = prob_sum + (s.probs * m).sum(0)
        rows = rows + m.sum()
    rows = jt.maximum(rows, 1.0)
    loss = E * ((counts / rows) * (prob_sum / rows)).sum()
    return loss / sels[0].top_k if form == "normalized" else loss


def seq_aux_loss(sels, reduce="mean"):
    """minimind's sequence-level balance loss: per group c_ge = count_ge·E/(L_g·k), mean_g Σ_e c_ge·P̄_ge."""
    E = _check(sels)
    per_layer = []
    for s in sels:
        G, S, k = s.n_groups, s.group_size, s.top_k
        m = s.mask_f().reshape(G, S, 1)
        L = m.sum(1)                                                                    # [G, 1] real tokens
        count = (_onehot_counts(s).reshape(G, S, E) * m).sum(1)                         # [G, E]
        c = count * E / (jt.maximum(L, 1.0) * k)
        pbar = (s.probs.reshape(G, S, E) * m).sum(1) / jt.maximum(L, 1.0)
        valid = (L > 0).float32()
        per_layer.append(((c * pbar).sum(1, keepdims=True) * valid).sum() / jt.maximum(valid.sum(), 1.0))
    return _reduce(per_layer, reduce)


def _cv_squared(v):
    """var/mean² of a [E] vector with the unbiased variance (torch's default, as the anchors); 0 for E = 1."""
    E = v.shape[0]
    if E == 1:
        return jt.zeros((1,), "float32").sum()
    mean = v.mean()
    var = ((v - mean) * (v - mean)).sum() / (E - 1)
    return var / (mean * mean + _CV_EPS)


def _normal_cdf(x):
    return 0.5 * (1.0 + jt.erf(x * (1.0 / math.sqrt(2.0))))


def smooth_load(sel):
    """Shazeer's differentiable load [E]: Σ_t P(expert e stays in the top-k when token t's noise is re-drawn).

    With thresholds from the noisy logits (the k-th and (k+1)-th largest), an expert inside the top-k must stay
    above the (k+1)-th, one outside must beat the k-th: Φ((clean − threshold)/noise_std).
    """
    E, k = sel.n_experts, sel.top_k
    if sel.noise_std is None or k >= E:
        return (_onehot_counts(sel) * sel.mask_f().reshape(-1, 1)).sum(0)
    from Models.moe.selection import gather_cols, topk_index
    noisy, clean, std = sel.logits, sel.clean_logits, sel.noise_std
    top = gather_cols(noisy, topk_index(noisy, k + 1))                                  # [N, k+1] descending
    thr_in = top[:, k:k + 1]                                                            # (k+1)-th largest
    thr_out = top[:, k - 1:k]                                                           # k-th largest
    is_in = noisy > thr_in
    prob = jt.ternary(is_in, _normal_cdf((clean - thr_in) / std), _normal_cdf((clean - thr_out) / std))
    return (prob * sel.mask_f().reshape(-1, 1)).sum(0)


def cv2_loss(sels, reduce="mean"):
    """CV²(importance) + CV²(load) per layer; importance_e = Σ_t weight_te (kept choices), load as smooth_load."""
    _check(sels)
    per_layer = []
    for s in sels:
        importance = (s.dense_weights() * s.mask_f().reshape(-1, 1)).sum(0)              # [E]
        per_layer.append(_cv_squared(importance) + _cv_squared(smooth_load(s)))
    return _reduce(per_layer, reduce)


def _entropy(p):
    return -(p * jt.log(jt.maximum(p, _LOG_FLOOR))).sum(-1)


def mi_loss(sels, reduce="mean"):
    """ModuleFormer's −MI(token; expert) = −(H(P̄) − mean_t H(p_t)): 0 for a uniform router, −log E when each
    token is sure and the experts are used equally."""
    _check(sels)
    per_layer = []
    for s in sels:
        m = s.mask_f()
        n = jt.maximum(m.sum(), 1.0)
        pbar = (s.probs * m.reshape(-1, 1)).sum(0) / n                                  # [E]
        h_cond = (_entropy(s.probs) * m).sum() / n
        per_layer.append(h_cond - _entropy(pbar))
    return _reduce(per_layer, reduce)


def z_loss(sels, reduce="mean"):
    """Router z-loss: mean over real tokens of logsumexp(z)² (ST-MoE; HF Switch's router_z_loss_func)."""
    _check(sels)
    per_layer = []
    for s in sels:
        z = s.logits
        mx = z.max(1, keepdims=True)
        lse = (mx + jt.log(jt.exp(z - mx).sum(1, keepdims=True))).reshape(-1)          # the sum is >= 1
        m = s.mask_f()
        per_layer.append((lse * lse * m).sum() / jt.maximum(m.sum(), 1.0))
    return _reduce(per_layer, reduce)


def aux_loss_terms(sels, cfg):
    """{"aux_switch": Var, ...}: the unweighted terms whose coefficient in cfg is > 0 ({} without Selections)."""
    if not sels:
        return {}
    makers = {
        "aux_switch": lambda: switch_loss(sels, cfg.aux_switch_form),
        "aux_seq": lambda: seq_aux_loss(sels, cfg.aux_reduce),
        "aux_cv2": lambda: cv2_loss(sels, cfg.aux_reduce),
        "aux_mi": lambda: mi_loss(sels, cfg.aux_reduce),
        "aux_z": lambda: z_loss(sels, cfg.aux_reduce),
    }
    return {name: makers[name]() for name in cfg.aux_weights()}


def expert_load(sel):
    """Kept assignments per expert of real tokens, numpy int64 [E] (for logging; syncs)."""
    E, k = sel.n_experts, sel.top_k
    idx = sel.index.numpy().reshape(-1, k)
    kept = sel.kept.numpy().reshape(-1, k)
    if sel.token_mask is not None:
        kept = kept & sel.token_mask.numpy().reshape(-1, 1)
    return np.bincount(idx[kept].reshape(-1), minlength=E).astype(np.int64)
