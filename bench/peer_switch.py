#!/usr/bin/env python
"""PyTorch peer of bench/seq2seq.py: HF SwitchTransformersForConditionalGeneration on torch CPU (fp32, eager
attention), random weights of transformers' own init. Self-contained (nothing from this repo); one JSON record per
line on stdout, logs on stderr.

  --mode train     steps of zero_grad + forward(labels, output_router_logits=True: CE + z-loss + aux) + backward
                   + torch.optim.AdamW(lr 1e-4, betas (0.9, 0.999), weight_decay 0.01) + clip_grad_norm_(1.0);
                   tokens_per_s = batch·(src_len + tgt_len) / median step time.
  --mode generate  model.generate(greedy, min_new_tokens = max_new_tokens = new_tokens) on batch × src_len
                   sources; new_tokens_per_s = batch·new_tokens / median wall time.
usage: python bench/peer_switch.py --mode train --config CONFIG.json --batch 8 --src_len 128 --tgt_len 64
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

_JSON_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["train", "generate"], required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src_len", type=int, default=128)
    p.add_argument("--tgt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    import transformers
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with open(a.config) as f:
        cfg = transformers.SwitchTransformersConfig(**json.load(f))
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).float()
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(a.seed + 1)
    src = torch.randint(2, cfg.vocab_size, (a.batch, a.src_len), generator=g)
    mask = torch.ones_like(src)
    rec = dict(bench="seq2seq_" + a.mode, impl="torch_peer", batch=a.batch, src_len=a.src_len, threads=a.threads,
               torch_version=torch.__version__, transformers_version=transformers.__version__)
    times = []
    if a.mode == "train":
        labels = torch.randint(2, cfg.vocab_size, (a.batch, a.tgt_len), generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
        model.train()
        for i in range(a.warmup + a.steps):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=src, attention_mask=mask, labels=labels, output_router_logits=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rec.update(tgt_len=a.tgt_len, steps=a.steps, sec_per_step=med,
                   tokens_per_s=a.batch * (a.src_len + a.tgt_len) / med, final_loss=float(out.loss))
    else:
        model.eval()
        with torch.no_grad():
            for i in range(a.warmup + a.steps):
                t = time.perf_counter()
                toks = model.generate(input_ids=src, attention_mask=mask, max_new_tokens=a.new_tokens,
                                      min_new_tokens=a.new_tokens, do_sample=False, num_beams=1)
                if i >= a.warmup:
                    times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rec.update(new_tokens=a.new_tokens, runs=a.steps, generate_s=med,
                   new_tokens_per_s=a.batch * a.new_tokens / med, generated=toks.shape[1] - 1)
    _JSON_OUT.write(json.dumps(rec) + "\n")
    _JSON_OUT.flush()


if __name__ == "__main__":
    main()
