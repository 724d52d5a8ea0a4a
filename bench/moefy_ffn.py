#!/usr/bin/env python
"""MoEfication's sparse FFN at decode shapes: the converted layer at k/E (default 4 of 16 = 25 %) against the dense
SwiGLU FFN it was cut from, one row per sequence (rows = batch), side by side in alternating rounds.

Three paths per batch size, same weights, under no_grad:
  dense    Models.ffn.FeedForward (the model's dense FFN; decoding uses the few-rows SwiGLU kernel + oneDNN w2)
  moe      MoEFeedForward from Experts.from_dense on a random equal split, MLP router (random weights, tanh,
           hidden E), scoring topk_unweighted — the decode-time path of Models/moe/decode.py
  generic  the same layer with that path off (MOA_FEW_ROWS_KERNEL's switch): select → sort-once dispatch →
           grouped expert kernel → gather back, the path training and long prompts use

The router's choices differ per row, so at batch B the rows together touch the union of their experts: the
`union_fraction` field is the mean share of experts (weight bytes) that a step reads; the expert FLOPs are k/E.

Records "moefy_ffn", one per batch size: rows, d, d_ff, experts, top_k, dense_ms, moe_ms, generic_ms (median over
--rounds of the median of --reps), ratio = dense_ms / moe_ms, ratio_generic = dense_ms / generic_ms,
union_fraction, dense_gbs / moe_gbs (weight bytes read per call / time), max_abs_diff (moe vs generic output).

Shapes: --dim 4096 --d_ff 11008 is LLaMA-2-7B's FFN (the default); --dim 512 --d_ff 1792 is bench/'s standard
model. On a shared machine, OMP_NUM_THREADS=1 gives steadier numbers.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Parser, bounded, emit, jittor, log, median_time, setup_output  # noqa: E402
from Utils.errors import UserError, cli_main  # noqa: E402


def _batches(text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1 or max(vals) > 64:
        raise UserError("--batches: %r is not a comma list of integers in 1..64" % (text,))
    return vals


@cli_main
def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--dim", type=bounded(int, "dim"), default=4096)
    p.add_argument("--d_ff", type=bounded(int, "d_ff"), default=11008)
    p.add_argument("--experts", type=bounded(int, "experts"), default=16)
    p.add_argument("--top_k", type=bounded(int, "top_k"), default=4)
    p.add_argument("--batches", type=_batches, default=[1, 2, 4, 8])
    p.add_argument("--reps", type=bounded(int, "reps"), default=20)
    p.add_argument("--warmup", type=bounded(int, "warmup"), default=5)
    p.add_argument("--rounds", type=bounded(int, "rounds"), default=5)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    if ns.d_ff % ns.experts or ns.top_k > ns.experts:
        raise UserError("--experts %d must divide --d_ff %d and be >= --top_k %d" % (ns.experts, ns.d_ff, ns.top_k))
    setup_output()
    jt = jittor()
    import numpy as np
    from Models.ffn import FeedForward
    from Models.kernel_config import KERNELS
    from Models.llama import NO_ROUTE
    from Models.model_args import ModelArgs
    from Models.moe.experts import Experts
    from Models.moe.layer import MoEFeedForward
    from Models.moefication.convert import moe_config

    jt.set_global_seed(ns.seed)
    args = ModelArgs(dim=ns.dim, n_layers=1, n_heads=8, intermediate_size=ns.d_ff, vocab_size=16)
    dense = FeedForward(args)
    rng = np.random.default_rng(ns.seed)
    for lin in (dense.w1, dense.w3, dense.w2):   # LLaMA-like scale: activations neither vanish nor saturate
        lin.weight.update(jt.array((rng.standard_normal(lin.weight.shape) * 0.02).astype(np.float32)))
    layer = MoEFeedForward(ns.dim, moe_config(args, ns.experts, ns.top_k, [0]))
    labels = rng.permutation(np.repeat(np.arange(ns.experts), ns.d_ff // ns.experts))
    layer.experts = Experts.from_dense(dense.w1.weight, dense.w3.weight, dense.w2.weight, ns.experts, labels)
    layer.eval()
    weight_bytes = 3 * ns.dim * ns.d_ff * 4
    with jt.no_grad():
        for B in ns.batches:
            x = jt.array(rng.standard_normal((B, 1, ns.dim)).astype(np.float32))
            z = layer.router(x.reshape(B, ns.dim)).numpy()
            top = np.argsort(-z, axis=1, kind="stable")[:, :ns.top_k]
            union = len(np.unique(top)) / ns.experts
            paths = {"dense": lambda: dense(x, NO_ROUTE).sync(), "moe": lambda: layer(x).sync(),
                     "generic": lambda: layer(x).sync()}
            times = {k: [] for k in paths}
            for r in range(ns.rounds):                       # alternate: a busy machine drifts
                for name, fn in paths.items():
                    KERNELS.few_rows = name != "generic"
                    times[name].append(median_time(fn, ns.reps, ns.warmup))
                KERNELS.few_rows = True
                log("B=%d round %d: %s" % (B, r, ", ".join("%s %.3f ms" % (k, 1e3 * v[-1])
                                                             for k, v in times.items())))
            fast = layer(x).numpy()
            KERNELS.few_rows = False
            slow = layer(x).numpy()
            KERNELS.few_rows = True
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            emit(dict(bench="moefy_ffn", rows=B, d=ns.dim, d_ff=ns.d_ff, experts=ns.experts, top_k=ns.top_k,
                      rounds=ns.rounds, dense_ms=med["dense"], moe_ms=med["moe"], generic_ms=med["generic"],
                      ratio=med["dense"] / med["moe"], ratio_generic=med["dense"] / med["generic"],
                      union_fraction=union, dense_gbs=weight_bytes / med["dense"] / 1e6,
                      moe_gbs=weight_bytes * union / med["moe"] / 1e6,
                      max_abs_diff=float(np.abs(fast - slow).max())))
            jt.sync_all()
            jt.gc()


if __name__ == "__main__":
    main()
