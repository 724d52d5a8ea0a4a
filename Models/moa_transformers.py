"""The official MoA_Transformers adapter layout (DCDmllm/MoA, HF peft `adapter_model.bin`) read into our model:
key renaming, the configuration read off the tensors, and the Q/K RoPE row permutation.

What the file holds and why is docs/moa_transformers_notes.md (§2, §6). Per decoder layer i, under
`base_model.model.model.layers.{i}.`: `self_attn.lora_{Q,K,V,O}.lora_{A,B}.weight`, `mlp.lora_down.lora_{A,B}.weight`,
`p_adapter.{down,up}_proj.{weight,bias}`, `adapter_type_router.{w1,w2,w3}.{weight,bias}` (SwiGLU router, swi_x > 0)
or `adapter_type_router.{weight,bias}` (linear), and for sparse MoA `adapter_threshold_fn.{weight,bias}`.
Their modeling files fix the rest, so the loader sets it: LoRA α = rank (scaling 1), Γ_max 0.5 learned without
gradient (`threshold_grad="none"`), no prompt, and the router and Γ reading the attention-normed state
(`router_input="normed"`). Their adapter_config.json is checked to be a soft/sparse MoA one and otherwise unused
(its lora_rank and target_modules never reach their model either).
"""
import json
import os
import re

from Models.hf_layout import permute_rows
from Models.model_args import format_layers
from Utils.errors import UserError

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)$")
_LORA = re.compile(r"^(self_attn\.lora_[QKVO]|mlp\.lora_down)\.(lora_[AB])\.weight$")
_TARGETS = {"self_attn.lora_Q": ("Q", "attention.lora_Q"), "self_attn.lora_K": ("K", "attention.lora_K"),
            "self_attn.lora_V": ("V", "attention.lora_V"), "self_attn.lora_O": ("O", "attention.lora_O"),
            "mlp.lora_down": ("FFN_DOWN", "feed_forward.lora_DOWN")}
_BLOCK = re.compile(r"^(p_adapter\.(down|up)_proj|adapter_type_router(\.w[123])?|adapter_threshold_fn)\.(weight|bias)$")
PEFT_TYPES = ("SOFTMOA", "SPARSEMOA")


def our_names(state, source):
    """{their key: tensor} → {our key: tensor}; a key that is not a soft/sparse MoA adapter key is an error."""
    out = {}
    for key, value in state.items():
        m = _KEY.match(key.replace(".default.", ".").replace(".default", ""))
        rest = m.group(2) if m else ""
        lora = _LORA.match(rest)
        if lora:
            out["llama.layers.%s.%s.%s.weight" % (m.group(1), _TARGETS[lora.group(1)][1], lora.group(2))] = value
        elif _BLOCK.match(rest):
            out["llama.layers.%s.%s" % (m.group(1), rest)] = value
        else:
            raise UserError("%s: key %r is not a MoA_Transformers soft/sparse MoA adapter key (expected "
                            "base_model.model.model.layers.<i>.{self_attn.lora_Q..O, mlp.lora_down, p_adapter, "
                            "adapter_type_router, adapter_threshold_fn}.*)" % (source, key))
    return out


def _check_config(config_path):
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError("%s: not readable JSON (%s)" % (config_path, str(e).splitlines()[0]))
    if not isinstance(cfg, dict):
        raise UserError("%s: expected a JSON object" % config_path)
    peft_type = cfg.get("peft_type")
    if peft_type is not None and str(peft_type).upper() not in PEFT_TYPES:
        raise UserError("%s: peft_type %r is not a MoA_Transformers soft/sparse MoA adapter (%s)"
                        % (config_path, peft_type, ", ".join(PEFT_TYPES)))


def infer_config(state, source, config_path):
    """ModelArgs overrides read off the tensors of a renamed state (our keys): routing, targets, layers, rank,
    parallel-adapter size, swi_x; plus the constants of their modeling files."""
    _check_config(config_path)
    per_layer, shapes = {}, {}
    for key, value in state.items():
        _, _, i, rest = key.split(".", 3)
        per_layer.setdefault(int(i), set()).add(rest)
        shapes[key] = tuple(value.shape)
    targets = {i: tuple(code for code, ours in _TARGETS.values() if ours + ".lora_A.weight" in keys)
               for i, keys in per_layer.items()}
    lora_layers = sorted(i for i, t in targets.items() if t)
    pa_layers = sorted(i for i, keys in per_layer.items() if "p_adapter.down_proj.weight" in keys)
    kinds = {targets[i] for i in lora_layers}
    if len(kinds) > 1:
        raise UserError("%s: LoRA targets differ between layers (%s): one target list for all layers"
                        % (source, sorted(kinds)))
    ranks = {shapes[k][0] for k in shapes if k.endswith("lora_A.weight")}
    sizes = {shapes[k][0] for k in shapes if k.endswith("p_adapter.down_proj.weight")}
    if len(ranks) > 1 or len(sizes) > 1:
        raise UserError("%s: LoRA ranks %s / parallel-adapter sizes %s differ between tensors"
                        % (source, sorted(ranks), sorted(sizes)))
    sparse = any("adapter_threshold_fn.weight" in keys for keys in per_layer.values())
    swi = set()
    for i, keys in per_layer.items():
        n = len(targets.get(i, ())) + (1 if i in pa_layers else 0)
        w1 = "llama.layers.%d.adapter_type_router.w1.weight" % i
        if w1 in shapes:
            if shapes[w1][0] % n:
                raise UserError("%s: %s has %d rows, not a multiple of the layer's %d adapter types"
                                % (source, w1, shapes[w1][0], n))
            swi.add(shapes[w1][0] // n)
        elif "adapter_type_router.weight" in keys:
            swi.add(0)
    if len(swi) > 1:
        raise UserError("%s: type routers of different sizes (swi_x %s) in one file" % (source, sorted(swi)))
    rank = ranks.pop() if ranks else 8
    cfg = dict(routing="sparse_moa" if sparse else "soft_moa", lora_layers=format_layers(lora_layers),
               lora_targets=",".join(_order(kinds.pop() if kinds else ())) or "Q", lora_rank=rank, lora_alpha=rank,
               p_adapter_layers=format_layers(pa_layers), p_adapter_size=sizes.pop() if sizes else 16,
               prompt_layers="0-0", swi_x=swi.pop() if swi else 0, max_threshold=0.5, const_threshold=False,
               threshold_grad="none", expert_num=1, hydra_moe=False, w_bias=False, router_input="normed")
    return cfg


def _order(targets):
    return [t for t in ("Q", "K", "V", "O", "FFN_DOWN") if t in targets]


def to_interleaved(state, args, source):
    """lora_B rows of Q and K (outputs per head, HF rotate-half) → our interleaved RoPE layout, as wq/wk are."""
    out = dict(state)
    for key, value in state.items():
        for target, heads in (("attention.lora_Q.lora_B.weight", args.n_heads),
                              ("attention.lora_K.lora_B.weight", args.n_kv_heads)):
            if key.endswith(target):
                if value.shape[0] != heads * args.head_dim:
                    raise UserError("%s: %s has %d rows, expected %d heads × head_dim %d"
                                    % (source, key, value.shape[0], heads, args.head_dim))
                out[key] = permute_rows(value, heads, inverse=True)
    return out
