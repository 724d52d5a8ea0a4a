"""`Seq2SeqConfig`: the encoder–decoder MoE's configuration — the seed's `model_params.json` keys, the two
architecture styles, the sparse steps and a nested `moe` section of the MoE core.

Typed and validated like `ModelArgs`/`MoEConfig` (no Jittor import): unknown keys and bad values are one-line
`UserError`s naming the key. The seed's keys keep their names and meaning: vocab_size, embed_size (d_model),
num_heads, hidden_dim (dense FFN width, and the experts' width unless moe.expert_hidden says otherwise),
enc_layers, dec_layers, dropout.

Styles (`style`): "seed" — embeddings × √d plus sinusoidal positions, post-norm LayerNorm sub-layers, attention
scaled by 1/√head_dim, an untied output projection (PyTorch nn.Transformer as the seed uses it); "switch" — T5 /
HF SwitchTransformers: relative position buckets in the first layer's self-attention shared by the stack,
pre-norm RMS-style T5LayerNorm (no mean, no bias), no attention scaling, tied embeddings with the output scaled
by d^-0.5. Keys left at None take the style's default.

Sparse steps follow HF SwitchTransformers exactly, so its checkpoints build the same stacks: 0 = no MoE layer in
that stack, 1 = every layer, s ≥ 2 = the layers i with i % s == 1. The `moe` section is the core's MoEConfig with
Switch's defaults underneath the keys given (top-1, ReLU DenseActDense experts, probability not renormalised,
jitter 0.01, switch_t5 load balance 1e-2 and z-loss 1e-3, capacity factor 1.25); its own placement keys are
refused (the sparse steps place the layers). "moe": null builds the dense model.
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional

from Models.moe.config import MoEConfig
from Utils.errors import UserError

STYLES = ("seed", "switch")
DENSE_ACTS = ("relu", "gelu", "gelu_tanh", "silu")
STYLE_DEFAULTS = {
    "seed": dict(hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False),
    "switch": dict(hidden_act="relu", layer_norm_eps=1e-6, tie_word_embeddings=True),
}
SWITCH_MOE_DEFAULTS = dict(num_experts=8, top_k=1, gated=False, hidden_act="relu", norm_topk_prob=False,
                           jitter=0.01, capacity_factor=1.25, aux_switch=1e-2, aux_z=1e-3,
                           aux_switch_form="switch_t5", router="linear")
_PLACEMENT = ("layers", "start_layer", "layer_freq", "experts_per_layer")


@dataclass
class Seq2SeqConfig:
    # ---- the seed's model_params.json keys
    vocab_size: int = 0                     # 0: the tokenizer's size (set by from_tokenizer / the trainer)
    embed_size: int = 256
    num_heads: int = 8
    hidden_dim: int = 1024
    enc_layers: int = 6
    dec_layers: int = 6
    dropout: float = 0.1
    # ---- architecture
    style: str = "seed"
    head_dim: Optional[int] = None          # d_kv; None: embed_size // num_heads
    hidden_act: Optional[str] = None        # dense FFN activation; None: the style's (gelu seed, relu switch)
    layer_norm_eps: Optional[float] = None
    tie_word_embeddings: Optional[bool] = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # ---- mixture of experts
    encoder_sparse_step: int = 1
    decoder_sparse_step: int = 1
    moe: Optional[MoEConfig] = None
    # ---- special tokens (from the tokenizer)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            self.moe = moe_from_dict(self.moe)
        for key, value in STYLE_DEFAULTS.get(self.style, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.head_dim is None and self.num_heads and isinstance(self.embed_size, int) \
                and isinstance(self.num_heads, int) and self.num_heads > 0:
            self.head_dim = self.embed_size // self.num_heads
        self.validate()

    def validate(self):
        def need(cond, what):
            if not cond:
                raise UserError("model config: " + what)
        ints = ("vocab_size", "embed_size", "num_heads", "hidden_dim", "enc_layers", "dec_layers", "head_dim",
                "relative_attention_num_buckets", "relative_attention_max_distance", "encoder_sparse_step",
                "decoder_sparse_step", "pad_token_id", "eos_token_id", "decoder_start_token_id")
        for k in ints:
            v = getattr(self, k)
            need(isinstance(v, int) and not isinstance(v, bool), "%s: %r must be an integer" % (k, v))
        need(self.style in STYLES, "style: %r is not one of %s" % (self.style, ", ".join(STYLES)))
        for k in ("embed_size", "num_heads", "hidden_dim", "enc_layers", "dec_layers", "head_dim",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
            need(getattr(self, k) >= 1, "%s: %r must be >= 1" % (k, getattr(self, k)))
        need(self.vocab_size >= 0, "vocab_size: %r must be >= 0 (0 = the tokenizer's)" % self.vocab_size)
        need(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
             and 0.0 <= self.dropout < 1.0, "dropout: %r must be in [0, 1)" % (self.dropout,))
        need(self.hidden_act in DENSE_ACTS, "hidden_act: %r is not one of %s" % (self.hidden_act,
                                                                                ", ".join(DENSE_ACTS)))
        need(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0
             and math.isfinite(self.layer_norm_eps), "layer_norm_eps: %r must be > 0" % (self.layer_norm_eps,))
        need(isinstance(self.tie_word_embeddings, bool), "tie_word_embeddings: %r must be true or false"
             % (self.tie_word_embeddings,))
        need(self.style == "switch" or self.embed_size % 2 == 0,
             "embed_size: %d must be even for sinusoidal positions" % self.embed_size)
        for k in ("encoder_sparse_step", "decoder_sparse_step"):
            need(getattr(self, k) >= 0, "%s: %r must be >= 0 (0 = no MoE layer)" % (k, getattr(self, k)))
        for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            v = getattr(self, k)
            need(v >= 0 and (self.vocab_size == 0 or v < self.vocab_size),
                 "%s: %d is not an id of a %d-token vocabulary" % (k, v, self.vocab_size))

    # ---- layout
    @staticmethod
    def sparse_layers(n_layers, step):
        """Ids of the MoE layers of a stack (HF SwitchTransformers' rule)."""
        if step <= 0:
            return []
        return [i for i in range(n_layers) if step == 1 or i % step == 1]

    def encoder_moe_layers(self):
        return self.sparse_layers(self.enc_layers, self.encoder_sparse_step) if self.moe is not None else []

    def decoder_moe_layers(self):
        return self.sparse_layers(self.dec_layers, self.decoder_sparse_step) if self.moe is not None else []

    @property
    def is_moe(self):
        return bool(self.encoder_moe_layers() or self.decoder_moe_layers())

    def with_tokenizer(self, tokenizer):
        """A copy whose vocabulary and special ids are the tokenizer's; a vocab_size below it is an error (the
        seed clamped every id above 511 to 511 — we refuse instead)."""
        n = int(tokenizer.n_words)
        if self.vocab_size and self.vocab_size < n:
            raise UserError("model config: vocab_size %d is smaller than the tokenizer's %d ids (ids are never "
                            "clamped; set vocab_size to 0 or >= %d)" % (self.vocab_size, n, n))
        pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
        eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else pad
        start = tokenizer.bos_id if tokenizer.bos_id >= 0 else pad
        return dataclasses.replace(self, vocab_size=self.vocab_size or n, pad_token_id=pad, eos_token_id=eos,
                                   decoder_start_token_id=start)

    # ---- (de)serialisation
    @classmethod
    def field_names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d, source="model config"):
        if not isinstance(d, dict):
            raise UserError("%s: expected a JSON object, got %s" % (source, type(d).__name__))
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise UserError("%s: unknown key %r (known: %s)" % (source, unknown[0], ", ".join(cls.field_names())))
        try:
            return cls(**d)
        except UserError as e:
            raise UserError("%s: %s" % (source, str(e).replace("model config: ", "")))

    @classmethod
    def from_json(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise UserError("%s: cannot read (%s)" % (path, e.strerror or e))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError("%s: not valid JSON (%s)" % (path, str(e).splitlines()[0]))
        return cls.from_dict(d, path)

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["moe"] = None if self.moe is None else {k: v for k, v in self.moe.to_dict().items()
                                                    if k not in _PLACEMENT}
        return out


def moe_from_dict(d):
    """MoEConfig from the `moe` section: Switch's defaults under the given keys; placement keys refused."""
    if isinstance(d, MoEConfig):
        return d
    if not isinstance(d, dict):
        raise UserError("model config: moe must be an object or null, got %s" % type(d).__name__)
    defaults = MoEConfig.__dataclass_fields__
    placed = [k for k in _PLACEMENT if k in d and d[k] != defaults[k].default]
    if placed:
        raise UserError("model config: moe.%s is not used here: encoder_sparse_step and decoder_sparse_step place "
                        "the MoE layers" % placed[0])
    return MoEConfig.from_dict(dict(SWITCH_MOE_DEFAULTS, **d), "model config")
