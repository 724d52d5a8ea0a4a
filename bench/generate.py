#!/usr/bin/env python
"""Greedy decoding with LLaMA_adapter.generate (KV cache): prefill and decode throughput, measured separately.

--batch random prompts of --prompt_len tokens; generate(max_gen_len = new_tokens + 1, temperature 0): one
prefill forward over the prompt (its argmax is the 1st new token), then --new_tokens one-token decode forwards,
as the peer's manual loop. Times come from generate()'s on_step callback, called after every forward's logits
reached numpy: prefill_s = start of generate() → 1st callback, decode step k = callback k → callback k+1 (each
step includes the previous step's argmax on numpy). The model has random weights, so stop tokens are switched off
(a tokenizer stand-in with no stop tokens); generated tokens are counted and checked (all_tokens_generated).
Run 1 is cold (kernel compilation: first_prefill_s, first_decode_step_s, new kernels per phase); then --runs
timed runs, each phase summarised by the median over runs.

--prompt_len is the length of the generation prompts (as in the peer); the prompt-tuning adapter's length
(Math.py's --prompt_len) is spelled --adapter_prompt_len here.

Record "generate": the shape and adapter configuration (default: no adapters, the base model as in the peer),
batch, prompt_len, new_tokens, runs, prefill_s, prefill_tokens_per_s (= batch·prompt_len / prefill_s),
decode_s (sum of the decode steps), decode_steps, decode_tokens_per_s (= batch·decode_steps / decode_s),
decode_step_s_median, decode_step_s_first_quarter / decode_step_s_last_quarter (medians: growth with the cache
length), generated_tokens, all_tokens_generated, first_prefill_s, first_decode_step_s, cold_decode_step_s_median,
new_kernels_prefill / new_kernels_first_decode / new_kernels_later_decode (cold run: decode steps 2..n),
new_kernels_timed_runs and builds_* likewise (recompile signals: later/timed should be 0), model_flops_per_
prefill_token, model_flops_per_decode_token (mean over the decode steps), flops_formula, prefill_achieved_gflops,
prefill_fraction_of_peak, weight_bytes_per_decode_step (every parameter but the embedding table, + batch rows),
kv_bytes_per_decode_step_mean, bound_decode_tokens_per_s (= batch · copy_bandwidth / weight bytes),
fraction_of_bound (= decode_tokens_per_s / bound), bound_with_kv_decode_tokens_per_s, the machine probes,
rss_before_model_mb, peak_rss_mb. With --peer: the peer's line (peer_torch.py --mode generate, base model, same
batch/prompt_len/new_tokens) and ratio lines "prefill_tokens_per_s" and "decode_tokens_per_s" (ours / peer). With
--rounds N > 1 that sequence (ours carries "round") repeats N times, then one "ratio_summary" record of the decode
ratios (median, min, max).

Standard shape:  python bench/generate.py --peer [--rounds 3]
Tiny:            python bench/generate.py --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --vocab_size 1000
                     --multiple_of 32 --batch 2 --prompt_len 16 --new_tokens 8 --peer
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils import cli  # noqa: E402
from Utils.errors import UserError, cli_main  # noqa: E402


class NoStopTokenizer:
    """Stand-in tokenizer for generate(): no stop tokens, so random weights cannot end a sequence early."""
    stop_tokens = ()


def build_parser():
    p = C.Parser(__doc__)
    C.add_model_flags(p, renames={"prompt_len": "adapter_prompt_len"})
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=C.bounded(int, "batch"), default=8, help="prompts decoded together (default 8)")
    g.add_argument("--prompt_len", type=C.bounded(int, "prompt_len"), default=64,
                   help="tokens per prompt (default 64)")
    g.add_argument("--new_tokens", type=C.bounded(int, "new_tokens"), default=64,
                   help="decode forwards after the prefill (default 64; generate() returns new_tokens + 1 tokens)")
    g.add_argument("--runs", type=C.bounded(int, "runs"), default=2,
                   help="timed generate() runs after the cold one (default 2)")
    cli.add_bool(p, "peer", False,
                 "also run bench/peer_torch.py --mode generate (base model, same batch/prompt_len/new_tokens)"
                 " and print ratio lines")
    C.add_rounds_flag(p)
    C.add_compile_flag(p)
    C.add_machine_flags(p)
    return p


def one_run(model, prompts, new_tokens, counter):
    """One generate() call: (prefill_s, [decode step s], [(kernels, builds) per forward], generated tokens)."""
    marks = []
    t0 = time.perf_counter()

    def on_step(start_pos, n_positions):
        marks.append(time.perf_counter())
        compiles.append(counter.take())

    compiles = []
    counter.take()
    out = model.generate(prompts, max_gen_len=new_tokens + 1, temperature=0.0, on_step=on_step)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return marks[0] - t0, steps, compiles, sum(len(o) for o in out)


def quarter_medians(steps):
    q = max(1, len(steps) // 4)
    return statistics.median(steps[:q]), statistics.median(steps[-q:])


def measure(ns, margs):
    rss0 = C.baseline_rss_mb()
    model = C.build_model(margs, ns.seed)
    base = C.run_record(margs, model, ns.seed)
    model.eval()
    model.tokenizer = NoStopTokenizer()
    prompts = C.random_tokens(margs.vocab_size, ns.batch, ns.prompt_len, ns.seed).tolist()
    counter = C.CompileCounter(ns.count_compiles)
    log_run = lambda name, r: C.log("%s: prefill %.3fs, %d decode steps %.3fs" % (name, r[0], len(r[1]), sum(r[1])))
    cold = one_run(model, prompts, ns.new_tokens, counter)
    log_run("cold run", cold)
    runs = []
    for i in range(ns.runs):
        runs.append(one_run(model, prompts, ns.new_tokens, counter))
        log_run("run %d" % (i + 1), runs[-1])
    counter.close()
    peak = C.peak_rss_mb()

    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(sum(r[1]) for r in runs)
    n_dec = len(runs[0][1])
    steps_med = [statistics.median(r[1][k] for r in runs) for k in range(n_dec)]  # per position, over runs
    first_q, last_q = quarter_medians(steps_med)
    expected = ns.batch * (ns.new_tokens + 1)
    generated = [r[3] for r in [cold] + runs]
    ck = [k for k, _ in cold[2]]
    cb = [b for _, b in cold[2]]
    timed_k = [k for r in runs for k, _ in r[2]]
    timed_b = [b for r in runs for _, b in r[2]]

    counts = C.matmul_counts(margs, model)
    P = ns.prompt_len
    f_prefill = C.prefill_flops_per_token(counts, ns.batch, P)
    cache_lens = [P + 1 + k for k in range(n_dec)]  # decode step k attends over P + k + 1 positions
    f_decode = statistics.fmean(C.decode_flops_per_token(counts, ns.batch, s) for s in cache_lens)
    w_bytes = C.decode_weight_bytes(margs, model, ns.batch)
    kv_bytes = statistics.fmean(2 * margs.n_layers * ns.batch * s * counts["d_kv"] * 4 for s in cache_lens)
    prefill_tps = ns.batch * P / prefill_s
    rec = dict(bench="generate", **base, batch=ns.batch, prompt_len=P, new_tokens=ns.new_tokens, runs=ns.runs,
               prefill_s=prefill_s, prefill_tokens_per_s=prefill_tps, decode_s=decode_s, decode_steps=n_dec,
               decode_tokens_per_s=ns.batch * n_dec / decode_s, decode_step_s_median=statistics.median(steps_med),
               decode_step_s_first_quarter=first_q, decode_step_s_last_quarter=last_q,
               generated_tokens=generated[-1], all_tokens_generated=all(g == expected for g in generated),
               first_prefill_s=cold[0], first_decode_step_s=cold[1][0] if cold[1] else None,
               cold_decode_step_s_median=statistics.median(cold[1]) if cold[1] else None,
               new_kernels_prefill=ck[0], new_kernels_first_decode=ck[1] if len(ck) > 1 else None,
               new_kernels_later_decode=C.sum_or_none(ck[2:]), new_kernels_timed_runs=C.sum_or_none(timed_k),
               builds_prefill=cb[0], builds_first_decode=cb[1] if len(cb) > 1 else None,
               builds_later_decode=C.sum_or_none(cb[2:]), builds_timed_runs=C.sum_or_none(timed_b),
               model_flops_per_prefill_token=f_prefill, model_flops_per_decode_token=f_decode,
               flops_formula={"prefill": C.FLOPS_FORMULA["prefill"], "decode": C.FLOPS_FORMULA["decode"]},
               flops_terms=counts, prefill_achieved_gflops=f_prefill * prefill_tps / 1e9,
               weight_bytes_per_decode_step=w_bytes, kv_bytes_per_decode_step_mean=kv_bytes,
               rss_before_model_mb=rss0, peak_rss_mb=peak)
    if not rec["all_tokens_generated"]:
        C.log("warning: generated %s tokens per run, expected %d" % (generated, expected))
    C.free_model(model)
    return rec


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    margs = C.model_args(ns, max_seq_len=ns.prompt_len + ns.new_tokens + 1)
    if margs.max_seq_len < ns.prompt_len + ns.new_tokens + 1:
        raise UserError("--max_seq_len %d is shorter than prompt_len + new_tokens + 1 = %d"
                          % (margs.max_seq_len, ns.prompt_len + ns.new_tokens + 1))
    C.setup_output()
    ratios = []
    for k in range(ns.rounds if ns.peer else 1):
        ratios.append(_round(ns, margs, k + 1))
    if len(ratios) > 1:
        C.emit(C.ratio_summary("decode_tokens_per_s", ratios))
    return 0


def _round(ns, margs, k):
    """One measurement (+ the peer and ratio lines with --peer); returns the decode ratio or None."""
    rec = measure(ns, margs)
    rec.update(C.machine_probes(ns))
    bw = rec["copy_bandwidth_gbs"]
    rec["prefill_fraction_of_peak"] = C.ratio(rec["prefill_achieved_gflops"], rec["matmul_peak_gflops"])
    rec["bound_decode_tokens_per_s"] = None if bw is None else ns.batch * bw * 1e9 / rec["weight_bytes_per_decode_step"]
    rec["fraction_of_bound"] = C.ratio(rec["decode_tokens_per_s"], rec["bound_decode_tokens_per_s"])
    rec["bound_with_kv_decode_tokens_per_s"] = None if bw is None else ns.batch * bw * 1e9 / (
        rec["weight_bytes_per_decode_step"] + rec["kv_bytes_per_decode_step_mean"])
    rec["round"] = k
    C.emit(rec)
    if not ns.peer:
        return None
    peer = C.run_peer(["--mode", "generate"] + C.peer_shape_args(margs) + [
        "--batch", ns.batch, "--prompt_len", ns.prompt_len, "--new_tokens", ns.new_tokens, "--seed", ns.seed])
    for r in peer:
        C.emit(r)
    out = None
    for what in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        r = C.ratio_record(what, rec[what], peer[-1][what])
        C.emit(r)
        out = r["ratio"]
    return out


if __name__ == "__main__":
    sys.exit(main() or 0)
