#!/usr/bin/env python
"""The MoE LM of issue 15 (seed 001) against HF `MixtralForCausalLM` on torch CPU (bench/peer_mixtral.py), one command.

Shape (the defaults, configs/mixtral_tiny.json with vocab 32000): dim 512, 8 layers, GQA 8/2, every layer 8 SwiGLU
experts of width 1024, top-2 of the softmax renormalised, aux loss × 0.001 (computed and added on both sides), untied
head; random weights (Models/init.py, seed --seed). Modes:

  train     full-parameter training steps, batch 4 × 256 random tokens: forward, jt.grad over every parameter, our
            AdamW (engine.trainer.Trainer.optimizer_step; lr 1e-3, betas 0.9/0.95, weight decay 0.1 on 2-D weights).
            Record "moe_train_step" (model "moe"): tokens_per_s, sec_per_step (median after --warmup), step1_s /
            step2_s, new kernels per step, params total/active, model_flops_per_token, achieved_gflops,
            fraction_of_peak, peak_rss_mb. --dense adds the same record for the dense twin (model "dense": FFN
            width top_k × expert_hidden, i.e. the active experts' width) and the ratio "moe_step_over_dense_step"
            (sec/step; the cost of routing, target <= 1.3). --peer adds the peer's line and the ratio
            "train_tokens_per_s" (ours / peer, target >= 1.5).
  generate  greedy decoding at batch 8, prompt 64, 64 new tokens (LLaMA_adapter.generate, KV cache; timing as
            bench/generate.py). Record "moe_generate". --peer adds the peer (manual DynamicCache loop and
            model.generate()) and ratios "decode_tokens_per_s" (decode steps only on both sides, vs the manual loop;
            the target, >= 2) and "decode_vs_hf_generate" (our decode tokens/s / batch·new_tokens per second of HF
            generate(), whose time includes its prefill and generate()'s own overhead: flattering, for reference).
  memory    peak RSS of the training step, ours (this script, --mode train, in a fresh process) vs the peer's
            (--mode memory, in a fresh process): ratio "peak_rss_mb" (ours / peer, target <= 1).

Model FLOPs per trained token (full-parameter training; every matmul 2N forward + 2N input-gradient + 2N weight-
gradient): 6·N_act + 6·V·d·(T−1)/T + 3·4·T·d·L, with N_act = L·(d·hd·(2H + 2Hkv) + k·3·d·F_e + E·d) the block
weights a token uses (dense twin: 3·d·F), the head on the T−1 supervised positions, and attention over the full T×T
matrix as Models/llama.py computes it.

--rounds N (with --peer, or --dense in train mode) repeats ours / dense / peer in turn N times and ends with one
"ratio_summary" record (median, min, max) per ratio.

Standard:  python bench/moe_lm.py --mode train --dense --peer [--rounds 3]
           python bench/moe_lm.py --mode generate --peer [--rounds 3]
           python bench/moe_lm.py --mode memory
Tiny:      add --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --vocab_size 1000 --expert_hidden 64 --batch 2
           --seq_len 32 --steps 2 (train) or --batch 2 --prompt_len 16 --new_tokens 8 (generate)
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils import cli  # noqa: E402
from Utils.errors import UserError, cli_main  # noqa: E402

PEER = os.path.join(C.BENCH_DIR, "peer_mixtral.py")
SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "experts", "top_k", "expert_hidden")


def build_parser():
    p = C.Parser(__doc__)
    p.add_argument("--mode", choices=("train", "generate", "memory"), default="train")
    g = p.add_argument_group("shape")
    for name, default in zip(SHAPE, (512, 8, 8, 2, 32000, 8, 2, 1024)):
        g.add_argument("--" + name, type=C.bounded(int, name), default=default, help="(default %d)" % default)
    g.add_argument("--aux_coef", type=float, default=0.001, help="aux_switch coefficient (default 0.001, as HF)")
    g = C.add_train_workload(p)
    g.add_argument("--prompt_len", type=C.bounded(int, "prompt_len"), default=64)
    g.add_argument("--new_tokens", type=C.bounded(int, "new_tokens"), default=64)
    g.add_argument("--gen_batch", type=C.bounded(int, "gen_batch"), default=8, help="generate: batch (default 8)")
    g.add_argument("--runs", type=C.bounded(int, "runs"), default=2, help="generate: timed runs after a cold one")
    cli.add_bool(p, "dense", False, "train: also the dense twin (FFN = top_k × expert_hidden) and the step ratio")
    cli.add_bool(p, "peer", False, "also run bench/peer_mixtral.py and print ratio lines")
    p.add_argument("--seed", type=int, default=0)
    C.add_rounds_flag(p)
    C.add_compile_flag(p)
    C.add_machine_flags(p)
    return p


def model_args(ns, dense=False, max_seq_len=None):
    from Models.model_args import ModelArgs
    if ns.top_k > ns.experts or ns.dim % ns.n_heads or ns.n_heads % ns.n_kv_heads:
        raise UserError("need top_k <= experts, n_heads dividing dim and n_kv_heads dividing n_heads")
    params = dict(dim=ns.dim, n_layers=ns.n_layers, n_heads=ns.n_heads, n_kv_heads=ns.n_kv_heads,
                  vocab_size=ns.vocab_size, norm_eps=1e-5, rope_theta=1e6, max_seq_len=max_seq_len or ns.seq_len,
                  intermediate_size=ns.top_k * ns.expert_hidden if dense else ns.expert_hidden)
    if not dense:
        params["moe"] = dict(num_experts=ns.experts, top_k=ns.top_k, expert_hidden=ns.expert_hidden,
                             scoring="softmax_topk", norm_topk_prob=True, aux_switch=ns.aux_coef)
    return ModelArgs.create(params, source="flags")


def build(margs, seed):
    from Models.init import init_weights
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(seed)
    model = LLaMA_adapter(margs, None, trainable="all")
    init_weights(model)
    return model


def flops_per_token(margs, T):
    d, L, hd = margs.dim, margs.n_layers, margs.head_dim
    attn_w = d * hd * (2 * margs.n_heads + 2 * margs.n_kv_heads)
    if margs.moe is not None:
        ffn = margs.moe.top_k * 3 * d * margs.moe.expert_hidden + margs.moe.num_experts * d
    else:
        ffn = 3 * d * margs.ffn_hidden_dim
    return 6 * L * (attn_w + ffn) + 6 * margs.vocab_size * d * (T - 1) / T + 3 * 4 * T * d * L


def record_base(ns, margs, name):
    from Models.param_count import count_params
    from Utils.runtime import device_name, onednn_status
    c = count_params(margs)
    return dict(impl="jittor", model=name, **{k: getattr(ns, k) for k in SHAPE}, ffn_hidden=margs.ffn_hidden_dim,
                aux_coef=ns.aux_coef if margs.moe is not None else None, total_params=c["total"],
                active_params=c["active"], seed=ns.seed, device=device_name(), onednn=onednn_status(),
                jittor_version=C.jittor().__version__, omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


def measure_train(ns, dense=False):
    margs = model_args(ns, dense)
    rss0 = C.baseline_rss_mb()
    model = build(margs, ns.seed)
    tokens = C.random_tokens(margs.vocab_size, ns.batch, ns.seq_len, ns.seed)
    counter = C.CompileCounter(ns.count_compiles)
    times, losses, compiles = C.train_steps(model, tokens, ns.warmup + ns.steps, 1e-3, 0.1, counter)
    counter.close()
    peak = C.peak_rss_mb()
    stats = C.step_stats(times, compiles, ns.warmup)
    tps = ns.batch * ns.seq_len / stats["sec_per_step"]
    fpt = flops_per_token(margs, ns.seq_len)
    rec = dict(bench="moe_train_step", **record_base(ns, margs, "dense" if dense else "moe"), batch=ns.batch,
               seq_len=ns.seq_len, steps=ns.steps, warmup=ns.warmup, tokens_per_s=tps, **stats,
               final_loss=losses[-1], model_flops_per_token=fpt, achieved_gflops=fpt * tps / 1e9,
               rss_before_model_mb=rss0, peak_rss_mb=peak)
    C.free_model(model)
    return rec


def measure_generate(ns):
    import generate as G   # bench/generate.py: one timed generate() call with per-forward marks
    margs = model_args(ns, max_seq_len=ns.prompt_len + ns.new_tokens + 1)
    rss0 = C.baseline_rss_mb()
    model = build(margs, ns.seed)
    model.eval()
    model.tokenizer = G.NoStopTokenizer()
    prompts = C.random_tokens(margs.vocab_size, ns.gen_batch, ns.prompt_len, ns.seed).tolist()
    counter = C.CompileCounter(ns.count_compiles)
    cold = G.one_run(model, prompts, ns.new_tokens, counter)
    runs = [G.one_run(model, prompts, ns.new_tokens, counter) for _ in range(ns.runs)]
    counter.close()
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(sum(r[1]) for r in runs)
    n_dec = len(runs[0][1])
    rec = dict(bench="moe_generate", **record_base(ns, margs, "moe"), batch=ns.gen_batch, prompt_len=ns.prompt_len,
               new_tokens=ns.new_tokens, runs=ns.runs, prefill_s=prefill_s,
               prefill_tokens_per_s=ns.gen_batch * ns.prompt_len / prefill_s, decode_s=decode_s, decode_steps=n_dec,
               decode_tokens_per_s=ns.gen_batch * n_dec / decode_s, first_prefill_s=cold[0],
               new_kernels_timed_runs=C.sum_or_none(k for r in runs for k, _ in r[2]),
               all_tokens_generated=all(r[3] == ns.gen_batch * (ns.new_tokens + 1) for r in [cold] + runs),
               rss_before_model_mb=rss0, peak_rss_mb=C.peak_rss_mb())
    C.free_model(model)
    return rec


def peer_args(ns, mode):
    out = ["--mode", mode, "--seed", ns.seed, "--aux_coef", ns.aux_coef]
    for k in SHAPE:
        out += ["--" + k, getattr(ns, k)]
    if mode == "generate":
        return out + ["--batch", ns.gen_batch, "--prompt_len", ns.prompt_len, "--new_tokens", ns.new_tokens]
    return out + ["--batch", ns.batch, "--seq_len", ns.seq_len, "--steps", ns.steps, "--warmup", ns.warmup]


def run_peer(ns, mode):
    recs = C.run_json_subprocess([sys.executable, PEER] + [str(a) for a in peer_args(ns, mode)], "peer_mixtral.py")
    for r in recs:
        C.emit(r)
    return recs[-1]


def train_round(ns, k):
    rec = measure_train(ns)
    rec.update(C.machine_probes(ns))
    rec["fraction_of_peak"] = C.ratio(rec["achieved_gflops"], rec["matmul_peak_gflops"])
    rec["round"] = k
    C.emit(rec)
    out = {}
    if ns.dense:
        dense = measure_train(ns, dense=True)
        dense["round"] = k
        C.emit(dense)
        out["moe_step_over_dense_step"] = C.ratio(rec["sec_per_step"], dense["sec_per_step"])
        C.emit({"bench": "ratio", "what": "moe_step_over_dense_step", "moe_sec_per_step": rec["sec_per_step"],
                "dense_sec_per_step": dense["sec_per_step"], "ratio": out["moe_step_over_dense_step"],
                "target": "<= 1.3"})
    if ns.peer:
        peer = run_peer(ns, "train")
        r = C.ratio_record("train_tokens_per_s", rec["tokens_per_s"], peer["tokens_per_s"])
        C.emit(dict(r, target=">= 1.5"))
        out["train_tokens_per_s"] = r["ratio"]
    return out


def generate_round(ns, k):
    rec = measure_generate(ns)
    rec["round"] = k
    C.emit(rec)
    if not ns.peer:
        return {}
    peer = run_peer(ns, "generate")
    C.emit(C.ratio_record("prefill_tokens_per_s", rec["prefill_tokens_per_s"], peer["prefill_tokens_per_s"]))
    r = C.ratio_record("decode_tokens_per_s", rec["decode_tokens_per_s"], peer["decode_tokens_per_s"])
    C.emit(dict(r, target=">= 2"))   # like for like: decode steps only on both sides
    C.emit(C.ratio_record("decode_vs_hf_generate", rec["decode_tokens_per_s"], peer["generate_tokens_per_s"]))
    return {"decode_tokens_per_s": r["ratio"]}


def memory(ns):
    flags = ["--mode", "train", "--no_machine", "--count_compiles", "false", "--seed", str(ns.seed),
             "--aux_coef", str(ns.aux_coef), "--batch", str(ns.batch), "--seq_len", str(ns.seq_len), "--steps",
             str(ns.steps), "--warmup", str(ns.warmup)]
    for k in SHAPE:
        flags += ["--" + k, str(getattr(ns, k))]
    ours = C.run_json_subprocess([sys.executable, os.path.abspath(__file__)] + flags, "moe_lm.py --mode train")[-1]
    C.emit(ours)
    peer = run_peer(ns, "memory")
    C.emit(dict(C.ratio_record("peak_rss_mb", ours["peak_rss_mb"], peer["peak_rss_mb"]), target="<= 1"))
    C.emit(C.ratio_record("peak_minus_baseline_mb", ours["peak_rss_mb"] - ours["rss_before_model_mb"],
                          peer["peak_rss_mb"] - peer["rss_before_model_mb"]))


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    model_args(ns)   # shape errors before anything runs
    C.setup_output()
    if ns.mode == "memory":
        return memory(ns)
    one = train_round if ns.mode == "train" else generate_round
    compared = ns.peer or (ns.dense and ns.mode == "train")
    rounds = [one(ns, k + 1) for k in range(ns.rounds if compared else 1)]
    if len(rounds) > 1:
        for what in rounds[0]:   # median over the rounds of each ratio (the VM's speed drifts over minutes)
            C.emit(C.ratio_summary(what, [r[what] for r in rounds]))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
