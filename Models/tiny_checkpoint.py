"""Tiny random LLaMA-3 checkpoints (docs/moa.md §1 layout) in Meta or Hugging Face format, for tests and smoke runs.

Both formats hold the same weights: the Meta state is drawn once and the HF files are derived from it by
`hf_from_meta`, so a loader that round-trips either format must give back exactly the returned state.
"""
import json
import os
import shutil

import numpy as np

from Utils.checkpoint_io import bf16_bits_to_float32, to_bf16_bits, write_safetensors, write_torch_pth
from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main

ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def meta_shapes(args):
    """{Meta name: shape} in checkpoint order (llama3 model.py's parameter order)."""
    hd, hidden = args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = "layers.%d." % i
        shapes.update({p + "attention.wq.weight": (args.n_heads * hd, args.dim),
                       p + "attention.wk.weight": (args.n_kv_heads * hd, args.dim),
                       p + "attention.wv.weight": (args.n_kv_heads * hd, args.dim),
                       p + "attention.wo.weight": (args.dim, args.n_heads * hd),
                       p + "feed_forward.w1.weight": (hidden, args.dim),
                       p + "feed_forward.w2.weight": (args.dim, hidden),
                       p + "feed_forward.w3.weight": (hidden, args.dim),
                       p + "attention_norm.weight": (args.dim,),
                       p + "ffn_norm.weight": (args.dim,)})
    shapes.update({"norm.weight": (args.dim,), "output.weight": (args.vocab_size, args.dim)})
    return shapes


def random_state(args, seed=0, std=0.02):
    """Matrices ~ N(0, std); norm weights 1 + 0.1·N(0, 1), so a test notices a norm weight that was not loaded."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in meta_shapes(args).items():
        if len(shape) == 1:
            state[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return state


def hf_config(args, dtype="float32"):
    """A LlamaForCausalLM config.json equivalent to `args` (intermediate_size spelled out)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": dict(ROPE_SCALING) if args.use_scaled_rope else None,
            "max_position_embeddings": 131072 if args.use_scaled_rope else 8192, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
            "initializer_range": 0.02, "bos_token_id": 128000, "eos_token_id": 128001, "use_cache": True,
            "torch_dtype": dtype}


def make_tiny_checkpoint(out_dir, fmt="meta", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256,
                         multiple_of=32, ffn_dim_multiplier=None, use_scaled_rope=False, rope_theta=500000.0,
                         norm_eps=1e-5, seed=0, dtype="float32", std=0.02, tokenizer=True):
    """Write a random checkpoint to out_dir and return its {Meta name: float32 array} exactly as stored
    (already rounded to bf16 when dtype='bfloat16')."""
    from Models.model_args import ModelArgs
    if fmt not in ("meta", "hf"):
        raise UserError("format: %r is not 'meta' or 'hf'" % fmt)
    if dtype not in ("float32", "bfloat16"):
        raise UserError("dtype: %r is not 'float32' or 'bfloat16'" % dtype)
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=norm_eps,
                  rope_theta=rope_theta, use_scaled_rope=use_scaled_rope)
    args = ModelArgs.create(params, source="make_tiny_checkpoint")
    state = random_state(args, seed, std)
    if dtype == "bfloat16":  # what a loader reads back is the bf16-rounded value
        state = {k: bf16_bits_to_float32(to_bf16_bits(v)) for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "meta":
        with open(os.path.join(out_dir, "params.json"), "w") as f:
            json.dump({k: v for k, v in params.items() if v is not None}, f, indent=2)
        write_torch_pth(os.path.join(out_dir, "consolidated.00.pth"), state, dtype=dtype)
    else:
        from Models.checkpoints import hf_from_meta   # the name/RoPE layout is the model's (this tool already needs it)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config(args, dtype), f, indent=2)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_from_meta(state, args), dtype=dtype)
    if tokenizer:
        from Models.tokenizer import default_tokenizer_path
        shutil.copyfile(default_tokenizer_path(), os.path.join(out_dir, "tokenizer.model"))
    return state


def _optional_float(s):
    return None if s.lower() in ("none", "") else float(s)


def build_parser():
    p = Parser(description="Write a tiny random LLaMA-3 checkpoint (Meta or HF format).")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--format", dest="fmt", choices=("meta", "hf"), default="meta")
    for name, typ, default in (("dim", int, 64), ("n_layers", int, 2), ("n_heads", int, 4), ("n_kv_heads", int, 2),
                               ("vocab_size", int, 128256), ("multiple_of", int, 32), ("seed", int, 0),
                               ("rope_theta", float, 500000.0), ("norm_eps", float, 1e-5), ("std", float, 0.02)):
        p.add_argument("--" + name, type=typ, default=default)
    p.add_argument("--ffn_dim_multiplier", type=_optional_float, default=None)
    add_bool(p, "use_scaled_rope", False, "Llama-3.1 scaled RoPE")
    add_bool(p, "tokenizer", True, "copy the LLaMA-3 tokenizer.model beside the weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return p


@cli_main
def main(argv=None):
    opts = build_parser().parse_args(argv)
    make_tiny_checkpoint(**vars(opts))
    print(os.path.abspath(opts.out_dir))


if __name__ == "__main__":
    main()
