"""Oracle: HF SwitchTransformersForConditionalGeneration in its own (torch-only) process.

usage: python tests/oracles/hf_switch.py JOBS.json
JOBS.json is a list of jobs, run in order:
  {"make": DIR, "config": {...}, "seed": S}
      random fp32 weights of transformers' own init (seeded), every layer norm perturbed so a norm that is not
      loaded shows, one embedding table for both stacks, saved with save_pretrained;
  {"run": DIR, "inputs": IN.npz, "out": OUT.npz}
      eval-mode forward on IN's src, src_mask, tgt_in, tgt_mask (and labels when present): logits; with labels the
      loss and the encoder/decoder z-loss and load-balance loss (output_router_logits=True);
  {"generate": DIR, "inputs": IN.npz, "out": OUT.npz, "max_new_tokens": N, "num_beams": K}
      model.generate(src, src_mask) tokens.
Kept out of the Jittor process: torch and Jittor each bring their own oneDNN/MKL runtime.
"""
import json
import sys

import numpy as np
import torch
import transformers


def make(job):
    torch.manual_seed(job["seed"])
    cfg = transformers.SwitchTransformersConfig(**job["config"])
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).float().eval()
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        # transformers 5 gives an untied model separate encoder/decoder embedding tables; the released (4.x)
        # checkpoints share one, as the model always did there
        model.encoder.embed_tokens.weight.copy_(model.shared.weight)
        model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(job["make"])


def _load(path):
    return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def run(job):
    model = _load(job["run"])
    x = np.load(job["inputs"])
    t = lambda k: torch.tensor(x[k].astype(np.int64))
    kw = dict(input_ids=t("src"), attention_mask=t("src_mask"), decoder_input_ids=t("tgt_in"),
              decoder_attention_mask=t("tgt_mask"))
    out = {}
    with torch.no_grad():
        if "labels" in x:
            res = model(**kw, labels=t("labels"), output_router_logits=True)
            out["loss"] = res.loss.numpy()
            for k in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
                out[k] = np.asarray(float(getattr(res, k)))
        else:
            res = model(**kw)
        out["logits"] = res.logits.float().numpy()
    np.savez(job["out"], **out)


def generate(job):
    model = _load(job["generate"])
    x = np.load(job["inputs"])
    with torch.no_grad():
        toks = model.generate(input_ids=torch.tensor(x["src"].astype(np.int64)),
                              attention_mask=torch.tensor(x["src_mask"].astype(np.int64)),
                              max_new_tokens=job["max_new_tokens"], num_beams=job.get("num_beams", 1),
                              do_sample=False, min_new_tokens=job.get("min_new_tokens", 0))
    np.savez(job["out"], tokens=toks.numpy())


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        (make if "make" in job else run if "run" in job else generate)(job)
