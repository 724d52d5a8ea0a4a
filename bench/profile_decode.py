#!/usr/bin/env python
"""Where a decode step goes: Jittor ops per step, their kernel time (jt.profile_scope), graph nodes and wall time,
with the decode-time kernels switched on and off in turn (MOA_FUSED_ADAPTERS by default), in one process.

The model has random weights (the standard shape unless told otherwise; --preset moa / sparse_moa for adapters,
none for the base). Per switch setting and round: a cached prefill of --batch × --prompt_len tokens, then --steps
timed decode steps (wall and process CPU time per step), then --profiled_steps steps under jt.profile_scope. Rounds
alternate the settings, so a shared machine's drift hits both.

Record "profile_decode" per setting: switch, on, ops_per_step (kernels run), kernel_ms_per_step (their summed
time), graph_ops_per_step (nodes a step adds to Jittor's graph, reshapes and views included), wall_ms_median /
wall_ms_min and cpu_ms_median over all rounds, python_build_ms_median (building the step's graph, before it
runs), top (the --top costliest kernels: name, calls per step, µs per step).

Standard shape:  python bench/profile_decode.py --preset moa [--rounds 3]
Tiny:            python bench/profile_decode.py --preset moa --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2
                     --vocab_size 1000 --multiple_of 32 --batch 2 --prompt_len 16 --steps 4
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils import cli  # noqa: E402
from Utils.errors import UserError, cli_main  # noqa: E402


def build_parser():
    p = C.Parser(__doc__)
    C.add_model_flags(p, renames={"prompt_len": "adapter_prompt_len"})
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=C.bounded(int, "batch"), default=8, help="sequences decoded together (default 8)")
    g.add_argument("--prompt_len", type=C.bounded(int, "prompt_len"), default=64, help="prefill length (default 64)")
    g.add_argument("--steps", type=C.bounded(int, "steps"), default=24, help="timed decode steps per round (24)")
    g.add_argument("--profiled_steps", type=C.bounded(int, "profiled_steps"), default=6,
                   help="decode steps under jt.profile_scope, last round (default 6)")
    g.add_argument("--rounds", type=C.bounded(int, "rounds"), default=3,
                   help="rounds, each timing every switch setting in turn (default 3)")
    g.add_argument("--switch", default="fused_adapters",
                   help="the Models.kernel_config field compared on vs off (default fused_adapters)")
    g.add_argument("--top", type=C.bounded(int, "top", 0), default=8, help="costliest kernels listed (default 8)")
    cli.add_bool(p, "both", True, "compare the switch on and off (false: on only)")
    return p


def _decode(llama, jt, tokens, start, n, timed):
    """n cached one-token steps from position `start`: [(wall s, cpu s, python build s)] when timed."""
    out = []
    for pos in range(start, start + n):
        w0, c0 = time.perf_counter(), time.process_time()
        logits = llama(jt.array(tokens[:, :1]), start_pos=pos, use_cache=True, last_only=True)
        b = time.perf_counter() - w0
        logits.numpy()
        if timed:
            out.append((time.perf_counter() - w0, time.process_time() - c0, b))
    return out


def _graph_ops(llama, jt, tokens, pos):
    """Nodes one decode step adds to Jittor's graph before it runs."""
    jt.sync_all()
    before = jt.liveness_info()["lived_ops"]
    logits = llama(jt.array(tokens[:, :1]), start_pos=pos, use_cache=True, last_only=True)
    n = jt.liveness_info()["lived_ops"] - before
    logits.sync()
    return n


def _profile(llama, jt, tokens, start, n, top):
    with jt.profile_scope(warmup=0, rerun=0) as rep:
        _decode(llama, jt, tokens, start, n, False)
    hdr, rows = rep[0], rep[1:]
    ti, ci = hdr.index("TotalTime"), hdr.index("Count")
    rows = sorted(rows, key=lambda r: -float(r[ti]))
    listed = [{"kernel": r[0].split("\n")[0][:100], "calls_per_step": int(r[ci]) / n,
               "us_per_step": float(r[ti]) / n / 1e3} for r in rows[:top]]
    return (sum(int(r[ci]) for r in rows) / n, sum(float(r[ti]) for r in rows) / n / 1e6, listed)


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    total = ns.prompt_len + 2 + ns.rounds * ns.steps + ns.profiled_steps + 8
    margs = C.model_args(ns, max_seq_len=total)
    jt = C.jittor()
    from Models import kernel_config
    if not hasattr(kernel_config.KERNELS, ns.switch):
        raise UserError("--switch: %r is not a Models.kernel_config field" % ns.switch)
    C.setup_output()
    model = C.build_model(margs, ns.seed)
    model.eval()
    llama = model.llama
    tokens = C.random_tokens(margs.vocab_size, ns.batch, ns.prompt_len, ns.seed)
    settings = (True, False) if ns.both else (True,)
    times = {on: [] for on in settings}
    found = {}
    with jt.no_grad():
        for r in range(ns.rounds):
            for on in settings:
                with kernel_config.override(**{ns.switch: on}):
                    llama(jt.array(tokens), start_pos=0, use_cache=True, last_only=True).sync()
                    pos = ns.prompt_len
                    _decode(llama, jt, tokens, pos, 2, False)                 # compile, warm caches
                    times[on] += _decode(llama, jt, tokens, pos + 2, ns.steps, True)
                    if r == ns.rounds - 1:
                        pos += 2 + ns.steps
                        before = kernel_config.used[ns.switch]
                        graph = _graph_ops(llama, jt, tokens, pos)
                        prof = _profile(llama, jt, tokens, pos + 1, ns.profiled_steps, ns.top)
                        found[on] = (graph, prof, kernel_config.used[ns.switch] - before)
                llama.free_caches()
    for on in settings:
        graph, (ops, kernel_ms, top), used = found[on]
        t = times[on]
        C.emit(dict(bench="profile_decode", **C.run_record(margs, model, ns.seed), batch=ns.batch,
                    prompt_len=ns.prompt_len, switch=ns.switch, on=on, switch_used_in_profile=used,
                    ops_per_step=ops, kernel_ms_per_step=kernel_ms, graph_ops_per_step=graph,
                    wall_ms_median=statistics.median(x[0] for x in t) * 1e3, wall_ms_min=min(x[0] for x in t) * 1e3,
                    cpu_ms_median=statistics.median(x[1] for x in t) * 1e3,
                    python_build_ms_median=statistics.median(x[2] for x in t) * 1e3, rounds=ns.rounds, top=top))
    C.free_model(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
