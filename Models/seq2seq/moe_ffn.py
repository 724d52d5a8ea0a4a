"""The encoder–decoder's MoE feed-forward layers: the MoE core's `MoEFeedForward` as is in the encoder, and in
the decoder with a causal capacity rule, so that a target token's routing never depends on later target tokens.

Why the decoder needs its own rule: the core queues assignments choice-major over the whole group (all first
choices of the row, then all second choices) with a capacity computed from the row length. For k ≥ 2 a token's
second choice would then be dropped or kept depending on the *later* tokens' first choices, and with a capacity
factor the row length itself is future information — both leak the target into earlier positions, and both make
one-token-at-a-time decoding differ from the training forward. Here the queue is token-major (position order,
then choice order inside a token) and the capacity at position t is `expert_capacity`, or
ceil(capacity_factor·k·(t+1)/E) — the capacity of the prefix. For k = 1 with a fixed `expert_capacity` (HF
SwitchTransformers) this is exactly the core's and HF's rule. The per-row, per-expert queue lengths are kept in
the decoding cache, so cached generation drops exactly what the full forward drops.
"""
import dataclasses
import math

import numpy as np

from Models.moe.dispatch import combine
from Models.moe.layer import MoEFeedForward
from Models.moe.selection import Selection
from Utils.runtime import import_jittor

jt = import_jittor()


def causal_capacity(cfg, positions, n_experts):
    """Capacity per position (numpy int [T]); 0 = unlimited."""
    if cfg.expert_capacity > 0:
        return np.full(len(positions), cfg.expert_capacity, np.int64)
    if cfg.capacity_factor > 0:
        return np.array([max(1, int(math.ceil(cfg.capacity_factor * cfg.top_k * (t + 1) / n_experts)))
                         for t in positions], np.int64)
    return np.zeros(len(positions), np.int64)


class CausalMoEFeedForward(MoEFeedForward):
    """MoEFeedForward whose capacity is applied causally (see the module notes); same parameters and names."""

    def __init__(self, d, cfg, n_experts=None, expert_hidden=None, init_std=0.02):
        super().__init__(d, cfg, n_experts, expert_hidden, init_std)
        self.capacity_cfg = self.cfg
        # the core's select() then routes without capacity; the causal rule below applies it
        self.cfg = dataclasses.replace(self.cfg, capacity_factor=0.0, expert_capacity=0)

    def execute(self, x, token_mask=None, state=None, start=0):
        """x [B, T, d] at target positions start..start+T−1; state: the cache dict of this layer (queue lengths
        per row and expert, updated in place) or None for a whole target."""
        B, T, d = x.shape
        E, k = self.n_experts, self.cfg.top_k
        flat = x.reshape(B * T, d)
        mask = None
        if token_mask is not None:
            mask = token_mask.reshape(B * T).bool() if isinstance(token_mask, jt.Var) \
                else jt.array(np.asarray(token_mask).reshape(B * T).astype(bool))
        sel = self.route(flat, mask, group_size=T)
        cap = causal_capacity(self.capacity_cfg, range(start, start + T), E)
        if cap.any():
            onehot = (sel.index.reshape(B, T * k, 1) == jt.arange(E).int32().reshape(1, 1, E)).int32()
            if sel.token_mask is not None:   # padding takes no slot (when the config ignores padding)
                onehot = onehot * sel.token_mask.int32().reshape(B, T, 1, 1).broadcast(
                    (B, T, k, 1)).reshape(B, T * k, 1)
            queue = jt.cumsum(onehot, dim=1)                                        # 1-based, token-major
            if state is not None and "queue" in state:
                queue = queue + state["queue"].reshape(B, 1, E)
            limit = jt.array(np.repeat(cap, k).astype(np.int32)).reshape(1, T * k, 1)
            kept = (((queue <= limit).int32() * onehot).sum(2) > 0).reshape(B * T, k).stop_grad()
            if state is not None:
                prev = state.get("queue")
                counts = onehot.sum(1)
                state["queue"] = (counts if prev is None else prev + counts).stop_grad()
            sel = Selection(sel.logits, sel.probs, sel.index, sel.weight * kept.float32(), kept, sel.token_mask,
                            B, T, int(cap[-1]), sel.clean_logits, sel.noise_std)
        y = combine(flat, sel, self.experts, E)
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.record or not jt.flags.no_grad:
            self._selection = sel
        return y.reshape(B, T, d)
