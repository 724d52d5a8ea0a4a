"""Per-expert activation scores of MoEfication (the router's training targets) and the metrics that judge a selection.

From per-neuron activations h [N, d_ff] (the dense FFN's silu(W_gate x), or silu(W_gate x) ⊙ W_up x) and a split's
labels, the score of expert e for token t is (MOE_SPEC §4(a).3):

    plain      s_e = Σ_{i∈S_e} h_i            (abs=True: |Σ_{i∈S_e} h_i|, llama-moe HEAD)
    positive   s_e = Σ_{i∈S_e} max(h_i, 0)    (thunlp's ReLU mass)
    l1_norm    s_e = Σ_{i∈S_e} |h_i|
    l2_norm    s_e = Σ_{i∈S_e} h_i²           (l2_threshold=1e-3: h_i² ≤ 1e-3 counts 0, the seed's version)

Metrics: `recall_at_k` = |top-k(pred) ∩ top-k(true)| / k averaged over tokens (thunlp's "acc" of a selection);
`coverage` = the share of a token's true activation mass (of the chosen criterion) held by the chosen experts,
averaged over the tokens that have any mass (thunlp's MLP-selection metric, which skips tokens without).
Ties in top-k go to the lower expert index, so every function is deterministic.
"""
import numpy as np

from Models.moefication.split import check_labels, permutation
from Utils.errors import UserError

CRITERIA = ("plain", "positive", "l1_norm", "l2_norm")
SEED_L2_THRESHOLD = 1e-3


def _activations(h, d_ff=None):
    h = np.asarray(h)
    if h.ndim != 2 or (d_ff is not None and h.shape[1] != d_ff):
        raise UserError("activations: expected [N, %s], got shape %s" % (d_ff if d_ff else "d_ff", h.shape))
    if not np.issubdtype(h.dtype, np.floating):
        raise UserError("activations: expected a float array, got dtype %s" % h.dtype)
    return h.astype(np.float64)


def neuron_values(h, criterion, l2_threshold=None):
    """The per-neuron quantity each criterion sums over an expert's neurons."""
    h = _activations(h)
    if criterion == "plain":
        return h
    if criterion == "positive":
        return np.maximum(h, 0.0)
    if criterion == "l1_norm":
        return np.abs(h)
    if criterion == "l2_norm":
        sq = h * h
        if l2_threshold is not None:
            sq = np.where(sq <= l2_threshold, 0.0, sq)
        return sq
    raise UserError("criterion: expected one of %s, got %r" % ("/".join(CRITERIA), criterion))


def expert_scores(h, labels, num_experts, criterion="l2_norm", abs_plain=False, l2_threshold=None):
    """Scores [N, E] (float64) of each expert for each token."""
    h = _activations(h)
    labels = check_labels(labels, num_experts, h.shape[1])
    if l2_threshold is not None and criterion != "l2_norm":
        raise UserError("l2_threshold: only the l2_norm criterion has a threshold (got criterion %r)" % criterion)
    if abs_plain and criterion != "plain":
        raise UserError("abs_plain: only the plain criterion takes |Σ h| (got criterion %r)" % criterion)
    v = neuron_values(h, criterion, l2_threshold)
    size = h.shape[1] // num_experts
    # Sorted by expert, the columns reshape to [N, E, size]: one sum per expert in neuron order.
    s = v[:, permutation(labels)].reshape(h.shape[0], num_experts, size).sum(axis=2)
    return np.abs(s) if abs_plain else s


def _check_k(k, num_experts):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
        raise UserError("k: expected an integer in [1, %d], got %r" % (num_experts, k))
    return int(k)


def _scores(scores, what="scores"):
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise UserError("%s: expected [N, E], got shape %s" % (what, s.shape))
    return s


def topk_indices(scores, k):
    """[N, k] int64 expert indices of the k largest scores per token, largest first (ties: lower index first)."""
    s = _scores(scores)
    k = _check_k(k, s.shape[1])
    # A stable sort of −s keeps the lower index first among equal scores.
    return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)


def ground_truth_select(scores, k):
    """The oracle selection (thunlp's ground-truth): per token the k experts with the largest true scores."""
    return topk_indices(scores, k)


def topk_targets(scores, k):
    """Binary targets [N, E] (float32): 1 for the k largest-scoring experts of each token."""
    idx = topk_indices(scores, k)
    out = np.zeros(np.asarray(scores).shape, dtype=np.float32)
    np.put_along_axis(out, idx, 1.0, axis=1)
    return out


def _chosen_mask(chosen, shape):
    """Boolean [N, E] from a mask of that shape or from expert indices [N, k]."""
    c = np.asarray(chosen)
    if c.dtype == bool:
        if c.shape != shape:
            raise UserError("chosen: mask of shape %s, expected %s" % (c.shape, shape))
        return c
    if c.ndim != 2 or c.shape[0] != shape[0] or not np.issubdtype(c.dtype, np.integer):
        raise UserError("chosen: expected a bool mask %s or integer indices [%d, k], got %s %s"
                        % (shape, shape[0], c.shape, c.dtype))
    if c.size and (c.min() < 0 or c.max() >= shape[1]):
        raise UserError("chosen: expert indices must lie in [0, %d)" % shape[1])
    mask = np.zeros(shape, dtype=bool)
    np.put_along_axis(mask, c, True, axis=1)
    return mask


def coverage(scores_true, chosen):
    """Mean over tokens of (true mass of the chosen experts) / (true mass of all experts).

    Mass is the criterion's score; meant for the non-negative criteria (positive, l1_norm, l2_norm). Tokens with no
    mass (total ≤ 0) are skipped, as thunlp does; NaN when no token has any.
    """
    s = _scores(scores_true, "scores_true")
    mask = _chosen_mask(chosen, s.shape)
    total = s.sum(axis=1)
    keep = total > 0
    if not keep.any():
        return float("nan")
    return float(np.mean(np.where(mask, s, 0.0).sum(axis=1)[keep] / total[keep]))


def recall_at_k(scores_true, scores_pred, k):
    """Mean over tokens of |top-k(pred) ∩ top-k(true)| / k."""
    t = _scores(scores_true, "scores_true")
    p = _scores(scores_pred, "scores_pred")
    if t.shape != p.shape:
        raise UserError("scores_pred: shape %s differs from scores_true %s" % (p.shape, t.shape))
    k = _check_k(k, t.shape[1])
    hit = _chosen_mask(topk_indices(t, k), t.shape) & _chosen_mask(topk_indices(p, k), p.shape)
    return float(hit.sum(axis=1).mean() / k)
