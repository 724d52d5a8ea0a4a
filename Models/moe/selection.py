"""Expert selection of the MoE core: router logits [N, E] → which k experts each token uses and with what weight.

`select()` implements every selection mode of the four MoE systems in float32 with static shapes (no host sync):

* scoring "softmax_topk": p = softmax(z), keep the top-k of p, optionally renormalised to sum 1 (HF Mixtral,
  Qwen2-MoE with norm_topk_prob False, Switch with k = 1, ModuleFormer without renormalisation);
* scoring "topk_softmax": keep the top-k logits, softmax over the kept ones (wyf3 / llama-moe noisy gate);
* scoring "topk_unweighted": keep the top-k logits, each with weight 1 (MoEfication's masked dense FFN; the
  router then gets no gradient through the weights);
* noisy gating (Shazeer, training only): z + ε·(softplus(W_n x) + noise_eps), ε ~ N(0, 1);
* sample_topk s (ModuleFormer, training only): the top k−s by probability, then s more sampled without
  replacement from p over the rest (Gumbel top-s, which is the same distribution as sequential sampling);
* expert capacity per group (a group = one batch row): assignments queue for their expert with all first choices
  of the group in position order before all second choices, and those past the capacity are dropped;
* score_scale multiplies the final weights (llama-moe score_scale_factor).

Ties are broken toward the lower expert index (the top-k is computed as k passes of "max, then the lowest index
attaining it", identical on every backend; jt.topk is not stable for larger E).
"""
import numpy as np

from Utils.runtime import import_jittor

jt = import_jittor()

_LOG_FLOOR = 1e-30     # probabilities are clamped to this normal float before log (fast-math denormals)


class Selection:
    """The routing decision of one MoE layer for one forward (not a Module: it holds Vars, never parameters).

    logits [N, E] fp32 (after noise), probs [N, E] fp32 = softmax(logits) over all experts, index [N, k] int32 (the
    chosen experts before capacity, choice order), weight [N, k] fp32 (× score_scale, 0 where dropped), kept [N, k]
    bool, token_mask [N] bool or None, n_groups × group_size = N, capacity (0 = unlimited). For noisy gating in
    training also clean_logits and noise_std [N, E] (cv2's smooth load estimate); None otherwise.
    """

    def __init__(self, logits, probs, index, weight, kept, token_mask, n_groups, group_size, capacity=0,
                 clean_logits=None, noise_std=None):
        self.logits, self.probs, self.index, self.weight, self.kept = logits, probs, index, weight, kept
        self.token_mask = token_mask
        self.n_groups, self.group_size, self.capacity = n_groups, group_size, capacity
        self.clean_logits, self.noise_std = clean_logits, noise_std

    @property
    def n_tokens(self):
        return self.logits.shape[0]

    @property
    def n_experts(self):
        return self.logits.shape[1]

    @property
    def top_k(self):
        return self.index.shape[1]

    def mask_f(self):
        """token_mask as float32 [N] (ones without a mask)."""
        if self.token_mask is None:
            return jt.ones((self.n_tokens,), "float32")
        return self.token_mask.float32()

    def dense_weights(self):
        """The k-sparse weight matrix [N, E] (weight placed at index; dropped assignments are 0)."""
        E = self.n_experts
        onehot = (self.index.reshape(-1, self.top_k, 1) == jt.arange(E).int32().reshape(1, 1, E)).float32()
        return (onehot * self.weight.reshape(-1, self.top_k, 1)).sum(1)                     # [N, E]

    def detach(self):
        """A copy whose Vars are cut from the graph (for logging/analysis kept across steps)."""
        cut = lambda v: None if v is None else v.detach()
        return Selection(cut(self.logits), cut(self.probs), cut(self.index), cut(self.weight), cut(self.kept),
                         cut(self.token_mask), self.n_groups, self.group_size, self.capacity,
                         cut(self.clean_logits), cut(self.noise_std))


def softmax32(z):
    """softmax over the last axis in float32; the denominator is >= 1 after the max shift."""
    z = z.float32()
    e = jt.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def softplus(x):
    """log(1 + exp(x)) without overflow: max(x, 0) + log(1 + exp(−|x|)); the log argument is in [1, 2]."""
    return jt.maximum(x, 0.0) + jt.log(1.0 + jt.exp(-jt.abs(x)))


def topk_index(scores, k):
    """Indices [N, k] int32 of the k largest scores per row, largest first, ties → lower expert index."""
    N, E = scores.shape
    ar = jt.arange(E).int32().reshape(1, E).broadcast((N, E))
    neg_inf = jt.full((N, E), float("-inf"), "float32")
    picks = []
    for _ in range(k):
        m = scores.max(1, keepdims=True)                                            # [N, 1]
        i = (ar + (scores != m).int32() * E).min(1)                                 # lowest index attaining m
        picks.append(i)
        if len(picks) < k:
            scores = jt.ternary(ar == i.reshape(N, 1), neg_inf, scores)
    return jt.stack(picks, 1).int32().stop_grad()                                   # [N, k]


def gather_cols(values, index):
    """values [N, E], index [N, k] → values[n, index[n, j]] as [N, k] (differentiable in values)."""
    E, k = values.shape[1], index.shape[1]
    onehot = (index.reshape(-1, k, 1) == jt.arange(E).int32().reshape(1, 1, E)).float32()   # [N, k, E]
    return (onehot * values.reshape(-1, 1, E)).sum(2)


def _sampled_index(probs, first, s):
    """s experts per row sampled without replacement ∝ probs, excluding `first` [N, k−s] (Gumbel top-s)."""
    N, E = probs.shape
    u = jt.maximum(jt.minimum(jt.rand((N, E)), 1.0 - 1e-7), 1e-20)
    gumbel = -jt.log(-jt.log(u))
    score = jt.log(jt.maximum(probs.detach(), _LOG_FLOOR)) + gumbel
    taken = (first.reshape(N, -1, 1) == jt.arange(E).int32().reshape(1, 1, E)).any(1)        # [N, E]
    score = jt.ternary(taken, jt.full((N, E), float("-inf"), "float32"), score)
    return topk_index(score, s)


def _capacity_kept(index, mask, n_groups, group_size, n_experts, capacity):
    """kept [N, k] bool: each expert takes at most `capacity` assignments per group, first choices of the group in
    position order first, then second choices; masked-out (padding) tokens take no slot and are dropped."""
    G, S, E, k = n_groups, group_size, n_experts, index.shape[1]
    idx = index.reshape(G, S, k).transpose(0, 2, 1)                                 # [G, k, S] choice-major
    onehot = (idx.reshape(G, k, S, 1) == jt.arange(E).int32().reshape(1, 1, 1, E)).int32()   # [G, k, S, E]
    if mask is not None:
        onehot = onehot * mask.int32().reshape(G, 1, S, 1)
    onehot = onehot.reshape(G, k * S, E)
    position = jt.cumsum(onehot, dim=1)                                             # 1-based queue position
    within = ((position <= capacity).int32() * onehot).sum(2)                       # [G, k·S]
    return (within.reshape(G, k, S).transpose(0, 2, 1).reshape(G * S, k) > 0).stop_grad()


def _as_mask(token_mask, n):
    if token_mask is None:
        return None
    if not isinstance(token_mask, jt.Var):
        token_mask = jt.array(np.asarray(token_mask).reshape(-1).astype(bool))
    return token_mask.reshape(n).bool().stop_grad()


def dense_selection(logits, weight, kept, token_mask=None, probs=None):
    """A Selection over all E experts (k = E) from a dense weight [N, E] and keep mask [N, E]: for routers that are
    not top-k, e.g. AdaMoLE's threshold (an expert is computed only where kept). The count-based aux losses count
    `index`, here every expert; such routers bring their own balance loss."""
    logits = logits.float32()
    N, E = logits.shape
    kept = kept.bool().stop_grad()
    index = jt.arange(E).int32().reshape(1, E).broadcast((N, E)).stop_grad()
    weight = weight.float32() * kept.float32()
    probs = softmax32(logits) if probs is None else probs.float32()
    return Selection(logits, probs, index, weight, kept, _as_mask(token_mask, N), 1, N)


def select(logits, cfg, training, token_mask=None, group_size=None, noise_logits=None):
    """Route N tokens: logits [N, E] (any float dtype; computed in fp32) → Selection.

    token_mask [N] (True = real token) excludes padding from capacity here and from the auxiliary losses later;
    group_size (tokens per batch row) defines the capacity groups (default: one group of N); noise_logits = W_n x
    [N, E] is required for noisy gating in training and ignored otherwise.
    """
    logits = logits.float32()
    N, E = logits.shape
    k = cfg.top_k
    if not 1 <= k <= E:
        raise ValueError("top_k %d is not in 1..%d" % (k, E))
    S = N if group_size is None else int(group_size)
    if S <= 0 or N % S:
        raise ValueError("group_size %r does not divide the %d tokens" % (group_size, N))
    mask = _as_mask(token_mask, N)
    clean, std = None, None
    if cfg.noisy_gating and training:
        if noise_logits is None:
            raise ValueError("noisy gating needs noise_logits (W_n x) in training")
        std = softplus(noise_logits.float32()) + cfg.noise_eps                    # >= noise_eps: safe divisor later
        clean = logits
        logits = clean + jt.randn((N, E), "float32") * std
    probs = softmax32(logits)                                                      # [N, E]

    s = cfg.sample_topk if training else 0
    # softmax_topk ranks by probability (as HF's topk of the softmax); topk_softmax by logit (same order)
    index = topk_index(probs if cfg.scoring == "softmax_topk" else logits, k - s)
    if s:
        index = jt.concat([index, _sampled_index(probs, index, s)], 1)
    if cfg.scoring == "softmax_topk":
        weight = gather_cols(probs, index)                                          # [N, k]
        if cfg.norm_topk_prob:
            weight = weight / jt.maximum(weight.sum(1, keepdims=True), _LOG_FLOOR)
    elif cfg.scoring == "topk_softmax":
        weight = softmax32(gather_cols(logits, index))
    else:
        weight = jt.ones((N, k), "float32")

    capacity = cfg.capacity(S, E)
    if capacity > 0:
        kept = _capacity_kept(index, mask, N // S, S, E, capacity)
        weight = weight * kept.float32()
    else:
        kept = jt.ones((N, k), "bool").stop_grad()
    if cfg.score_scale != 1.0:
        weight = weight * cfg.score_scale
    return Selection(logits, probs, index, weight, kept, mask, N // S, S, capacity, clean, std)
