#!/usr/bin/env python
"""PyTorch peer of bench/moe_lm.py: Hugging Face `MixtralForCausalLM` (random weights, fp32, torch CPU) at the shape
ours runs. Self-contained (imports nothing from this repo); one JSON object per line on stdout, logs on stderr.

Modes:
  train     full-parameter training steps: zero_grad, forward(labels=tokens, output_router_logits=True) — so the
            router aux loss is computed and added with router_aux_loss_coef, as ours does —, backward,
            torch.optim.AdamW(lr 1e-3, betas (0.9, 0.95), weight_decay 0.1) over every parameter.
  generate  greedy decoding: a timed prefill forward + a manual one-token loop on HF's DynamicCache (decode), and the
            wall time of model.generate() for the same prompts.
  memory    exactly train, reported as "bench": "memory" (run it in its own process: ru_maxrss is a lifetime peak).

Record keys: bench, impl="torch_peer", mode, the shape (dim, n_layers, n_heads, n_kv_heads, vocab_size, experts,
top_k, expert_hidden, router_aux_loss_coef), experts_implementation, attn, threads, torch/transformers versions,
rss_before_model_mb, peak_rss_mb; train/memory: batch, seq_len, steps, warmup, sec_per_step (median of the timed
steps), tokens_per_s, first_step_s, final_loss, params; generate: batch, prompt_len, new_tokens, prefill_s,
prefill_tokens_per_s, decode_s, decode_tokens_per_s (manual loop), generate_s, generate_tokens_per_s
(= batch·new_tokens / generate_s, prefill included), decode_matches_generate.

Tiny:  python bench/peer_mixtral.py --mode train --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2 --vocab_size 1000
           --expert_hidden 64 --batch 2 --seq_len 32 --steps 2
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

_JSON_OUT = os.fdopen(os.dup(1), "w")   # stdout carries the JSON records only
os.dup2(2, 1)
sys.stdout = sys.stderr


def log(*a):
    print("[peer_mixtral]", *a, file=sys.stderr, flush=True)


def emit(record):
    _JSON_OUT.write(json.dumps(record, allow_nan=False) + "\n")
    _JSON_OUT.flush()


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--mode", choices=("train", "generate", "memory"), default="train")
    a("--dim", type=int, default=512)
    a("--n_layers", type=int, default=8)
    a("--n_heads", type=int, default=8)
    a("--n_kv_heads", type=int, default=2)
    a("--vocab_size", type=int, default=32000)
    a("--experts", type=int, default=8)
    a("--top_k", type=int, default=2)
    a("--expert_hidden", type=int, default=1024)
    a("--rope_theta", type=float, default=1e6)
    a("--norm_eps", type=float, default=1e-5)
    a("--aux_coef", type=float, default=0.001, help="router_aux_loss_coef (default 0.001, MixtralConfig's)")
    a("--batch", type=int, default=4)
    a("--seq_len", type=int, default=256)
    a("--steps", type=int, default=5)
    a("--warmup", type=int, default=2)
    a("--prompt_len", type=int, default=64)
    a("--new_tokens", type=int, default=64)
    a("--attn", choices=("sdpa", "eager"), default="sdpa")
    a("--threads", type=int, default=None)
    a("--seed", type=int, default=0)
    return p


def build_model(a):
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.expert_hidden,
                        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                        num_local_experts=a.experts, num_experts_per_tok=a.top_k, rms_norm_eps=a.norm_eps,
                        rope_theta=a.rope_theta, max_position_embeddings=max(2048, a.seq_len,
                                                                             a.prompt_len + a.new_tokens + 1),
                        router_aux_loss_coef=a.aux_coef, output_router_logits=a.mode != "generate",
                        tie_word_embeddings=False, sliding_window=None, use_cache=True, bos_token_id=None,
                        eos_token_id=None, pad_token_id=0)
    torch.manual_seed(a.seed)
    model = MixtralForCausalLM._from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    return model.float()


def base_record(a, model):
    import transformers
    return dict(impl="torch_peer", mode=a.mode, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, experts=a.experts, top_k=a.top_k,
                expert_hidden=a.expert_hidden, router_aux_loss_coef=a.aux_coef,
                experts_implementation=getattr(model.config, "_experts_implementation", None) or "eager",
                attn=a.attn, threads=torch.get_num_threads(), seed=a.seed, dtype="float32",
                torch_version=torch.__version__, transformers_version=transformers.__version__,
                params=sum(p.numel() for p in model.parameters()))


def run_train(a):
    rss0 = rss_mb()
    model = build_model(a)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    tokens = torch.randint(0, a.vocab_size, (a.batch, a.seq_len), generator=gen)

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens, labels=tokens, output_router_logits=True)  # loss includes coef·aux
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0, out.loss.item()

    times, first, loss = [], None, None
    for i in range(a.warmup + a.steps):
        dt, loss = step()
        first = dt if first is None else first
        if i >= a.warmup:
            times.append(dt)
        log("step %d/%d %.3fs loss %.4f%s" % (i + 1, a.warmup + a.steps, dt, loss, " (warm-up)" if i < a.warmup
                                                                                   else ""))
    med = statistics.median(times)
    emit(dict(bench="memory" if a.mode == "memory" else "moe_train_step", **base_record(a, model), batch=a.batch,
              seq_len=a.seq_len, steps=a.steps, warmup=a.warmup, sec_per_step=med,
              sec_per_step_mean=statistics.fmean(times), tokens_per_s=a.batch * a.seq_len / med, first_step_s=first,
              final_loss=loss, rss_before_model_mb=rss0, peak_rss_mb=peak_rss_mb()))


def run_generate(a):
    from transformers import DynamicCache
    rss0 = rss_mb()
    model = build_model(a).eval()
    model.generation_config.eos_token_id = None   # exactly new_tokens every run
    gen = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, a.vocab_size, (a.batch, a.prompt_len), generator=gen)
    mask = torch.ones_like(ids)

    def hf_generate(n):
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0, out[:, a.prompt_len:]

    def manual(n):
        cache, m = DynamicCache(config=model.config), mask
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(n):
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
            nxt = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = nxt.argmax(-1, keepdim=True)
            toks.append(nxt)
        return t1 - t0, time.perf_counter() - t1, torch.cat(toks, dim=1)

    with torch.inference_mode():
        hf_generate(min(2, a.new_tokens))
        manual(min(2, a.new_tokens))
        t_prefill, t_decode, toks = manual(a.new_tokens)
        t_gen, gen_toks = hf_generate(a.new_tokens)
    emit(dict(bench="moe_generate", **base_record(a, model), batch=a.batch, prompt_len=a.prompt_len,
              new_tokens=a.new_tokens, prefill_s=t_prefill, prefill_tokens_per_s=a.batch * a.prompt_len / t_prefill,
              decode_s=t_decode, decode_tokens_per_s=a.batch * a.new_tokens / t_decode, generate_s=t_gen,
              generate_tokens_per_s=a.batch * a.new_tokens / t_gen,
              decode_matches_generate=bool(torch.equal(toks[:, :a.new_tokens], gen_toks)),
              rss_before_model_mb=rss0, peak_rss_mb=peak_rss_mb()))


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "experts", "top_k", "expert_hidden", "batch",
              "steps", "prompt_len", "new_tokens"):
        if getattr(a, k) < 1:
            p.error("--%s must be >= 1" % k)
    if a.seq_len < 2 or a.warmup < 0 or a.top_k > a.experts or a.dim % a.n_heads or a.n_heads % a.n_kv_heads:
        p.error("need seq_len >= 2, warmup >= 0, top_k <= experts, n_heads | dim and n_kv_heads | n_heads")
    torch.set_num_threads(a.threads or os.cpu_count())
    log("mode=%s threads=%d" % (a.mode, torch.get_num_threads()))
    (run_generate if a.mode == "generate" else run_train)(a)


if __name__ == "__main__":
    main()
