"""Initialisation of a model trained from scratch: N(0, std) weights with the scaled residual projections that
minimind v1 (and GPT-2) intended.

    init_weights(model, std=0.02)   # LLaMA_adapter or Transformer; returns {rule: number of tensors}

Rules, by parameter name (our names, Models/param_count.py):

* every 2-D weight of the base — embeddings, attention wq/wk/wv/wo, dense w1/w2/w3, the stacked experts
  `experts.w1/w3/w2`, shared experts and their sigmoid gate, the output head, linear/MLP routers and the "gmm"
  router's projection — is drawn from N(0, std);
* the projections that write into the residual stream — `attention.wo`, the dense `w2`, the experts' and shared
  experts' `w2` — use std / sqrt(2 · n_layers) instead: each block adds two such terms to the residual, so their sum
  over depth keeps the scale of the embeddings (GPT-2 §2.3; minimind v1 meant to do this, wyf3's copy matches
  renamed parameters and so never does — seed 001's anchors);
* biases are 0 and RMSNorm weights are 1;
* left as the modules built them, on purpose: the noisy-gating projection `noise.weight` (zero, so the noise std
  starts at its floor) and the "gmm" router's centroids N(0, 1) and temperature 0 (cosine logits in [-1, 1]);
* adapters (MoA / LoRA parameters) are never touched: their own init keeps a base's output unchanged.

With tied embeddings the head IS the embedding Var, so it is drawn once, with the embedding's std.
Draws come from Jittor's RNG: seed it first (`Utils.runtime.seed_everything`) for the same weights on every rank.
"""
import math

from Utils.runtime import import_jittor

jt = import_jittor()

RESIDUAL_OUT = ("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.experts.w2", "feed_forward.shared.w2")
KEEP = ("feed_forward.noise.", "router.centroids", "router.tau")
ADAPTER_KEYWORDS = ("lora", "prompt", "adapter")


def init_rule(name, shape):
    """'normal', 'residual', 'zeros', 'ones' or 'keep' for the base parameter `name` (a Transformer name)."""
    if any(k in name for k in ADAPTER_KEYWORDS) or any(k in name for k in KEEP):
        return "keep"
    if name.endswith("norm.weight"):
        return "ones"
    if name.endswith(".bias"):
        return "zeros"
    if len(shape) < 2:
        return "keep"
    if any(name.endswith(k) for k in RESIDUAL_OUT):
        return "residual"
    return "normal"


def init_weights(model, std=0.02, scaled_residual=True):
    """Re-draw the base weights of `model` (LLaMA_adapter or Transformer) by the rules above, in place.

    Returns {rule: number of tensors} so callers and tests can see what was done."""
    module = getattr(model, "llama", model)
    n_layers = module.args.n_layers
    residual_std = std / math.sqrt(2 * n_layers) if scaled_residual else std
    counts = {}
    touched = []
    for name, p in module.named_parameters():
        rule = init_rule(name, tuple(p.shape))
        counts[rule] = counts.get(rule, 0) + 1
        if rule == "keep":
            continue
        if rule == "ones":
            value = jt.ones(p.shape, "float32")
        elif rule == "zeros":
            value = jt.zeros(p.shape, "float32")
        else:
            value = jt.init.gauss(tuple(p.shape), "float32", 0.0, residual_std if rule == "residual" else std)
        p.update(value.cast(p.dtype))
        touched.append(p)
    jt.sync(touched)  # Jittor draws lazily: materialise now so the seed set before this call fixes the values
    return counts
