#!/usr/bin/env python
"""MoE core: one MoEFeedForward layer (router → select → dispatch → experts), forward and forward+backward time of
the grouped CPU expert kernel vs. its Jittor fall-back (per-expert slices after a host sync), in one process.

The paths are switched through Models.kernel_config.KERNELS.grouped_experts (what MOA_GROUPED_EXPERTS=0 sets). A third
record, "dense", runs every expert on every token (E/k times the expert FLOPs), the graph-static alternative
docs/jittor_notes.md A8 mentions. Backward = jt.grad of Σ y·R w.r.t. x, the expert weights and the router weight.

Records "moe_experts", one per path: path, tokens, d, experts, top_k, expert_hidden, rounds, fwd_ms / fwd_bwd_ms
(median over --rounds alternating rounds of the median of --reps after --warmup), build_ms (Python time to build
the forward+backward graph before the sync: the fall-back's host sync shows up here), expert_gflops (fwd+bwd expert
matmul FLOPs of the routed assignments / fwd_bwd time), ratio_to_kernel / fwd_ratio_to_kernel (this path's time /
the kernel's), matmul_peak_gflops (the machine's fp32 matmul peak, measured first).

On a shared machine, OMP_NUM_THREADS=1 gives steadier numbers (2-thread OpenMP barriers wait for preempted threads).

Standard shape:  python bench/moe_experts.py           (N = 1024 tokens, d 512, E 8, k 2, F 1024, SwiGLU)
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Parser, bounded, emit, jittor, log, matmul_peak, median_time, setup_output  # noqa: E402
from Utils.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None):
    p = Parser(__doc__)
    p.add_argument("--tokens", type=bounded(int, "tokens"), default=1024)
    p.add_argument("--dim", type=bounded(int, "dim"), default=512)
    p.add_argument("--experts", type=bounded(int, "experts"), default=8)
    p.add_argument("--top_k", type=bounded(int, "top_k"), default=2)
    p.add_argument("--expert_hidden", type=bounded(int, "expert_hidden"), default=1024)
    p.add_argument("--reps", type=bounded(int, "reps"), default=10)
    p.add_argument("--warmup", type=bounded(int, "warmup", minimum=1), default=3)
    p.add_argument("--rounds", type=bounded(int, "rounds"), default=3)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    setup_output()
    jt = jittor()
    import numpy as np
    from Models.moe import MoEConfig, MoEFeedForward
    from Models.moe.dispatch import dense_reference
    from Models.kernel_config import KERNELS

    jt.set_global_seed(ns.seed)
    cfg = MoEConfig(num_experts=ns.experts, top_k=ns.top_k, expert_hidden=ns.expert_hidden)
    layer = MoEFeedForward(ns.dim, cfg)
    rng = np.random.default_rng(ns.seed)
    B = 4 if ns.tokens % 4 == 0 else 1
    x = jt.array(rng.standard_normal((B, ns.tokens // B, ns.dim)).astype(np.float32))
    R = jt.array(rng.standard_normal((B, ns.tokens // B, ns.dim)).astype(np.float32))
    params = [x, layer.router.gate.weight] + layer.experts._weights()
    peak = matmul_peak(1024, 3)

    def forward(path):
        if path == "dense":
            flat = x.reshape(-1, ns.dim)
            sel = layer.route(flat, group_size=ns.tokens // B)
            return dense_reference(flat, sel, layer.experts.run, ns.experts).reshape(x.shape)
        return layer(x)

    flops = 3 * 3 * 2.0 * ns.tokens * ns.top_k * ns.dim * ns.expert_hidden   # 3 matmuls, fwd + 2× bwd
    paths = ("kernel", "fallback", "dense")
    times = {path: {"fwd": [], "fwd_bwd": [], "build": []} for path in paths}
    for r in range(ns.rounds):                                          # alternate: a busy machine drifts
        for path in paths:
            KERNELS.grouped_experts = path != "fallback"
            build = [0.0]

            def fwd():
                jt.sync([forward(path)])

            def fwd_bwd():
                t0 = time.perf_counter()
                grads = jt.grad((forward(path) * R).sum(), params)
                build[0] = time.perf_counter() - t0
                jt.sync(list(grads))

            times[path]["fwd"].append(median_time(fwd, ns.reps, ns.warmup))
            times[path]["fwd_bwd"].append(median_time(fwd_bwd, ns.reps, ns.warmup))
            times[path]["build"].append(build[0])
            layer.pop_selection()
            jt.sync_all()
            jt.gc()
            log("round", r, path, "%.1f ms" % (1e3 * times[path]["fwd_bwd"][-1]))
    med = {path: {k: 1e3 * statistics.median(v) for k, v in t.items()} for path, t in times.items()}
    for path in paths:
        m = med[path]
        emit(dict(bench="moe_experts", path=path, tokens=ns.tokens, d=ns.dim, experts=ns.experts, top_k=ns.top_k,
                  expert_hidden=ns.expert_hidden, rounds=ns.rounds, fwd_ms=m["fwd"], fwd_bwd_ms=m["fwd_bwd"],
                  build_ms=m["build"], expert_gflops=flops / (m["fwd_bwd"] / 1e3) / 1e9,
                  ratio_to_kernel=m["fwd_bwd"] / med["kernel"]["fwd_bwd"],
                  fwd_ratio_to_kernel=m["fwd"] / med["kernel"]["fwd"],
                  matmul_peak_gflops=peak["matmul_peak_gflops"]))

if __name__ == "__main__":
    main()
