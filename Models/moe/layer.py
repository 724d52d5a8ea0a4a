"""`MoEFeedForward`: the MoE layer a model puts where a dense FFN would be (router → select → dispatch → experts).

Parameters: `router.*` (see routers.py), `noise.weight` [E, d] (noisy gating only; zero-initialised as Shazeer, so
the noise std starts at softplus(0) + noise_eps), `experts.w1/w3/w2` (experts.py), `shared.w1/w3/w2` and
`shared.gate.weight` (shared experts). Training-only randomness — jitter on the router input, router dropout,
noisy gating, sample_topk — is off in eval, so eval is deterministic.

Jitter multiplies the router's input only (as the Switch paper intends); HF Mixtral, and HF Switch in fp32
through an in-place multiply, also feed the jittered states to the experts. Eval outputs are unaffected.

The forward's Selection is kept in `_selection` for the model to collect with `pop_selection()` (never a public
jt.Var attribute: it would become a parameter, docs/jittor_notes.md A1). Under jt.no_grad nothing is kept unless
`record` is True, so generation does not hold graphs alive. A few rows in eval (decoding) take the one-call path of
decode.py whether or not `record` is set, so recording the routing never changes the output.
"""
from Models.moe.config import MoEConfig
from Models.moe.decode import few_rows_moe, few_rows_moe_applies
from Models.moe.dispatch import combine
from Models.moe.experts import Experts, SharedExperts
from Models.moe.routers import build_router
from Models.moe.selection import select
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


class MoEFeedForward(nn.Module):
    """Token-level mixture on d-wide states: execute(x [B, T, d], token_mask [B, T] or None) → [B, T, d]."""

    def __init__(self, d, cfg, n_experts=None, expert_hidden=None, init_std=0.02):
        """n_experts: this layer's count (default cfg.num_experts; PMoE passes cfg.experts_at(layer)); expert_hidden:
        the dense FFN width used when cfg gives neither expert_sizes nor expert_hidden."""
        cfg = MoEConfig.from_dict(cfg)
        self.cfg = cfg
        self.d = int(d)
        E = int(n_experts or cfg.num_experts)
        if not 1 <= cfg.top_k <= E:
            raise ValueError("top_k %d needs at least as many experts, got %d" % (cfg.top_k, E))
        self.n_experts = E
        self.router = build_router(cfg, d, E)
        self.noise = nn.Linear(d, E, bias=False) if cfg.noisy_gating else None
        if self.noise is not None:
            self.noise.weight = jt.zeros((E, d), "float32")
        self.experts = Experts(d, cfg.expert_widths(E, expert_hidden), act=cfg.hidden_act, gated=cfg.gated,
                               init_std=init_std)
        self.shared = None
        if cfg.shared_experts > 0:
            hidden = cfg.shared_hidden or cfg.expert_hidden or expert_hidden or max(self.experts.sizes)
            self.shared = SharedExperts(d, cfg.shared_experts, hidden, act=cfg.hidden_act, gated=cfg.gated,
                                        gate=cfg.shared_gate, init_std=init_std)
        self.record = False
        self._selection = None

    def route(self, x2d, token_mask=None, group_size=None):
        """Router logits and selection for x2d [N, d] (the layer's first half, also used by tests)."""
        training = self.is_training()
        xr = x2d.float32()
        if training and self.cfg.jitter > 0:
            j = self.cfg.jitter
            xr = xr * (jt.rand(xr.shape) * (2 * j) + (1.0 - j))                    # U(1-j, 1+j)
        logits = self.router(xr)                                                  # [N, E] fp32
        noise_logits = self.noise(xr) if (self.noise is not None and training) else None
        mask = token_mask if self.cfg.ignore_padding else None
        return select(logits, self.cfg, training, token_mask=mask, group_size=group_size, noise_logits=noise_logits)

    def execute(self, x, token_mask=None):
        B, T, d = x.shape
        flat = x.reshape(B * T, d)                                                # [N, d], N = B·T
        if few_rows_moe_applies(self, flat):   # decoding: selection + selected experts in one call (decode.py)
            y = few_rows_moe(flat, self.router(flat.float32()), self.experts, self.cfg)
            if self.record:   # the routing dump reads the same choice; the output stays the kernel's, bit for bit
                self._selection = self.route(flat, _flat_mask(token_mask, B * T), group_size=T)
            return (y if self.shared is None else y + self.shared(flat)).reshape(B, T, d)
        sel = self.route(flat, _flat_mask(token_mask, B * T), group_size=T)
        y = combine(flat, sel, self.experts, self.n_experts)                      # [N, d]
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.record or not jt.flags.no_grad:
            self._selection = sel
        return y.reshape(B, T, d)

    def pop_selection(self):
        """The last forward's Selection (None if none was kept), and forget it."""
        sel, self._selection = self._selection, None
        return sel


def _flat_mask(token_mask, n):
    if token_mask is None:
        return None
    if isinstance(token_mask, jt.Var):
        return token_mask.reshape(n).bool()
    import numpy as np
    return jt.array(np.asarray(token_mask).reshape(n).astype(bool))
