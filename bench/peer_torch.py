#!/usr/bin/env python
"""PyTorch "peer" for the Jittor benchmarks: the same LLaMA-3 shapes run through Hugging Face + torch on CPU.

Self-contained (imports nothing from this repo). One JSON object per measurement on stdout, one per line;
everything else (warnings, progress) goes to stderr. Modes:

  train     plain LoRA fine-tuning steps (peft if importable, else a hand-written LoRA with the same math);
            AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02) over the LoRA params only.
  generate  greedy decoding of the *base* model (no LoRA): timed prefill + a manual KV-cache decode loop, plus
            the wall time of HF generate() for the same prompts.
  memory    exactly train, reported as "bench": "memory"; the point is peak_rss_mb (run it in its own process:
            ru_maxrss is a process-lifetime peak, and this script only ever runs one mode per process).

Output keys (every record): bench, impl="torch_peer", mode, the shape (dim, n_layers, n_heads, n_kv_heads,
vocab_size, multiple_of, ffn_dim_multiplier, ffn_hidden_dim, norm_eps, rope_theta), attn, threads, seed, dtype,
torch_version, transformers_version, rss_before_model_mb (VmRSS just before the model is built), peak_rss_mb
(ru_maxrss at the end). Sizes in MB = 2**20 bytes; times in seconds (time.perf_counter).
  train/memory: batch, seq_len, steps, warmup, sec_per_step (median of the timed steps), sec_per_step_mean,
    tokens_per_s (batch*seq_len/median), first_step_s (the very first step, warm-up included), final_loss,
    trainable_params, lora_impl ("peft"|"manual"), peft_version, lora_rank, lora_alpha, lora_targets, lora_layers.
    A step is zero_grad + forward(labels=tokens) + backward + AdamW step.
  generate: batch, prompt_len, new_tokens, prefill_s / prefill_tokens_per_s (= batch*prompt_len/prefill_s; one
    forward over the prompt + argmax, which yields the 1st new token), prefill_logits, decode_steps (= new_tokens),
    decode_s / decode_tokens_per_s (= batch*new_tokens/decode_s; new_tokens one-token forwards on the DynamicCache,
    each followed by argmax), generate_s (wall time of model.generate(max_new_tokens=new_tokens), i.e. its prefill
    + new_tokens-1 decode forwards), decode_matches_generate (the manual loop's first new_tokens tokens equal
    generate()'s).

Example (tiny):  python bench/peer_torch.py --mode train --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2
                     --vocab_size 1000 --multiple_of 32 --batch 2 --seq_len 32 --steps 2
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch

# Keep stdout for the JSON records only: anything written to fd 1 by libraries (Python or C) goes to stderr.
_JSON_OUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr

# Base-model defaults are Meta's ModelArgs defaults (as in Models/model_args.py); LLaMA-3-8B needs --params_json.
BASE_DEFAULTS = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=None, vocab_size=128256, multiple_of=256,
                     ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0)
TARGETS = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj",
           "FFN_UP": "up_proj", "FFN_GATE": "gate_proj", "FFN_DOWN": "down_proj"}


def log(*a):
    print("[peer_torch]", *a, file=sys.stderr, flush=True)


def emit(record):
    _JSON_OUT.write(json.dumps(record, allow_nan=False) + "\n")
    _JSON_OUT.flush()


def rss_mb():  # current resident set size
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb():  # Linux reports ru_maxrss in KB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_layers(spec, n_layers):
    """Our syntax: '0-8,24-32' = half-open ranges → sorted layer indices; '' → all layers."""
    if spec is None or not spec.strip():
        return list(range(n_layers))
    layers = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            a, b = (int(v) for v in part.split("-"))
        except ValueError:
            raise ValueError("--lora_layers: %r is not a list of half-open ranges like '0-8,24-32'" % spec)
        if a < 0 or b < a or b > n_layers:
            raise ValueError("--lora_layers: range %r must satisfy 0 <= start <= end <= n_layers (%d)"
                             % (part, n_layers))
        layers.update(range(a, b))
    if not layers:
        raise ValueError("--lora_layers: %r selects no layer" % spec)
    return sorted(layers)


def parse_targets(spec):
    items = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in items if t not in TARGETS]
    if bad or not items:
        raise ValueError("--lora_targets: %r is not a comma list of %s" % (spec, ",".join(TARGETS)))
    return [t for t in TARGETS if t in items]  # canonical order, duplicates dropped


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    """Meta's FeedForward sizing (llama/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("train", "generate", "memory"), default="train",
                   help="what to measure (default train)")
    g = p.add_argument_group("model shape (Meta params.json semantics; explicit flags override --params_json)")
    g.add_argument("--params_json", help="a Meta params.json to take the shape from (unknown keys are ignored)")
    g.add_argument("--dim", type=int, help="model width (default 4096)")
    g.add_argument("--n_layers", type=int, help="transformer blocks (default 32)")
    g.add_argument("--n_heads", type=int, help="attention heads (default 32)")
    g.add_argument("--n_kv_heads", type=int, help="key/value heads for GQA (default: n_heads)")
    g.add_argument("--vocab_size", type=int, help="vocabulary size (default 128256)")
    g.add_argument("--multiple_of", type=int, help="FFN hidden size is rounded up to a multiple of this (default 256)")
    g.add_argument("--ffn_dim_multiplier", type=float, help="FFN hidden-size multiplier (default none)")
    g.add_argument("--norm_eps", type=float, help="RMSNorm epsilon (default 1e-5)")
    g.add_argument("--rope_theta", type=float, help="RoPE base (default 500000)")
    g = p.add_argument_group("LoRA (train/memory)")
    g.add_argument("--lora_rank", type=int, default=16, help="LoRA rank r (default 16)")
    g.add_argument("--lora_alpha", type=float, default=8.0,
                   help="LoRA alpha; the update is scaled by alpha/r (default 8)")
    g.add_argument("--lora_targets", default="Q,V", help="comma list of %s (default Q,V)" % ",".join(TARGETS))
    g.add_argument("--lora_layers", default="", help="half-open layer ranges, e.g. '0-8,24-32' (default: all layers)")
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    g.add_argument("--seq_len", type=int, default=512, help="train/memory: tokens per sequence (default 512)")
    g.add_argument("--steps", type=int, default=5, help="train/memory: timed steps (default 5)")
    g.add_argument("--warmup", type=int, default=2, help="train/memory: untimed steps before timing (default 2)")
    g.add_argument("--prompt_len", type=int, default=128, help="generate: prompt tokens (default 128)")
    g.add_argument("--new_tokens", type=int, default=32, help="generate: tokens to generate (default 32); the manual "
                   "loop times new_tokens one-token decode forwards after the prefill forward")
    g.add_argument("--prefill_logits", choices=("last", "all"), default="last", help="generate: the timed prefill "
                   "forward computes logits for the last position only, as HF generate() does (default), or for all")
    g = p.add_argument_group("runtime")
    g.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="HF attn_implementation (default sdpa)")
    g.add_argument("--threads", type=int, help="torch intra-op threads (default: os.cpu_count())")
    g.add_argument("--seed", type=int, default=0, help="seed for the random init and the random tokens (default 0)")
    return p


def resolve_args(argv=None):
    p = build_parser()
    p.error = lambda msg: (sys.stderr.write("peer_torch.py: error: %s\n" % msg), sys.exit(2))  # one line, exit 2
    a = p.parse_args(argv)
    shape = dict(BASE_DEFAULTS)
    if a.params_json:
        try:
            with open(a.params_json) as f:
                pj = json.load(f)
        except (OSError, ValueError) as e:
            p.error("--params_json: cannot read %s (%s)" % (a.params_json, e))
        if not isinstance(pj, dict):
            p.error("--params_json: %s is not a JSON object" % a.params_json)
        for k, v in pj.items():
            if k in shape:
                shape[k] = v
            elif k == "use_scaled_rope" and v:
                log("note: use_scaled_rope ignored (RoPE frequency scaling does not change the cost)")
    for k in BASE_DEFAULTS:  # explicit flags win over params.json
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    if shape["n_kv_heads"] is None:
        shape["n_kv_heads"] = shape["n_heads"]
    a.shape = shape
    try:
        for k, v in shape.items():  # params.json values may have any JSON type
            typ = float if k in ("ffn_dim_multiplier", "norm_eps", "rope_theta") else int
            if v is not None or k != "ffn_dim_multiplier":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or typ(v) != v:
                    raise ValueError("%s: expected %s, got %r" % (k, "a number" if typ is float else "an integer", v))
                shape[k] = typ(v)
        for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"):
            if shape[k] <= 0:
                raise ValueError("--%s must be positive (got %s)" % (k, shape[k]))
        if shape["dim"] % shape["n_heads"] or shape["n_heads"] % shape["n_kv_heads"]:
            raise ValueError("dim must be divisible by n_heads and n_heads by n_kv_heads (got %d, %d, %d)"
                             % (shape["dim"], shape["n_heads"], shape["n_kv_heads"]))
        if (shape["dim"] // shape["n_heads"]) % 2:
            raise ValueError("head dim (dim/n_heads) must be even for RoPE")
        for k, lo in (("lora_rank", 1), ("batch", 1), ("seq_len", 2), ("steps", 1), ("warmup", 0),
                      ("prompt_len", 1), ("new_tokens", 1)):
            if getattr(a, k) < lo:
                raise ValueError("--%s must be >= %d (got %s)" % (k, lo, getattr(a, k)))
        if a.threads is not None and a.threads < 1:
            raise ValueError("--threads must be >= 1")
        a.target_list = parse_targets(a.lora_targets)
        a.layer_list = parse_layers(a.lora_layers, shape["n_layers"])
    except ValueError as e:
        p.error(str(e))
    return a


def build_model(a):
    from transformers import LlamaConfig, LlamaForCausalLM
    s = a.shape
    cfg = LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["dim"], num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
        intermediate_size=ffn_hidden_dim(s["dim"], s["multiple_of"], s["ffn_dim_multiplier"]),
        rms_norm_eps=s["norm_eps"], rope_theta=s["rope_theta"], hidden_act="silu", tie_word_embeddings=False,
        max_position_embeddings=max(2048, a.seq_len, a.prompt_len + a.new_tokens + 1),
        attention_bias=False, mlp_bias=False, use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=a.attn, dtype=torch.float32)
    return model.float()


class LoRALinear(torch.nn.Module):
    """Fallback when peft is missing: y = base(x) + (x @ A^T @ B^T) * alpha/r.

    A is kaiming-uniform(a=sqrt(5)) and B zeros, as peft initialises them (init_lora_weights=True)."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


def import_peft():
    try:
        import peft
        return peft
    except ImportError:
        log("peft not importable: using the manual LoRA wrapper")
        return None


def add_lora(model, a, peft):
    """Freeze the base and add LoRA to the targeted linears of the chosen layers. Returns (model, impl)."""
    names = [TARGETS[t] for t in a.target_list]
    for p in model.parameters():
        p.requires_grad_(False)
    if peft is None:
        for i in a.layer_list:
            layer = model.model.layers[i]
            for parent in (layer.self_attn, layer.mlp):
                for n in names:
                    if hasattr(parent, n):
                        setattr(parent, n, LoRALinear(getattr(parent, n), a.lora_rank, a.lora_alpha))
        return model, "manual"
    cfg = peft.LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha, target_modules=names, lora_dropout=0.0, bias="none",
                          layers_to_transform=a.layer_list, layers_pattern="layers", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg), "peft"


def shape_record(a):
    s = a.shape
    return dict(dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], n_kv_heads=s["n_kv_heads"],
                vocab_size=s["vocab_size"], multiple_of=s["multiple_of"], ffn_dim_multiplier=s["ffn_dim_multiplier"],
                ffn_hidden_dim=ffn_hidden_dim(s["dim"], s["multiple_of"], s["ffn_dim_multiplier"]),
                norm_eps=s["norm_eps"], rope_theta=s["rope_theta"])


def run_train(a, base):
    peft = import_peft()  # before rss0, so the baseline includes every library the run loads (peft pulls ~100 MB)
    rss0 = rss_mb()
    model, impl = add_lora(build_model(a), a, peft)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)
    gen = torch.Generator().manual_seed(a.seed)
    tokens = torch.randint(0, a.shape["vocab_size"], (a.batch, a.seq_len), generator=gen)

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels internally
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, loss.item()

    times, first = [], None
    for i in range(a.warmup + a.steps):
        dt, loss = step()
        first = dt if first is None else first
        if i >= a.warmup:
            times.append(dt)
        tag = " (warm-up)" if i < a.warmup else ""
        log("step %d/%d %.3fs loss %.4f%s" % (i + 1, a.warmup + a.steps, dt, loss, tag))
    med = statistics.median(times)
    emit(dict(bench="memory" if a.mode == "memory" else "train_step", **base, batch=a.batch, seq_len=a.seq_len,
              steps=a.steps, warmup=a.warmup, sec_per_step=med, sec_per_step_mean=statistics.fmean(times),
              tokens_per_s=a.batch * a.seq_len / med, first_step_s=first, final_loss=loss,
              trainable_params=sum(p.numel() for p in params), lora_impl=impl,
              peft_version=peft.__version__ if peft else None, lora_rank=a.lora_rank,
              lora_alpha=a.lora_alpha, lora_targets=",".join(a.target_list), lora_layers=a.lora_layers or "all",
              rss_before_model_mb=rss0, peak_rss_mb=peak_rss_mb()))


def run_generate(a, base):
    from transformers import DynamicCache
    rss0 = rss_mb()
    model = build_model(a).eval()
    model.generation_config.eos_token_id = None  # never stop early: every run generates exactly new_tokens
    gen = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, a.shape["vocab_size"], (a.batch, a.prompt_len), generator=gen)
    mask = torch.ones_like(ids)

    def hf_generate(n):
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0, out[:, a.prompt_len:]

    def manual(n):
        """Prefill forward (its argmax is the 1st new token), then n one-token forwards on the KV cache."""
        cache, m = DynamicCache(config=model.config), mask
        keep = 1 if a.prefill_logits == "last" else 0  # logits_to_keep=0 means all positions
        t0 = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True,
                       logits_to_keep=keep).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(n):
            m = torch.cat([m, torch.ones_like(nxt)], dim=1)
            nxt = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = nxt.argmax(-1, keepdim=True)
            toks.append(nxt)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.cat(toks, dim=1)

    with torch.inference_mode():
        hf_generate(min(2, a.new_tokens)); manual(min(2, a.new_tokens))  # warm-up
        t_prefill, t_decode, toks = manual(a.new_tokens)
        t_gen, gen_toks = hf_generate(a.new_tokens)
    emit(dict(bench="generate", **base, batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
              prefill_s=t_prefill, prefill_tokens_per_s=a.batch * a.prompt_len / t_prefill,
              prefill_logits=a.prefill_logits, decode_steps=a.new_tokens, decode_s=t_decode,
              decode_tokens_per_s=a.batch * a.new_tokens / t_decode, generate_s=t_gen,
              decode_matches_generate=bool(torch.equal(toks[:, :a.new_tokens], gen_toks)),
              rss_before_model_mb=rss0, peak_rss_mb=peak_rss_mb()))


def main(argv=None):
    a = resolve_args(argv)
    import transformers
    torch.set_num_threads(a.threads or os.cpu_count())
    base = dict(impl="torch_peer", mode=a.mode, **shape_record(a), attn=a.attn, threads=torch.get_num_threads(),
                seed=a.seed, dtype="float32", torch_version=torch.__version__,
                transformers_version=transformers.__version__)
    log("mode=%s shape=%s threads=%d" % (a.mode, a.shape, torch.get_num_threads()))
    (run_generate if a.mode == "generate" else run_train)(a, base)


if __name__ == "__main__":
    main()
