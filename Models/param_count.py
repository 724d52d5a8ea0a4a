"""Base-model parameter counts as closed formulas (total, and active per token for MoE) and the shape of every
base parameter, both from `ModelArgs` alone — no model is built, so an 8B configuration costs microseconds.

`param_shapes` is the table the checkpoint layouts (Models/hf_layout.py) are written against; `count_params` is the
closed form, tested against both the table and really built models (tests/test_param_counts.py). Adapter counts
are `Models.moa.count_trainable_params`.

With d = dim, V = vocab_size, H / Hkv = heads / KV heads, hd = head_dim, F = dense FFN width, g = 3 (gated FFN)
or 2, and per MoE layer E experts of widths F_e, k = top_k, router R, shared width S (n_shared·shared_hidden):

    total  = V·d·(1 if tied else 2) + d
             + Σ_layers [ d·hd·(2H + 2Hkv) + b·hd·(H + 2Hkv) + q·2hd + 2d + FFN_l ]
    dense FFN_l = g·d·F
    MoE   FFN_l = R + g·d·ΣF_e + g·d·S + s·d + z·E·d
    R = E·d (+E bias) | d·h + (h bias) + h·E (mlp) | P·d + E·P + 1 (gmm)
    active = total − Σ_MoE layers g·d·(ΣF_e − sum of the k largest F_e) − z·E·d

(b = 1 with q/k/v biases, q = 1 with q/k norms, s = 1 with the shared-expert gate, z = 1 with noisy gating, whose
noise projection only runs in training and so is not active.)
"""


def _ffn_mult(gated):
    return 3 if gated else 2


def layer_widths(args, layer_id):
    """(expert widths, shared width) of an MoE layer, or None for a dense layer."""
    if layer_id not in args.moe_layer_ids():
        return None
    moe = args.moe
    E = moe.experts_at(layer_id, args.n_layers)
    widths = moe.expert_widths(E, args.ffn_hidden_dim)
    shared = moe.shared_experts * (moe.shared_hidden or moe.expert_hidden or args.ffn_hidden_dim or max(widths)) \
        if moe.shared_experts else 0
    return widths, shared


def param_shapes(args):
    """{name: shape} of every base parameter of `Transformer(args)`, in the model's order (adapters excluded)."""
    d, hd, H, Hkv = args.dim, args.head_dim, args.n_heads, args.n_kv_heads
    out = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = "layers.%d." % i
        for name, rows in (("wq", H * hd), ("wk", Hkv * hd), ("wv", Hkv * hd)):
            out[p + "attention.%s.weight" % name] = (rows, d)
            if args.attn_bias:
                out[p + "attention.%s.bias" % name] = (rows,)
        out[p + "attention.wo.weight"] = (d, H * hd)
        if args.qk_norm:
            out[p + "attention.q_norm.weight"] = (hd,)
            out[p + "attention.k_norm.weight"] = (hd,)
        moe = layer_widths(args, i)
        f = p + "feed_forward."
        if moe is None:
            F = args.ffn_hidden_dim
            out[f + "w1.weight"] = (F, d)
            out[f + "w2.weight"] = (d, F)
            if args.ffn_gated:
                out[f + "w3.weight"] = (F, d)
        else:
            out.update(_moe_shapes(f, args, i, *moe))
        out[p + "attention_norm.weight"] = (d,)
        out[p + "ffn_norm.weight"] = (d,)
    out["norm.weight"] = (d,)
    if not args.tie_word_embeddings:
        out["output.weight"] = (args.vocab_size, d)
    return out


def _moe_shapes(f, args, layer_id, widths, shared):
    cfg, d = args.moe, args.dim
    E = len(widths)
    out = {}
    if cfg.router == "linear":
        out[f + "router.gate.weight"] = (E, d)
        if cfg.router_bias:
            out[f + "router.gate.bias"] = (E,)
    elif cfg.router == "mlp":
        out[f + "router.w1.weight"] = (cfg.router_hidden, d)
        if cfg.router_bias:
            out[f + "router.w1.bias"] = (cfg.router_hidden,)
        out[f + "router.w2.weight"] = (E, cfg.router_hidden)
    else:
        out.update({f + "router.proj.weight": (cfg.router_hidden, d), f + "router.centroids": (E, cfg.router_hidden),
                    f + "router.tau": (1,)})
    if cfg.noisy_gating:
        out[f + "noise.weight"] = (E, d)
    rows = sum(widths)
    out[f + "experts.w1"] = (rows, d)
    if cfg.gated:
        out[f + "experts.w3"] = (rows, d)
    out[f + "experts.w2"] = (rows, d)
    if shared:
        out[f + "shared.w1"] = (shared, d)
        if cfg.gated:
            out[f + "shared.w3"] = (shared, d)
        out[f + "shared.w2"] = (shared, d)
        if cfg.shared_gate:
            out[f + "shared.gate.weight"] = (1, d)
    return out


def count_params(args):
    """{"total": base parameters, "active": those a token uses at inference (MoE: router, shared experts and the
    k largest routed experts), "adapters": trainable adapter parameters} by the closed forms above."""
    from Models.moa import count_trainable_params
    d, V, hd, H, Hkv = args.dim, args.vocab_size, args.head_dim, args.n_heads, args.n_kv_heads
    total = V * d * (1 if args.tie_word_embeddings else 2) + d
    inactive = 0
    attn = d * hd * (2 * H + 2 * Hkv) + (hd * (H + 2 * Hkv) if args.attn_bias else 0) + (2 * hd if args.qk_norm else 0)
    for i in range(args.n_layers):
        total += attn + 2 * d
        moe = layer_widths(args, i)
        if moe is None:
            total += _ffn_mult(args.ffn_gated) * d * args.ffn_hidden_dim
            continue
        cfg, (widths, shared) = args.moe, moe
        E, g = len(widths), _ffn_mult(cfg.gated)
        router = {"linear": E * d + (E if cfg.router_bias else 0),
                  "mlp": d * cfg.router_hidden + (cfg.router_hidden if cfg.router_bias else 0) + cfg.router_hidden * E,
                  "gmm": cfg.router_hidden * d + E * cfg.router_hidden + 1}[cfg.router]
        noise = E * d if cfg.noisy_gating else 0
        total += router + noise + g * d * sum(widths) + g * d * shared + (d if shared and cfg.shared_gate else 0)
        inactive += noise + g * d * (sum(widths) - sum(sorted(widths)[-cfg.top_k:]))
    return {"total": total, "active": total - inactive, "adapters": count_trainable_params(args)}
