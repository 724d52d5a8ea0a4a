"""Oracle: Hugging Face Mixtral / Qwen2-MoE / Qwen3 / Llama causal LMs in their own (torch-only) process.

usage: python tests/oracles/hf_families.py JOBS.json
JOBS.json is a list of jobs, run in order:
  {"make": DIR, "family": F, "config": {...}, "seed": S, "tokenizer": TOKENIZER_DIR, "fused": false}
      random fp32 weights of transformers' own init (seeded), every 1-D weight (norms, biases) perturbed so a
      weight that is not loaded or not permuted shows, saved with save_pretrained (per-expert tensors, or with
      "fused" transformers 5's own stacked gate_up_proj/down_proj) + the tokenizer files;
  {"run": DIR, "tokens": T.npy, "labels": L.npy or null, "out": O.npz}
      logits (eager attention, fp32); with labels also the loss, and for MoE models the aux_loss
      (output_router_logits=True).
Kept out of the Jittor process: torch and Jittor each bring their own oneDNN/MKL runtime.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers

CLASSES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"), "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}


def make(job):
    cfg_cls, model_cls = (getattr(transformers, n) for n in CLASSES[job["family"]])
    torch.manual_seed(job["seed"])
    model = model_cls(cfg_cls(**job["config"])).float().eval()
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(job["make"], save_original_format=not job.get("fused"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(job["tokenizer"], f), os.path.join(job["make"], f))


def run(job):
    model = transformers.AutoModelForCausalLM.from_pretrained(job["run"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    tokens = torch.tensor(np.load(job["tokens"]).astype(np.int64))
    out = {}
    with torch.no_grad():
        if job.get("labels"):
            labels = torch.tensor(np.load(job["labels"]).astype(np.int64))
            moe = hasattr(model.config, "router_aux_loss_coef")
            res = model(tokens, labels=labels, **({"output_router_logits": True} if moe else {}))
            out["loss"] = res.loss.numpy()
            if moe:
                out["aux_loss"] = res.aux_loss.numpy()
        else:
            res = model(tokens)
        out["logits"] = res.logits.float().numpy()
    np.savez(job["out"], **out)


def main(path):
    with open(path) as f:
        jobs = json.load(f)
    for job in jobs:
        make(job) if "make" in job else run(job)


if __name__ == "__main__":
    main(sys.argv[1])
