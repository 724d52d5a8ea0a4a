"""Mixture of Adapters assembly (docs/moa.md §3–§4): which adapters each block gets for a `routing` variant, the
analytic trainable-parameter count of §4.2, auxiliary losses, and routing-weight recording for dumps (§9, D10).
"""
import numpy as np

from Models.adapters import MOELoraLayer, PAdapterLayer, SparseMoELoraLayer, attach_prompt, linear
from Models.model_args import format_layers
from Models.routing import TARGET_ATTR, TYPE_LABELS, TYPE_ORDER, Gamma, make_type_router
from Models.variants import experts_of, variant
from Utils.errors import UserError

ATTN_TARGETS = ("Q", "K", "V", "O")


def _target_dims(args, target):
    # q and o span H·head_dim, which differs from dim when head_dim is set apart (Qwen3: 4096 vs 32·128 = 4096 at
    # 8B, but 1024 vs 16·128 = 2048 at 0.6B)
    d, dq, dkv, F = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return {"Q": (d, dq), "K": (d, dkv), "V": (d, dkv), "O": (dq, d),
            "FFN_UP": (d, F), "FFN_GATE": (d, F), "FFN_DOWN": (F, d)}[target]


def layer_types(args, layer_id):
    """Adapter types present in a layer, in the fixed type-column order (docs/moa.md §3.1)."""
    present = set()
    if layer_id in args.lora_layers:
        present.update(TARGET_ATTR[t] for t in args.lora_targets)
    if layer_id in args.prompt_layers:
        present.add("prompt")
    if layer_id in args.p_adapter_layers:
        present.add("p_adapter")
    return [t for t in TYPE_ORDER if t in present]


def _lora_for(args, target):
    i, o = _target_dims(args, target)
    if variant(args.routing).sparse_lora and args.expert_num > 1:
        return SparseMoELoraLayer(i, o, args.lora_rank, args.lora_alpha, args.expert_num, args.routing,
                                  args.top_k, args.noisy_router)
    return MOELoraLayer(i, o, args.lora_rank, args.lora_alpha, experts_of(args), args.hydra_moe)


def attach_adapters(llama, args):
    """Create every adapter, router and threshold of `args.routing` in the selected layers (fp32 parameters)."""
    for layer_id, block in enumerate(llama.layers):
        types = layer_types(args, layer_id)
        if layer_id in args.lora_layers:
            for target in args.lora_targets:
                if target not in ATTN_TARGETS and block.is_moe:
                    raise UserError("lora_targets: %s cannot attach to layer %d, whose FFN is a mixture of experts "
                                    "(MoE layers: %s); use attention targets, prompts or the parallel adapter there, "
                                    "or leave the MoE layers out of --lora_layers"
                                    % (target, layer_id, format_layers(args.moe_layer_ids())))
                owner = block.attention if target in ATTN_TARGETS else block.feed_forward
                setattr(owner, TARGET_ATTR[target], _lora_for(args, target))
        if layer_id in args.prompt_layers:
            attach_prompt(block.attention, args)
        if layer_id in args.p_adapter_layers:
            block.p_adapter = PAdapterLayer(args.dim, args.p_adapter_size, experts_of(args), args.p_adapter_hydra)
        if not types:
            continue  # D12: a block with no adapters has no router
        v = variant(args.routing)
        block.routing_kind = v.block_route or None
        if v.type_routed:
            block.type_columns = {t: i for i, t in enumerate(types)}
            block.adapter_type_router = make_type_router(args.dim, len(types), args.swi_x)
            if v.threshold:
                block.adapter_threshold_fn = Gamma(args.dim, args.max_threshold, args.const_threshold)
                block.threshold_grad = args.threshold_grad
        elif v.family_gates:
            block.lora_gate = linear(args.dim, 1)
            block.prompt_gate = linear(args.dim, 1)
            block.p_adapter_gate = linear(args.dim, 1)


def collect_aux_losses(llama):
    """Σ of the load-balance losses of every Top-K / AdaMoLE module in the last training forward (docs/moa.md §3.6)."""
    total = None
    for m in llama.modules():
        lb = getattr(m, "_lb_loss", None)
        if lb is not None:
            total = lb if total is None else total + lb
            m._lb_loss = None
    return total


def count_trainable_params(args):
    """Trainable parameters by the closed forms of docs/moa.md §4.2 — no model is built (works for 8B in
    microseconds)."""
    d, H, E, r, P, S = args.dim, args.n_heads, args.expert_num, args.lora_rank, args.prompt_len, args.p_adapter_size
    v = variant(args.routing)
    total = 0
    for layer_id in range(args.n_layers):
        if layer_id in args.lora_layers:
            for t in args.lora_targets:
                i, o = _target_dims(args, t)
                if E == 1 or not v.expert_adapters:
                    total += r * (i + o)
                elif v.sparse_lora:   # router (+ noise router) per target; AdaMoLE adds its threshold Linear(i, 1)
                    total += E * r * (i + o) + (i * E + E) * (2 if args.noisy_router else 1)
                    total += (i + 1) if args.routing == "adamole" else 0
                elif args.hydra_moe:
                    total += r * i + E * r * o + i * E
                else:
                    total += E * r * (i + o) + i * E
        pe = experts_of(args)
        if layer_id in args.prompt_layers:
            total += P * d + H if pe == 1 else pe * P * d + H + (d * pe + pe)
        if layer_id in args.p_adapter_layers:
            if pe == 1:
                total += 2 * d * S + S + d
            elif args.p_adapter_hydra:
                total += (d * S + S) + pe * (S * d + d) + (d * pe + pe)
            else:
                total += pe * (d * S + S) + pe * (S * d + d) + (d * pe + pe)
        n = len(layer_types(args, layer_id))
        if n and v.type_routed:
            s = args.swi_x
            total += d * n + n if s == 0 else 2 * (d * s * n + s * n) + (s * n * n + n)
            if v.threshold and not args.const_threshold:
                total += d + 1
        if n and v.family_gates:
            total += 3 * (d + 1)
    if args.w_bias:  # norms (two per block and the final one) and any base biases train too
        kv = args.n_kv_heads * args.head_dim
        total += (2 * args.n_layers + 1) * d + (args.n_layers * (args.n_heads * args.head_dim + 2 * kv)
                                                if args.attn_bias else 0)
        total += 2 * args.n_layers * args.head_dim if args.qk_norm else 0
    return total


# ---------------------------------------------------------------------------- routing-weight recording
def set_routing_record(model, on=True):
    """Turn recording of routing weights on or off (outputs are unchanged either way)."""
    for m in model.llama.modules():
        if hasattr(m, "_record"):
            m._record = bool(on)
            if not on:
                if hasattr(m, "_last_route"):
                    m._last_route = None
                if hasattr(m, "_last_weights"):
                    m._last_weights = None


def type_labels(args, layer_id):
    """Plot labels of a layer's type-weight columns (LoRA-Q, ..., Prompt, PAdapter)."""
    return [TYPE_LABELS[t] for t in layer_types(args, layer_id)]


def get_routing_records(model):
    """Routing weights of the last forward, as numpy, per layer:

    {layer: {"type": [B, T|1, n] float32 (masked for sparse MoA; UniPEFT: [B,1,3] gates) or None,
             "threshold": [B, T, 1] or None, "active": [B, T] int (sparse MoA active-type count) or None,
             "experts": {module path: [B, T, E] float32} for multi-expert LoRA / PA / MoE-LoRA modules}}
    """
    records = {}
    for layer_id, block in enumerate(model.llama.layers):
        rec = {"type": None, "threshold": None, "active": None, "experts": {}}
        if block._last_route is not None:
            w, g, mask = block._last_route
            rec["type"] = w.numpy().astype(np.float32)
            if g is not None:
                rec["threshold"] = g.numpy().astype(np.float32)
            if mask is not None:
                rec["active"] = mask.numpy().sum(-1).astype(np.int64)
        for name, m in block.named_modules():
            lw = getattr(m, "_last_weights", None)
            if lw is not None:
                rec["experts"][name] = lw.numpy().astype(np.float32)
        records[layer_id] = rec
    return records
