"""Dense → MoE upcycling (seed 002): the seed's config keys mapped onto `MoEConfig`, where the experts
go, and the closed-form parameter counts of the converted model (the dry run). The tensors themselves are
`Models/upcycle_state.py`; the CLI is `upcycle.py`. Imports no Jittor.

Config keys (a JSON object; unknown keys are one-line errors naming the file), the seed's meaning → MoEConfig:
* num_experts, expert_top_k: E copies of each chosen FFN, k used per token → num_experts, top_k;
* moe_start_layer, moe_layer_freq: layer l is MoE iff l ≥ start and (l − start) mod freq = 0 → start_layer,
  layer_freq;
* gate_type: linear z = Wx; mlp z = W₂·GELU(W₁x + b₁) of width gating_size; gmm z_e = cos(Wx, c_e)·exp(τ) → router
  (router_act "gelu", router_bias for mlp only, as ModuleFormer);
* gating_size: the mlp gate's hidden width, the gmm projection width → router_hidden;
* gating_dropout: the anchor drops out inside its mlp gate only; here on every gate kind → router_dropout;
* aux_loss_type, aux_loss_weight: see "Aux loss" below;
* sample_topk: in training the last s of the k experts are sampled from p → sample_topk;
* enable_moe, first_init, acc_aux_loss: the anchor's switches, accepted with the values upcycling means (true,
  true, false).

Beyond the seed: `normalize_top_k` (default true: the k kept weights are renormalised, so the converted model computes
exactly what the dense one did; false is the seed's y = Σ_{e∈S} p_e·FFN(x) = (Σ kept p)·FFN(x)), `noise_std` (each
copy's weights + N(0, (noise_std·std(W))²), seeded by `seed`, to break the copies' symmetry), `seed` (router
initialisation and noise), `residual_moe` (the seed's TODO: one shared expert = the dense FFN plus routed copies whose
down-projections start at zero, so the model starts equal to the dense one whatever the gate does), `experts_per_layer`
(PMoE, the seed's other TODO: one expert count per MoE layer), `moe_layers` (an explicit layer list instead of
start/freq) and `aux_reduce` (mean or sum of the per-layer terms). A whole Hugging Face LLaMA config.json with these
keys added (the seed's own configs/config.json is one) is accepted: its architecture fields must agree with the
checkpoint.

Aux loss: the anchor adds `aux_loss_weight + aux_loss` (the weight is a constant, the loss enters with weight 1); here
the loss is multiplied by the weight, as ModuleFormer does. 'mi' → aux_mi = w. 'switch' → aux_switch = w in the
"normalized" form (E·Σ_e norm₁(Σ_t p_te)·norm₁(count_e), 1 at balance) and aux_z = 0.1·w (ModuleFormer's fixed 0.1
z-loss coefficient), so w·(switch + 0.1·z) as in the anchor. The anchor sums each layer's loss; the MoE core takes the
switch statistics over all MoE layers together (HF's convention, ≈ the mean over layers) and reduces mi/z with
`aux_reduce` (default "mean", so the weight does not grow with the number of MoE layers; "sum" gives the anchor's
per-layer sum for mi and z, whose weight then matches the anchor's for the same value of w).
"""
import dataclasses
import json
import os

import numpy as np

from Models.hf_config import _COMMON, _HARMLESS, _OWN, params_from_hf
from Models.model_args import ModelArgs
from Models.moe.config import MoEConfig
from Utils.errors import UserError

GATES = ("linear", "mlp", "gmm")
AUX_TYPES = ("mi", "switch")
Z_LOSS_RATIO = 0.1   # ModuleFormer's fixed weight of the z-loss inside its 'switch' loss
# key: (type, default). Seed defaults are the anchor's code defaults (its MoLlamaConfig), not its README's example.
SEED_KEYS = {"num_experts": (int, 2), "expert_top_k": (int, 1), "moe_start_layer": (int, 0),
             "moe_layer_freq": (int, 1), "gate_type": (str, "mlp"), "gating_size": (int, 256),
             "aux_loss_type": (str, "mi"), "aux_loss_weight": (float, 0.0), "sample_topk": (int, 0),
             "gating_dropout": (float, 0.0), "enable_moe": (bool, True), "first_init": (bool, True),
             "acc_aux_loss": (bool, False)}
EXTRA_KEYS = {"normalize_top_k": (bool, True), "noise_std": (float, 0.0), "seed": (int, 0),
              "residual_moe": (bool, False), "experts_per_layer": (list, None), "moe_layers": (list, None),
              "aux_reduce": (str, "mean")}
KEYS = dict(SEED_KEYS, **EXTRA_KEYS)
# A Hugging Face LLaMA config.json's own fields (the seed's config file is one with the MoE keys added).
_HF_LLAMA_KEYS = frozenset(_HARMLESS | _COMMON | _OWN["llama"])
_SHAPE_FIELDS = (("hidden_size", "dim"), ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads"),
                 ("num_key_value_heads", "n_kv_heads"), ("vocab_size", "vocab_size"),
                 ("intermediate_size", "ffn_hidden_dim"))


@dataclasses.dataclass
class UpcycleSpec:
    """A resolved upcycling config: every key of KEYS with its value, where it came from, and the HF fields."""
    values: dict
    source: str = "upcycle config"
    hf_fields: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):
        if name in KEYS:
            return self.values[name]
        raise AttributeError(name)

    def to_dict(self):
        return dict(self.values)


def _typed(key, value, source):
    kind = KEYS[key][0]
    if value is None and KEYS[key][1] is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number", list: "a list of integers",
                str: "a string"}[kind]
        raise UserError("%s: %s = %r is not %s" % (source, key, value, what))
    return value


def load_spec(config, overrides=None, source=None):
    """UpcycleSpec from a JSON file path or a dict, then `overrides` ({key: value}, e.g. from flags; None = unset)."""
    if isinstance(config, str):
        source = source or config
        try:
            with open(config) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise UserError("%s: not found (expected the MoE config, a JSON object)" % source)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError("%s: not valid JSON (%s)" % (source, str(e).splitlines()[0]))
    source = source or "upcycle config"
    if not isinstance(config, dict):
        raise UserError("%s: expected a JSON object of MoE keys" % source)
    merged = dict(config)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hf = {k: v for k, v in merged.items() if k not in KEYS and k in _HF_LLAMA_KEYS}
    unknown = sorted(k for k in merged if k not in KEYS and k not in _HF_LLAMA_KEYS)
    if unknown:
        raise UserError("%s: unknown key %r (known: %s)" % (source, unknown[0], ", ".join(KEYS)))
    values = {k: _typed(k, merged[k], source) if k in merged else default for k, (_, default) in KEYS.items()}
    spec = UpcycleSpec(values, source, hf)
    _check(spec)
    return spec


def _check(spec):
    def need(cond, text):
        if not cond:
            raise UserError("%s: %s" % (spec.source, text))
    v = spec.values
    need(v["enable_moe"], "enable_moe = false leaves nothing to upcycle")
    need(v["first_init"], "first_init = false means 'load an already upcycled model': use from_pretrained on it")
    need(not v["acc_aux_loss"], "acc_aux_loss = true (statistics across micro-batches) is not supported; the aux "
                                "loss is computed per micro-batch")
    need(v["num_experts"] >= 1, "num_experts = %d must be >= 1" % v["num_experts"])
    counts = v["experts_per_layer"] or [v["num_experts"]]
    need(min(counts) >= 1, "experts_per_layer %s must hold positive counts" % counts)
    need(v["expert_top_k"] >= 1, "expert_top_k = %d must be >= 1" % v["expert_top_k"])
    need(v["expert_top_k"] <= min(counts), "expert_top_k = %d is more than num_experts = %d%s" % (
        v["expert_top_k"], min(counts), " (the smallest of experts_per_layer)" if v["experts_per_layer"] else ""))
    need(0 <= v["sample_topk"] < v["expert_top_k"] or v["sample_topk"] == 0,
         "sample_topk = %d must be below expert_top_k = %d" % (v["sample_topk"], v["expert_top_k"]))
    need(v["moe_start_layer"] >= 0, "moe_start_layer = %d must be >= 0" % v["moe_start_layer"])
    need(v["moe_layer_freq"] >= 1, "moe_layer_freq = %d must be >= 1" % v["moe_layer_freq"])
    need(v["gate_type"] in GATES, "gate_type = %r is not one of %s" % (v["gate_type"], ", ".join(GATES)))
    need(v["gating_size"] >= 1, "gating_size = %d must be >= 1" % v["gating_size"])
    need(v["aux_loss_type"] in AUX_TYPES, "aux_loss_type = %r is not one of %s" % (v["aux_loss_type"],
                                                                                 ", ".join(AUX_TYPES)))
    need(v["aux_loss_weight"] >= 0, "aux_loss_weight = %g must be >= 0" % v["aux_loss_weight"])
    need(0 <= v["gating_dropout"] < 1, "gating_dropout = %g must be in [0, 1)" % v["gating_dropout"])
    need(v["noise_std"] >= 0, "noise_std = %g must be >= 0 (relative to each weight's std)" % v["noise_std"])
    need(v["aux_reduce"] in ("mean", "sum"), "aux_reduce = %r is not mean or sum" % v["aux_reduce"])
    need(not (v["aux_loss_type"] == "switch" and v["aux_loss_weight"] > 0 and len(set(counts)) > 1),
         "aux_loss_type 'switch' takes its statistics over all MoE layers together and needs one expert count; "
         "experts_per_layer %s differ (use 'mi')" % counts)


def moe_config(spec):
    """The MoEConfig the spec means (placement not yet checked against a model)."""
    v, w = spec.values, spec.values["aux_loss_weight"]
    aux = {"aux_mi": w} if v["aux_loss_type"] == "mi" else \
        {"aux_switch": w, "aux_switch_form": "normalized", "aux_z": Z_LOSS_RATIO * w}
    cfg = dict(num_experts=v["num_experts"], top_k=v["expert_top_k"], start_layer=v["moe_start_layer"],
               layer_freq=v["moe_layer_freq"], layers=v["moe_layers"], experts_per_layer=v["experts_per_layer"],
               router=v["gate_type"], router_hidden=v["gating_size"], router_act="gelu",
               router_bias=v["gate_type"] == "mlp", router_dropout=v["gating_dropout"], sample_topk=v["sample_topk"],
               scoring="softmax_topk", norm_topk_prob=v["normalize_top_k"], aux_reduce=v["aux_reduce"],
               shared_experts=1 if v["residual_moe"] else 0, **aux)
    return MoEConfig.from_dict(cfg, spec.source)


def check_hf_fields(spec, dense_args):
    """The seed's config is a whole HF LLaMA config: its architecture fields must describe this checkpoint."""
    if not spec.hf_fields:
        return
    cfg = dict(spec.hf_fields)
    cfg.setdefault("model_type", "llama")
    params, _, _ = params_from_hf(cfg, spec.source)
    hf_args = ModelArgs.create(params, source=spec.source)
    for hf_key, field in _SHAPE_FIELDS:
        want, got = getattr(dense_args, field), getattr(hf_args, field)
        if want != got:
            raise UserError("%s: %s = %d disagrees with the checkpoint's %s = %d" % (spec.source, hf_key, got,
                                                                                     field, want))


def upcycled_args(dense_args, spec):
    """ModelArgs of the converted model: the dense model's, with the MoE section (placement checked here)."""
    if dense_args.moe is not None:
        raise UserError("the checkpoint is already a mixture of experts (layers %s); upcycle a dense LLaMA"
                        % list(dense_args.moe_layer_ids()))
    check_hf_fields(spec, dense_args)
    cfg = moe_config(spec)
    n = dense_args.n_layers
    if spec.moe_layers is not None:
        bad = [i for i in spec.moe_layers if not 0 <= i < n]
        if bad:
            raise UserError("%s: moe_layers names layer %d; the model has layers 0..%d" % (spec.source, bad[0], n - 1))
    elif spec.moe_start_layer >= n:
        raise UserError("%s: moe_start_layer = %d is beyond the model's %d layers (0..%d): no layer would become MoE"
                        % (spec.source, spec.moe_start_layer, n, n - 1))
    ids = cfg.moe_layer_ids(n) if spec.experts_per_layer is None else \
        dataclasses.replace(cfg, experts_per_layer=None).moe_layer_ids(n)
    if not ids:
        raise UserError("%s: moe_layers is empty: no layer would become MoE" % spec.source)
    if spec.experts_per_layer is not None and len(spec.experts_per_layer) != len(ids):
        raise UserError("%s: experts_per_layer has %d counts for the %d MoE layers %s"
                        % (spec.source, len(spec.experts_per_layer), len(ids), ids))
    return dataclasses.replace(dense_args, moe=cfg)


# ------------------------------------------------------------------------------------------------ counts
def router_params(cfg, d, E):
    """Parameters of one freshly initialised router (linear E·d; mlp d·h + h + h·E; gmm h·d + E·h + 1)."""
    h = cfg.router_hidden
    return {"linear": E * d + (E if cfg.router_bias else 0),
            "mlp": d * h + (h if cfg.router_bias else 0) + h * E,
            "gmm": h * d + E * h + 1}[cfg.router]


def closed_form(dense_args, args):
    """Upcycling's own closed form, independent of the model tables: each MoE layer l adds (E_l − 1 + s) copies of
    the dense FFN (g·d·F parameters; s = 1 shared expert with residual MoE) and a router R_l; a token uses
    (k − 1 + s) extra copies and the router."""
    d, F, g = dense_args.dim, dense_args.ffn_hidden_dim, 3 if dense_args.ffn_gated else 2
    a, hd, H, Hkv = dense_args, dense_args.head_dim, dense_args.n_heads, dense_args.n_kv_heads
    attn = d * hd * 2 * (H + Hkv) + (hd * (H + 2 * Hkv) if a.attn_bias else 0)
    dense_total = a.vocab_size * d * (1 if a.tie_word_embeddings else 2) + d + a.n_layers * (attn + 2 * d + g * d * F)
    cfg, s = args.moe, args.moe.shared_experts
    ids = list(args.moe_layer_ids())
    experts = [cfg.experts_at(i, args.n_layers) for i in ids]
    routers = sum(router_params(cfg, d, E) for E in experts)
    total = dense_total + sum(E - 1 + s for E in experts) * g * d * F + routers
    active = dense_total + len(ids) * (cfg.top_k - 1 + s) * g * d * F + routers
    return {"dense": dense_total, "total": total, "active": active, "ffn": g * d * F, "routers": routers,
            "layers": ids, "experts": experts}


def report(dense_args, args):
    """The dry run's numbers: placement, the closed form, and the model tables' count (which must agree)."""
    from Models.param_count import param_shapes
    form = closed_form(dense_args, args)
    table = int(sum(int(np.prod(s)) for s in param_shapes(args).values()))
    dense_table = int(sum(int(np.prod(s)) for s in param_shapes(dense_args).values()))
    if table != form["total"] or dense_table != form["dense"]:
        raise AssertionError("closed form %d/%d disagrees with the parameter table %d/%d"
                             % (form["total"], form["dense"], table, dense_table))
    return form


def format_report(form, args, source):
    cfg = args.moe
    b = lambda n: "%s (%s)" % (format(n, ","), "%.2f B" % (n / 1e9) if n >= 1e9 else "%.2f M" % (n / 1e6))
    ids = form["layers"]
    same = len(set(form["experts"])) == 1
    lines = [
        "%s: dim %d, %d layers, FFN width %d (one FFN = %s parameters), vocab %d" % (
            source, args.dim, args.n_layers, args.ffn_hidden_dim, format(form["ffn"], ","), args.vocab_size),
        "MoE layers (%d of %d): %s" % (len(ids), args.n_layers, ", ".join(map(str, ids))),
        "experts per MoE layer: %s, top-%d, router %s (%s parameters in all)%s" % (
            form["experts"][0] if same else "/".join(map(str, form["experts"])), cfg.top_k, cfg.router,
            format(form["routers"], ","), ", plus one shared expert (residual MoE)" if cfg.shared_experts else ""),
        "parameters: dense %s -> upcycled %s total, %s active per token" % (
            b(form["dense"]), b(form["total"]), b(form["active"])),
        "  total = dense + %d added FFN copies x %s + routers %s" % (
            sum(E - 1 + cfg.shared_experts for E in form["experts"]), format(form["ffn"], ","),
            format(form["routers"], ",")),
    ]
    return lines


def read_params_only(path, vocab_size=None):
    """ModelArgs of a params.json / config.json (file, or the directory holding one) without reading weights."""
    if os.path.isdir(path):
        for name in ("params.json", "config.json"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise UserError("%s: neither params.json (Meta) nor config.json (Hugging Face) found" % path)
    over = {"vocab_size": vocab_size} if vocab_size else {}
    if os.path.basename(path) == "config.json" or _is_hf_config(path):
        args = ModelArgs.from_hf_config(path, **over)
    else:
        args = ModelArgs.from_params_json(path, **over)
    if args.vocab_size <= 0:
        raise UserError("%s: vocab_size %d (Meta's LLaMA-2 files leave it to the tokenizer): pass --vocab_size "
                        "(32000 for LLaMA-2)" % (path, args.vocab_size))
    return args, path


def _is_hf_config(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and ("hidden_size" in d or "model_type" in d)


# ------------------------------------------------------------------------------------------------ after training
def expert_spread(blocks):
    """How far a layer's copied experts have moved apart: `blocks` is a list of [E, ...] arrays (each expert's slice
    of w1, w3, w2); returns {"distance": mean pairwise ‖v_a − v_b‖ / mean ‖v_e‖, "cosine": mean pairwise cosine}
    over the experts' concatenated weights (0 and 1 right after upcycling without noise)."""
    E = blocks[0].shape[0]
    v = np.concatenate([np.asarray(b, np.float64).reshape(E, -1) for b in blocks], 1)
    norms = np.linalg.norm(v, axis=1)
    pairs = [(a, b) for a in range(E) for b in range(a + 1, E)]
    if not pairs:
        return {"distance": 0.0, "cosine": 1.0}
    dist = np.mean([np.linalg.norm(v[a] - v[b]) for a, b in pairs]) / max(norms.mean(), 1e-30)
    cos = np.mean([v[a] @ v[b] / max(norms[a] * norms[b], 1e-30) for a, b in pairs])
    return {"distance": float(dist), "cosine": float(cos)}
