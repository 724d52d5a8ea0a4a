"""`MoEConfig`: every knob of the MoE core (which layers, experts, router, selection, capacity, auxiliary losses).

Typed and validated like `ModelArgs`: unknown keys and bad values are one-line `UserError`s naming the field. It
imports nothing from Jittor, so configuration code and dry runs stay instant. Each MoE system (docs/architecture.md) is
one
configuration away:

* HF Mixtral: router "linear", scoring "softmax_topk", norm_topk_prob True, aux_switch (form "mixtral").
* HF Qwen2-MoE: as Mixtral with norm_topk_prob False, shared_experts 1 + shared_gate True.
* wyf3 / minimind v1: router_bias True, scoring "topk_softmax"; minimind v2: shared_experts 1, aux_seq.
* ModuleFormer / ActiveMoE upcycling: router "linear" | "mlp" (router_act "gelu", router_bias True) | "gmm",
  norm_topk_prob False, sample_topk, aux_mi or aux_switch (form "normalized") + aux_z.
* llama-moe MoEfication: expert_sizes, router "mlp" (router_act "tanh", router_hidden = E), scoring
  "topk_softmax", noisy_gating, aux_cv2, score_scale E/k; thunlp's masked-FFN form: scoring "topk_unweighted".
* HF SwitchTransformers: top_k 1, gated False, hidden_act "relu", capacity, jitter, aux_switch (form
  "switch_t5") + aux_z.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from Utils.errors import UserError

ROUTERS = ("linear", "mlp", "gmm")
ROUTER_ACTS = ("tanh", "gelu")
# "topk_unweighted": the k chosen experts are summed with weight 1 (× score_scale): MoEfication's sliced experts then
# add up to the dense FFN with the other neurons masked, exactly (thunlp's ground-truth evaluation).
SCORINGS = ("softmax_topk", "topk_softmax", "topk_unweighted")
# Expert activations; "gelu" is the exact erf form, "gelu_tanh" the tanh approximation (HF "gelu_new").
EXPERT_ACTS = ("silu", "relu", "gelu", "gelu_tanh")
SWITCH_FORMS = ("mixtral", "switch_t5", "normalized")
AUX_REDUCES = ("mean", "sum")
AUX_NAMES = ("aux_switch", "aux_seq", "aux_cv2", "aux_mi", "aux_z")
_TUPLE_FIELDS = ("layers", "experts_per_layer", "expert_sizes")
_OPTIONAL_INTS = ("expert_hidden", "shared_hidden")


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    # ---- placement: an explicit list wins, else l >= start_layer and (l - start_layer) % layer_freq == 0
    layers: Optional[Tuple[int, ...]] = None
    start_layer: int = 0
    layer_freq: int = 1
    experts_per_layer: Optional[Tuple[int, ...]] = None   # PMoE: one expert count per MoE layer, in layer order
    # ---- experts
    expert_hidden: Optional[int] = None                   # None: the caller's dense FFN width
    expert_sizes: Optional[Tuple[int, ...]] = None        # per-expert widths (MoEfication); wins over expert_hidden
    hidden_act: str = "silu"
    gated: bool = True                                    # act(w1 x)·(w3 x) (SwiGLU) or plain act(w1 x)
    shared_experts: int = 0
    shared_hidden: Optional[int] = None                   # width of each shared expert; None: the expert width
    shared_gate: bool = False                             # Qwen2-MoE: sigmoid(w_g·x) scales the shared output
    # ---- router
    router: str = "linear"
    router_bias: bool = False                             # bias of the (first) router projection
    router_hidden: int = 256                              # mlp: hidden width; gmm: projection width
    router_act: str = "tanh"
    router_dropout: float = 0.0
    # ---- selection
    scoring: str = "softmax_topk"
    norm_topk_prob: bool = True                           # softmax_topk only: renormalise the k kept weights
    noisy_gating: bool = False                            # Shazeer: z + ε·(softplus(W_n x) + noise_eps), training
    noise_eps: float = 0.01
    jitter: float = 0.0                                   # router input × U(1-j, 1+j), training only
    sample_topk: int = 0                                  # ModuleFormer: sample the last s of k in training
    capacity_factor: float = 0.0                          # capacity = ceil(cf·k·group/E); 0 = unlimited
    expert_capacity: int = 0                              # fixed capacity per group; wins over capacity_factor
    score_scale: float = 1.0                              # llama-moe score_scale_factor on the expert weights
    # ---- auxiliary losses (unweighted terms are returned; these are their coefficients)
    aux_switch: float = 0.0
    aux_seq: float = 0.0
    aux_cv2: float = 0.0
    aux_mi: float = 0.0
    aux_z: float = 0.0
    aux_switch_form: str = "mixtral"
    aux_reduce: str = "mean"                              # seq/cv2/mi/z over layers: mean, or sum (minimind)
    ignore_padding: bool = True                           # token_mask excludes padding from losses and capacity

    def __post_init__(self):
        self._check_types()
        for name in _TUPLE_FIELDS:
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                    raise UserError("moe.%s: expected a list of integers, got %r" % (name, v))
                try:
                    setattr(self, name, tuple(int(i) for i in v))
                except (TypeError, ValueError):
                    raise UserError("moe.%s: expected a list of integers, got %r" % (name, v))
        self.validate()

    def _check_types(self):
        # One line naming the field instead of a TypeError from a comparison deep inside validate().
        for f in dataclasses.fields(self):
            v, default = getattr(self, f.name), f.default
            if f.name in _TUPLE_FIELDS or (v is None and f.name in _OPTIONAL_INTS):
                continue
            if isinstance(default, bool) or default is None:
                ok = isinstance(v, bool) if isinstance(default, bool) else \
                    (isinstance(v, int) and not isinstance(v, bool))
            elif isinstance(default, int):
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif isinstance(default, float):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if ok:
                    setattr(self, f.name, float(v))
            else:
                ok = isinstance(v, str)
            if not ok:
                raise UserError("moe.%s: %r has the wrong type (expected %s)"
                                % (f.name, v, "int" if default is None else type(default).__name__))

    def validate(self):
        def need(cond, what):
            if not cond:
                raise UserError("moe." + what)
        need(isinstance(self.num_experts, int) and self.num_experts >= 1,
             "num_experts: %r must be a positive integer" % (self.num_experts,))
        need(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
             "top_k: %r must be between 1 and num_experts %d" % (self.top_k, self.num_experts))
        need(self.start_layer >= 0, "start_layer: %r must be >= 0" % self.start_layer)
        need(self.layer_freq >= 1, "layer_freq: %r must be >= 1" % self.layer_freq)
        if self.layers is not None:
            need(all(i >= 0 for i in self.layers), "layers: %r has a negative layer id" % (self.layers,))
            need(len(set(self.layers)) == len(self.layers), "layers: %r names a layer twice" % (self.layers,))
        if self.experts_per_layer is not None:
            need(all(n >= 1 for n in self.experts_per_layer),
                 "experts_per_layer: %r must hold positive counts" % (self.experts_per_layer,))
            need(all(self.top_k <= n for n in self.experts_per_layer),
                 "experts_per_layer: %r has a layer with fewer experts than top_k %d"
                 % (self.experts_per_layer, self.top_k))
        need(self.expert_hidden is None or self.expert_hidden >= 1,
             "expert_hidden: %r must be positive" % (self.expert_hidden,))
        if self.expert_sizes is not None:
            need(len(self.expert_sizes) == self.num_experts,
                 "expert_sizes: %d sizes for num_experts %d" % (len(self.expert_sizes), self.num_experts))
            need(all(s >= 1 for s in self.expert_sizes), "expert_sizes: %r must be positive" % (self.expert_sizes,))
            need(self.experts_per_layer is None or set(self.experts_per_layer) == {self.num_experts},
                 "expert_sizes: cannot be combined with experts_per_layer of other counts")
        need(self.hidden_act in EXPERT_ACTS,
             "hidden_act: %r is not one of %s" % (self.hidden_act, ", ".join(EXPERT_ACTS)))
        need(self.shared_experts >= 0, "shared_experts: %r must be >= 0" % self.shared_experts)
        need(self.shared_hidden is None or self.shared_hidden >= 1,
             "shared_hidden: %r must be positive" % (self.shared_hidden,))
        need(not self.shared_gate or self.shared_experts > 0, "shared_gate: needs shared_experts > 0")
        need(self.router in ROUTERS, "router: %r is not one of %s" % (self.router, ", ".join(ROUTERS)))
        need(self.router_hidden >= 1, "router_hidden: %r must be positive" % self.router_hidden)
        need(self.router_act in ROUTER_ACTS,
             "router_act: %r is not one of %s" % (self.router_act, ", ".join(ROUTER_ACTS)))
        need(0.0 <= self.router_dropout < 1.0, "router_dropout: %r must be in [0, 1)" % self.router_dropout)
        need(self.scoring in SCORINGS, "scoring: %r is not one of %s" % (self.scoring, ", ".join(SCORINGS)))
        need(self.noise_eps > 0, "noise_eps: %r must be > 0 (it bounds the noise std away from 0)" % self.noise_eps)
        need(0.0 <= self.jitter < 1.0, "jitter: %r must be in [0, 1)" % self.jitter)
        need(0 <= self.sample_topk < self.top_k or self.sample_topk == 0,
             "sample_topk: %r must be in 0..top_k-1 (%d)" % (self.sample_topk, self.top_k - 1))
        need(self.capacity_factor >= 0 and math.isfinite(self.capacity_factor),
             "capacity_factor: %r must be >= 0" % self.capacity_factor)
        need(isinstance(self.expert_capacity, int) and self.expert_capacity >= 0,
             "expert_capacity: %r must be an integer >= 0" % (self.expert_capacity,))
        need(self.score_scale > 0 and math.isfinite(self.score_scale), "score_scale: %r must be > 0" % self.score_scale)
        for name in AUX_NAMES:
            v = getattr(self, name)
            need(v >= 0 and math.isfinite(v), "%s: %r must be >= 0" % (name, v))
        need(self.aux_switch_form in SWITCH_FORMS,
             "aux_switch_form: %r is not one of %s" % (self.aux_switch_form, ", ".join(SWITCH_FORMS)))
        need(self.aux_reduce in AUX_REDUCES,
             "aux_reduce: %r is not one of %s" % (self.aux_reduce, ", ".join(AUX_REDUCES)))

    # ---- placement
    def moe_layer_ids(self, n_layers):
        """The MoE layer ids of an n_layers model, ascending; checked against n_layers and experts_per_layer."""
        if self.layers is not None:
            ids = sorted(self.layers)
            if ids and ids[-1] >= n_layers:
                raise UserError("moe.layers: layer %d is out of range (the model has %d layers)" % (ids[-1], n_layers))
        else:
            ids = [l for l in range(self.start_layer, n_layers) if (l - self.start_layer) % self.layer_freq == 0]
        if self.experts_per_layer is not None and len(self.experts_per_layer) != len(ids):
            raise UserError("moe.experts_per_layer: %d counts for %d MoE layers %s"
                            % (len(self.experts_per_layer), len(ids), ids))
        return ids

    def experts_at(self, layer_id, n_layers):
        """Expert count of MoE layer `layer_id` (num_experts unless experts_per_layer says otherwise)."""
        ids = self.moe_layer_ids(n_layers)
        if layer_id not in ids:
            raise UserError("moe: layer %d is not an MoE layer (MoE layers: %s)" % (layer_id, ids))
        if self.experts_per_layer is None:
            return self.num_experts
        return self.experts_per_layer[ids.index(layer_id)]

    def expert_widths(self, n_experts, dense_hidden=None):
        """Per-expert widths: expert_sizes, else n_experts × (expert_hidden or the dense FFN width)."""
        if self.expert_sizes is not None:
            if n_experts != len(self.expert_sizes):
                raise UserError("moe.expert_sizes: %d sizes for %d experts" % (len(self.expert_sizes), n_experts))
            return tuple(self.expert_sizes)
        width = self.expert_hidden or dense_hidden
        if not width:
            raise UserError("moe.expert_hidden: not set and no dense FFN width was given")
        return (int(width),) * n_experts

    def capacity(self, group_size, n_experts):
        """Expert capacity per group (0 = unlimited): expert_capacity, else ceil(cf·k·group_size/E)."""
        if self.expert_capacity > 0:
            return self.expert_capacity
        if self.capacity_factor > 0:
            return max(1, int(math.ceil(self.capacity_factor * self.top_k * group_size / n_experts)))
        return 0

    def aux_weights(self):
        """{term name: coefficient} for the auxiliary losses that are on (coefficient > 0)."""
        return {name: getattr(self, name) for name in AUX_NAMES if getattr(self, name) > 0}

    # ---- construction
    @classmethod
    def field_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d, source="moe config"):
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise UserError("%s: the moe section must be an object, got %s" % (source, type(d).__name__))
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise UserError("%s: unknown moe key %r" % (source, unknown[0]))
        try:
            return cls(**d)
        except UserError as e:
            raise UserError("%s: %s" % (source, e))
        except TypeError as e:
            raise UserError("%s: moe: %s" % (source, e))

    def to_dict(self):
        """JSON-ready dict (tuples as lists); from_dict(to_dict()) round-trips."""
        out = dataclasses.asdict(self)
        for name in _TUPLE_FIELDS:
            if out[name] is not None:
                out[name] = list(out[name])
        return out
