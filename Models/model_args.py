"""`ModelArgs`: the LLaMA-3 base configuration (docs/moa.md §1) plus the adapter section (docs/moa.md §2–§5), typed and
validated.

The reference's string flags (`0-8,24-32`, `Q,K,V,O,FFN_DOWN`) are accepted at the edge by `parse_layers` /
`parse_targets` and stored typed (tuples); `adapter_params()` turns them back into the reference's strings.
"""
import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Tuple

from Models.moe.config import MoEConfig
from Models.variants import ROUTINGS, VARIANTS, variant  # noqa: F401  (ROUTINGS re-exported)
from Utils.errors import UserError

# Type-column order is fixed by the reference code, not by the order in lora_targets (docs/moa.md §3.1).
LORA_TARGETS = ("Q", "K", "V", "O", "FFN_UP", "FFN_GATE", "FFN_DOWN")
THRESHOLD_GRADS = ("none", "ste", "shifted")
# What the type router and Γ read: the block input (the LLaMA3 reference) or its attention_norm (MoA_Transformers).
ROUTER_INPUTS = ("residual", "normed")
DTYPES = ("float32", "float16", "bfloat16")
FFN_ACTS = ("silu", "relu", "gelu", "gelu_tanh")
ARCH_FIELDS = ("head_dim", "qk_norm", "attn_bias", "tie_word_embeddings", "intermediate_size", "hidden_act",
               "ffn_gated", "moe")


class FieldError(UserError):
    """A bad value of one ModelArgs field: callers re-label it with where the value came from (a CLI flag, a
    keyword, adapter_params.json)."""

    def __init__(self, field, detail):
        super().__init__("%s: %s" % (field, detail))
        self.field, self.detail = field, detail


def parse_layers(spec, n_layers=None, name="layers"):
    """'0-8,24-32' → (0..7, 24..31). Ranges are half-open; '0-0' or '' means none. With `n_layers`, a range that
    ends past the model (even an empty one such as '40-40') is an error naming the range and the layer count."""
    if isinstance(spec, (tuple, list)):
        layers = tuple(sorted({int(i) for i in spec}))
        if layers and layers[0] < 0:
            raise FieldError(name, "layer %d is negative" % layers[0])
        if layers and n_layers is not None and layers[-1] >= n_layers:
            raise FieldError(name, "layer %d is out of range (the model has %d layers)" % (layers[-1], n_layers))
        return layers
    spec = str(spec).strip()
    layers = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            a, b = (int(v) for v in part.split("-"))
        except ValueError:
            raise FieldError(name, "%r is not a list of half-open ranges like '0-32' or '0-8,24-32'" % spec)
        if a < 0 or b < a:
            raise FieldError(name, "range %r must satisfy 0 <= start <= end" % part)
        if n_layers is not None and b > n_layers:
            raise FieldError(name, "range %r goes past the model's %d layers (ranges are half-open: at most '0-%d')"
                             % (part, n_layers, n_layers))
        layers.update(range(a, b))
    return tuple(sorted(layers))


def format_layers(layers):
    """(0..7, 24..31) → '0-8,24-32' (the reference's string form); () → '0-0'."""
    layers = sorted(layers)
    if not layers:
        return "0-0"
    parts, start, prev = [], layers[0], layers[0]
    for i in layers[1:]:
        if i != prev + 1:
            parts.append("%d-%d" % (start, prev + 1))
            start = i
        prev = i
    parts.append("%d-%d" % (start, prev + 1))
    return ",".join(parts)


def parse_targets(spec, name="lora_targets"):
    if isinstance(spec, (tuple, list)):
        items = [str(t).strip() for t in spec]
    else:
        items = [t.strip() for t in str(spec).split(",") if t.strip()]
    for t in items:
        if t not in LORA_TARGETS:
            raise FieldError(name, "unknown target %r (expected a comma list of %s)" % (t, ",".join(LORA_TARGETS)))
    if len(set(items)) != len(items):
        raise FieldError(name, "%r names a target twice" % (spec,))
    return tuple(t for t in LORA_TARGETS if t in items)


@dataclass
class ModelArgs:
    # ---- base model (Meta params.json keys) ----
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    max_batch_size: int = 32
    max_seq_len: int = 2048
    dtype: str = "float32"  # of the frozen base; adapters are always float32 (D13)
    # ---- architecture switches: the HF families (LLaMA, Mixtral, Qwen2-MoE, Qwen3) on the same blocks ----
    head_dim: Optional[int] = None            # default dim // n_heads; Qwen3 sets it apart
    qk_norm: bool = False                     # Qwen3: RMSNorm over each head of q and k before RoPE
    attn_bias: bool = False                   # Qwen2(-MoE): biases on the q, k, v projections
    tie_word_embeddings: bool = False         # the output head is the embedding matrix
    intermediate_size: Optional[int] = None   # dense FFN width given directly (else Meta's multiple_of rule)
    hidden_act: str = "silu"                  # activation of the dense FFN
    ffn_gated: bool = True                    # SwiGLU (gated) or a plain act FFN (ReLU models for MoEfication)
    moe: Optional[MoEConfig] = None           # None: every FFN is dense; else the MoE section (Models/moe/config.py)
    # ---- adapters (docs/moa.md §5.1 names) ----
    routing: str = "soft_moa"
    w_bias: bool = False
    lora_layers: Tuple[int, ...] = ()
    lora_rank: int = 16
    lora_targets: Tuple[str, ...] = ("Q", "V")
    lora_alpha: float = 8
    expert_num: int = 1
    hydra_moe: bool = False
    prompt_layers: Tuple[int, ...] = ()
    prompt_len: int = 10
    p_adapter_layers: Tuple[int, ...] = ()
    p_adapter_size: int = 16
    p_adapter_hydra: bool = False
    swi_x: int = 0
    max_threshold: float = 0.5
    const_threshold: bool = False
    threshold_grad: str = "none"
    router_input: str = "residual"
    top_k: int = 1
    lb_loss_coeff: float = 0.001
    noisy_router: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        if self.moe is not None:
            self.moe = MoEConfig.from_dict(self.moe, "moe")
            self.moe.moe_layer_ids(self.n_layers)  # placement checked against the model now
        self.lora_layers = parse_layers(self.lora_layers, self.n_layers, "lora_layers")
        self.prompt_layers = parse_layers(self.prompt_layers, self.n_layers, "prompt_layers")
        self.p_adapter_layers = parse_layers(self.p_adapter_layers, self.n_layers, "p_adapter_layers")
        self.lora_targets = parse_targets(self.lora_targets)
        self.validate()

    def validate(self):
        def need(cond, what):
            if not cond:
                raise UserError(what)
        need(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim, n_layers and n_heads must be positive")
        need(self.head_dim > 0 and (self.head_dim != self.dim // self.n_heads or self.dim % self.n_heads == 0),
             "dim %d is not divisible by n_heads %d (give head_dim)" % (self.dim, self.n_heads))
        need(self.n_heads % self.n_kv_heads == 0,
             "n_heads %d is not a multiple of n_kv_heads %d" % (self.n_heads, self.n_kv_heads))
        need(self.head_dim % 2 == 0, "head_dim %d must be even for RoPE" % self.head_dim)
        need(self.hidden_act in FFN_ACTS, "hidden_act: %r is not one of %s" % (self.hidden_act, ", ".join(FFN_ACTS)))
        need(self.intermediate_size is None or self.intermediate_size > 0, "intermediate_size must be positive")
        need(self.routing in VARIANTS, "routing: %r is not one of %s" % (self.routing, ", ".join(ROUTINGS)))
        v = variant(self.routing)
        need(self.threshold_grad in THRESHOLD_GRADS,
             "threshold_grad: %r is not one of %s" % (self.threshold_grad, ", ".join(THRESHOLD_GRADS)))
        need(self.router_input in ROUTER_INPUTS,
             "router_input: %r is not one of %s" % (self.router_input, ", ".join(ROUTER_INPUTS)))
        need(self.dtype in DTYPES, "dtype: %r is not one of %s" % (self.dtype, ", ".join(DTYPES)))
        need(self.lora_rank > 0 and self.expert_num >= 1 and self.prompt_len > 0 and self.p_adapter_size > 0,
             "lora_rank, expert_num, prompt_len and p_adapter_size must be positive")
        need(self.swi_x >= 0, "swi_x must be >= 0")
        if v.sparse_lora and self.routing != "adamole":  # AdaMoLE's threshold decides how many experts run
            need(1 <= self.top_k <= self.expert_num,
                 "top_k %d must be between 1 and expert_num %d" % (self.top_k, self.expert_num))
        need(not ("FFN_GATE" in self.lora_targets and not v.ffn_gate_target),
             "lora_targets: FFN_GATE is only supported by %s, not %s"
             % (" and ".join(n for n, x in VARIANTS.items() if x.ffn_gate_target), self.routing))
        if v.single_expert:
            need(self.expert_num == 1, "expert_num: %s uses single-expert adapters (expert_num 1)" % self.routing)
        if v.all_layers and (self.lora_layers or self.prompt_layers or self.p_adapter_layers):
            every = set(range(self.n_layers))
            need(set(self.lora_layers) == set(self.prompt_layers) == set(self.p_adapter_layers) == every,
                 "unipeft needs LoRA, prompt and parallel adapter in every layer (0-%d)" % self.n_layers)

    # ---- derived sizes ----
    @property
    def ffn_hidden_dim(self):
        """intermediate_size when given (HF configs), else Meta's rule: 4d → int(2·4d/3) → int(mult·h) → round up to
        multiple_of."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def is_moe_lora(self):
        return variant(self.routing).sparse_lora

    def moe_layer_ids(self):
        """Layers whose FFN is a mixture of experts (empty for a dense model)."""
        return tuple(self.moe.moe_layer_ids(self.n_layers)) if self.moe is not None else ()

    # ---- construction ----
    @classmethod
    def base_field_names(cls):
        return ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "max_batch_size", "max_seq_len") + ARCH_FIELDS

    def base_params(self):
        """What a checkpoint's params.json holds: Meta's keys, the architecture switches that differ from LLaMA's
        defaults, and the moe section — no adapter or runtime settings."""
        out = {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                             "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope")}
        defaults = ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads)
        for k in ARCH_FIELDS:
            v = getattr(self, k)
            if k == "moe":
                if v is not None:
                    out["moe"] = v.to_dict()
            elif v != getattr(defaults, k):
                out[k] = v
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def field_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_params_json(cls, path, **overrides):
        """Meta `params.json` (unknown keys are an error) merged with `overrides` (ModelArgs field names)."""
        try:
            with open(path) as f:
                params = json.load(f)
        except FileNotFoundError:
            raise UserError("%s: not found (expected Meta's params.json)" % path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError("%s: not valid JSON (%s)" % (path, e))
        if not isinstance(params, dict):
            raise UserError("%s: expected a JSON object" % path)
        unknown = sorted(set(params) - set(cls.field_names()))
        if unknown:
            raise UserError("%s: unknown key %r (known: %s)" % (path, unknown[0], ", ".join(cls.base_field_names())))
        if "rope_theta" not in params:
            # Meta's LLaMA-2 params.json has no rope_theta: its code's default is 10000 (LLaMA-3 writes 500000).
            params = dict(params, rope_theta=10000.0)
        return cls.create(params, overrides, source=path)

    @classmethod
    def from_hf_config(cls, path, **overrides):
        """Hugging Face `config.json` (LLaMA, Mixtral, Qwen2-MoE, Qwen3: Models/hf_config.py) → ModelArgs, merged
        with `overrides`. Every field is mapped or refused; a sliding window shorter than max_seq_len is an error."""
        from Models.hf_config import params_from_hf
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError("%s: cannot read Hugging Face config (%s)" % (path, e))
        params, family, window = params_from_hf(cfg, path)
        args = cls.create(params, overrides, source=path)
        if window is not None and window < args.max_seq_len:
            raise UserError("%s: sliding_window %d is used by this %s config and is shorter than max_seq_len %d "
                            "(sliding-window attention is not implemented; lower max_seq_len)"
                            % (path, window, family, args.max_seq_len))
        return args

    @classmethod
    def create(cls, params, overrides=None, source="arguments"):
        merged = dict(params)
        for k, v in (overrides or {}).items():
            if k not in cls.field_names():
                raise UserError("%s: unknown model argument %r" % (source, k))
            if v is not None:
                merged[k] = v
        try:
            return cls(**merged)
        except TypeError as e:
            raise UserError("%s: %s" % (source, e))

    def to_dict(self):
        return dataclasses.asdict(self)

    def adapter_params(self):
        """The reference's adapter_params.json keys (docs/moa.md §5.4) plus ours (routing, threshold_grad,
        router_input)."""
        return {
            "routing": self.routing, "w_bias": self.w_bias,
            "lora_layers": format_layers(self.lora_layers), "lora_rank": self.lora_rank,
            "lora_targets": ",".join(self.lora_targets), "lora_alpha": self.lora_alpha,
            "swi_x": self.swi_x, "p_adapter_layers": format_layers(self.p_adapter_layers),
            "p_adapter_size": self.p_adapter_size, "p_adapter_hydra": self.p_adapter_hydra,
            "prompt_layers": format_layers(self.prompt_layers), "prompt_len": self.prompt_len,
            "max_seq_len": self.max_seq_len, "expert_num": self.expert_num, "hydra_moe": self.hydra_moe,
            "max_threshold": self.max_threshold, "const_threshold": self.const_threshold,
            "threshold_grad": self.threshold_grad,
            "router_input": self.router_input, "top_k": self.top_k, "lb_loss_coeff": self.lb_loss_coeff,
            "noisy_router": self.noisy_router, "adamole": self.routing == "adamole",
        }

