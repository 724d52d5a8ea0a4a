#!/usr/bin/env python
"""Sparse vs. soft MoA: training-step time of sparse_moa as a function of the fraction of active (token, adapter)
pairs, plus one soft_moa line with the same adapters for comparison.

How a fraction f is forced (Models/routing.py): sparse MoA keeps adapter type j on token t when σ(z_tj) ≥ Γ_t,
z = the type router's logits, Γ_t = Γ_max·σ(W_Γ x_t + b_Γ) (Γ_max with --const_threshold true), i.e. when
z_tj − logit(Γ_t) ≥ 0. On the benchmark batch, layer by layer (each layer's input computed with the layers
before it already calibrated), we compute s_tj = z_tj − logit(Γ_t) and add to the router's output bias (the
Linear's bias, or the SwiGLU router's w2 bias) δ_j = −(midpoint between the k-th and (k+1)-th largest s_tj),
k = round(f·B·T): exactly k tokens of every type (every adapter) are routed in every layer. f = 1 takes the
"every token selected" path of SparseTypeRoute (no gather); 0 < f < 1 the gather → adapter → scatter path.
The learning rate defaults to 0 so the routing stays exactly as calibrated (AdamW still computes the full update).
The actual fraction is measured after the timed steps from the routing records (Models.moa.set_routing_record /
get_routing_records: the per-token active-type counts) over the same batch.

Records "sparse_scaling", one per configuration (soft_moa first, then each fraction): routing, target_fraction
(null for soft), actual_active_fraction (Σ active pairs / Σ B·T·n_types over the routed layers; 1 for soft),
active_fraction_per_layer, tokens_per_s, sec_per_step (median of the timed steps) and the other step statistics
of train_step.py (step times, step1_s/step2_s, new kernels per step), relative_to_soft (= sec_per_step /
soft's), final_loss, the shape, adapter configuration and trainable_params.

Standard shape:  python bench/sparse_scaling.py            (the moa preset: LoRA Q,K,V,O,FFN_DOWN r8 + prompt 10
                                                            + parallel adapter 16, SwiGLU router swi_x 4)
Tiny:            python bench/sparse_scaling.py --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --vocab_size 1000
                     --multiple_of 32 --batch 2 --seq_len 32 --steps 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils.errors import UserError, cli_main  # noqa: E402


def fraction_list(s):
    try:
        vals = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise UserError("--fractions: %r is not a comma list of numbers" % s)
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise UserError("--fractions: %r must list numbers in [0, 1]" % s)
    return vals


def build_parser():
    p = C.Parser(__doc__)
    C.add_model_flags(p)
    p.set_defaults(preset="moa")
    g = C.add_train_workload(p, scope=" per configuration")
    g.add_argument("--fractions", type=fraction_list, default=fraction_list("0.1,0.25,0.5,0.75,1.0"),
                   help="target fractions of active (token, adapter) pairs (default 0.1,0.25,0.5,0.75,1.0)")
    g.add_argument("--lr", type=C.bounded(float, "lr", 0), default=0.0,
                   help="AdamW learning rate (default 0: the calibrated routing stays fixed)")
    C.add_compile_flag(p)
    return p


def router_output_linear(block):
    r = block.adapter_type_router
    return r.w2 if hasattr(r, "w2") else r  # SwiGLU Router (swi_x > 0) or Linear(d → n)


def calibrate(model, tokens, fraction, original_bias):
    """Shift every sparse block's router bias so that round(fraction·B·T) tokens route to each adapter type."""
    import numpy as np
    jt = C.jittor()
    from Models.llama import causal_mask
    llama = model.llama
    T = tokens.shape[1]
    with jt.no_grad():
        h = llama.tok_embeddings(jt.array(tokens))
        cos, sin, mask = llama._cos[0:T], llama._sin[0:T], causal_mask(T, 0)
        for i, block in enumerate(llama.layers):
            if block.routing_kind == "sparse_moa":
                lin = router_output_linear(block)
                lin.bias.update(jt.array(original_bias[i]))
                z = block.adapter_type_router(h.float32()).numpy().astype(np.float64)      # [B, T, n]
                g = block.adapter_threshold_fn(h).numpy().astype(np.float64)              # [B, T, 1]
                s = (z - (np.log(g) - np.log1p(-g))).reshape(-1, z.shape[-1])             # z − logit(Γ)
                n_rows = s.shape[0]
                k = int(round(fraction * n_rows))
                srt = -np.sort(-s, axis=0)                                                 # descending per type
                if k == 0:
                    delta = -srt[0] - 1.0
                elif k == n_rows:
                    delta = -srt[-1] + 1.0
                else:
                    delta = -(srt[k - 1] + srt[k]) / 2.0
                lin.bias.update(jt.array((original_bias[i] + delta).astype(np.float32)))
            h = block(h, 0, cos, sin, mask)
        h.sync()


def active_fraction(model, tokens):
    """(overall, per layer) fraction of active (token, type) pairs in a forward over `tokens`."""
    jt = C.jittor()
    from Models.moa import get_routing_records, set_routing_record
    set_routing_record(model, True)
    with jt.no_grad():
        model.llama.hidden_states(jt.array(tokens)).sync()
    recs = get_routing_records(model)
    set_routing_record(model, False)
    active = total = 0
    per_layer = {}
    for layer, r in recs.items():
        if r["active"] is None:
            continue
        a, n = int(r["active"].sum()), int(r["type"].size)
        per_layer[str(layer)] = a / n
        active += a
        total += n
    return (active / total if total else None), per_layer


def run_config(ns, margs, tokens, lr, counter, fractions=None):
    """Build the model once; soft: one record; sparse: one record per fraction."""
    model = C.build_model(margs, ns.seed)
    base = C.run_record(margs, model, ns.seed)
    records = []
    original_bias = {i: router_output_linear(b).bias.numpy().copy() for i, b in enumerate(model.llama.layers)
                     if b.routing_kind == "sparse_moa"}
    for f in (fractions if fractions is not None else [None]):
        if f is not None:
            calibrate(model, tokens, f, original_bias)
            C.log("sparse_moa: target active fraction %.3f" % f)
        times, losses, compiles = C.train_steps(model, tokens, ns.warmup + ns.steps, lr, C.WEIGHT_DECAY, counter)
        stats = C.step_stats(times, compiles, ns.warmup)
        if f is None:
            actual, per_layer = 1.0, {}
        else:
            actual, per_layer = active_fraction(model, tokens)
            C.log("sparse_moa: actual active fraction %.4f, %.3fs/step" % (actual, stats["sec_per_step"]))
        records.append(dict(bench="sparse_scaling", **base, batch=ns.batch, seq_len=ns.seq_len, steps=ns.steps,
                            warmup=ns.warmup, lr=lr, target_fraction=f, actual_active_fraction=actual,
                            active_fraction_per_layer=per_layer,
                            tokens_per_s=ns.batch * ns.seq_len / stats["sec_per_step"], **stats,
                            final_loss=losses[-1]))
    C.free_model(model)
    return records


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    if ns.routing is not None:
        raise UserError("--routing: sparse_scaling.py runs sparse_moa and soft_moa itself; leave it out")
    sparse = C.model_args(ns, max_seq_len=ns.seq_len, routing="sparse_moa")
    soft = C.model_args(ns, max_seq_len=ns.seq_len, routing="soft_moa")
    if not 0.0 < sparse.max_threshold < 1.0:
        raise UserError("--max_threshold must be in (0, 1) to force a fraction (got %g)" % sparse.max_threshold)
    C.require_adapters(sparse)
    C.setup_output()
    C.jittor()
    counter = C.CompileCounter(ns.count_compiles)
    tokens = C.random_tokens(sparse.vocab_size, ns.batch, ns.seq_len, ns.seed)
    soft_rec = run_config(ns, soft, tokens, ns.lr, counter)[0]
    soft_rec["relative_to_soft"] = 1.0
    C.emit(soft_rec)
    for rec in run_config(ns, sparse, tokens, ns.lr, counter, ns.fractions):
        rec["relative_to_soft"] = rec["sec_per_step"] / soft_rec["sec_per_step"]
        C.emit(rec)
    counter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
