#!/usr/bin/env python
"""Tokens/s of a full MoA training step (forward, backward, our AdamW on the adapters) on random tokens.

The step is engine_finetune's (accum_iter 1, one process): loss = LLaMA_adapter(tokens, labels=tokens),
jt.grad over the trainable parameters, sync, engine_finetune.AdamW.step (lr --lr, betas (0.9, 0.95),
weight decay --weight_decay on 2-D weights). The model has random weights; the configuration comes from the
flags (--preset lora = plain LoRA, --preset moa = Soft MoA; explicit flags override the preset).

Record "train_step" (one line): the shape and adapter configuration, batch, seq_len, steps, warmup,
tokens_per_s (= batch·seq_len / sec_per_step), sec_per_step (median of the timed steps), sec_per_step_mean,
sec_per_step_min, step_times (every step, warm-up included), step1_s and step2_s (first steps: kernel
compilation), new_kernels_per_step / builds_per_step (JIT kernels new to the process / g++ builds, null with
--count_compiles false), new_kernels_after_step2 and builds_after_step2 (recompile signal; should be 0),
max_after_step2_over_median and later_steps_slower (a step after the 2nd took > 1.5× the median),
final_loss, model_flops_per_token, flops_formula, achieved_gflops (= flops/token × tokens/s),
matmul_peak_gflops, matmul_median_gflops, fraction_of_peak (= achieved / peak), copy bandwidths,
rss_before_model_mb (VmRSS once Jittor and the model code are imported, before the model is built),
peak_rss_mb (ru_maxrss right after the steps, before the machine probes). With --peer: the peer's own line
(bench "train_step", impl "torch_peer", plain LoRA with our rank/alpha/targets/layers) and
{"bench": "ratio", "what": "train_tokens_per_s", "ours", "peer", "ratio" = ours/peer}; with --rounds N > 1 the
whole sequence (ours, peer, ratio; ours carries "round") repeats N times, then one "ratio_summary" record (median,
min, max of the N ratios). peak_rss_mb of rounds after the first is the process's peak so far.

Standard shape:  python bench/train_step.py --preset lora --peer [--rounds 3]
Tiny:            python bench/train_step.py --preset moa --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2
                     --vocab_size 1000 --multiple_of 32 --batch 2 --seq_len 32 --steps 2 --peer
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils import cli  # noqa: E402
from Utils.errors import cli_main  # noqa: E402


def build_parser():
    p = C.Parser(__doc__)
    C.add_model_flags(p)
    g = C.add_train_workload(p)
    g.add_argument("--lr", type=C.bounded(float, "lr", 0), default=1e-3,
                   help="AdamW learning rate (default 1e-3)")
    g.add_argument("--weight_decay", type=float, default=C.WEIGHT_DECAY,
                   help="AdamW weight decay of the 2-D adapter weights (default %g, as the peer)"
                        % C.WEIGHT_DECAY)
    cli.add_bool(p, "peer", False,
                 "also run bench/peer_torch.py --mode train (plain LoRA, same rank/alpha/targets/layers, "
                 "same batch/seq_len/steps/warmup) and print a ratio line")
    C.add_rounds_flag(p)
    C.add_compile_flag(p)
    C.add_machine_flags(p)
    return p


def measure(ns, margs):
    """Build, train, summarise: the "train_step" record (machine probes and peer excluded)."""
    rss0 = C.baseline_rss_mb()
    model = C.build_model(margs, ns.seed)
    base = C.run_record(margs, model, ns.seed)
    counts = C.matmul_counts(margs, model)
    tokens = C.random_tokens(margs.vocab_size, ns.batch, ns.seq_len, ns.seed)
    counter = C.CompileCounter(ns.count_compiles)
    times, losses, compiles = C.train_steps(model, tokens, ns.warmup + ns.steps, ns.lr, ns.weight_decay, counter)
    counter.close()
    peak = C.peak_rss_mb()
    stats = C.step_stats(times, compiles, ns.warmup)
    tps = ns.batch * ns.seq_len / stats["sec_per_step"]
    fpt = C.train_flops_per_token(counts, ns.batch, ns.seq_len)
    rec = dict(bench="train_step", **base, batch=ns.batch, seq_len=ns.seq_len, steps=ns.steps, warmup=ns.warmup,
               lr=ns.lr, tokens_per_s=tps, **stats, final_loss=losses[-1], model_flops_per_token=fpt,
               flops_formula=C.FLOPS_FORMULA["train"], flops_terms=counts, achieved_gflops=fpt * tps / 1e9,
               rss_before_model_mb=rss0, peak_rss_mb=peak)
    C.free_model(model)
    return rec


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    margs = C.model_args(ns, max_seq_len=ns.seq_len)
    C.require_adapters(margs)
    peer_args = C.peer_train_args(margs, "train", ns.batch, ns.seq_len, ns.steps, ns.warmup, ns.seed) \
        if ns.peer else None  # validated before the long run
    C.setup_output()
    ratios = []
    for k in range(ns.rounds if peer_args is not None else 1):
        rec = measure(ns, margs)
        rec.update(C.machine_probes(ns))
        rec["fraction_of_peak"] = C.ratio(rec["achieved_gflops"], rec["matmul_peak_gflops"])
        rec["round"] = k + 1
        C.emit(rec)
        if peer_args is not None:
            peer = C.run_peer(peer_args)
            for r in peer:
                C.emit(r)
            ratio = C.ratio_record("train_tokens_per_s", rec["tokens_per_s"], peer[-1]["tokens_per_s"])
            ratios.append(ratio["ratio"])
            C.emit(ratio)
    if len(ratios) > 1:
        C.emit(C.ratio_summary("train_tokens_per_s", ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
