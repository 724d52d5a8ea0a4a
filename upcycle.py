"""Upcycle a dense LLaMA checkpoint into a mixture of experts (seed 002, Dense2MoE).

    python upcycle.py --ckpt_dir DENSE --moe_config config.json --out_dir OUT [--key value ...]
    python upcycle.py --ckpt_dir params.json --moe_config config.json --dry_run      (reads no weights)

DENSE is a Meta LLaMA-2/3 directory (params.json + consolidated.*.pth) or a Hugging Face LlamaForCausalLM one
(config.json + safetensors). The config holds the seed's keys (num_experts, expert_top_k, moe_start_layer,
moe_layer_freq, gate_type, gating_size, aux_loss_type, aux_loss_weight, sample_topk, gating_dropout) and ours
(normalize_top_k, noise_std, seed, residual_moe, experts_per_layer, moe_layers, aux_reduce): Models/upcycling.py says
what each means. Every key is also a flag that overrides the file. OUT gets params.json (with the "moe" section),
sharded safetensors under our names, the tokenizer and upcycle.json; `LLaMA_adapter.from_pretrained(OUT)`,
`Math.py --llama_path OUT` and `python -m Models.checkpoints export --ckpt_dir OUT` read it. `--export_hf DIR` also
writes a Hugging Face Mixtral / Qwen2-MoE copy when the configuration fits one.
"""
import json
import os
import sys

from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main


def _int_list(text):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError("%r is not a comma list of integers" % (text,))


def build_parser():
    from Models.upcycling import KEYS
    p = Parser(prog="upcycle.py", description="Dense LLaMA -> mixture of experts (copy each chosen FFN into E experts, "
                                              "add a fresh router).")
    a = p.add_argument
    a("--ckpt_dir", required=True, help="dense checkpoint directory (with --dry_run also a params.json/config.json)")
    a("--moe_config", default=None, help="JSON object of upcycling keys (optional: flags alone may give them)")
    a("--out_dir", default=None, help="where the MoE checkpoint goes (required unless --dry_run)")
    add_bool(p, "dry_run", False, "print the layer placement and the total/active parameter counts, read no weights")
    a("--vocab_size", type=int, default=None, help="dry run only: for a params.json whose vocab_size is -1")
    a("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
      help="of the written weights (auto: the dense checkpoint's)")
    a("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in 10^9 bytes")
    a("--export_hf", default=None, help="also write a Hugging Face copy to this directory")
    a("--family", default="auto", choices=("auto", "mixtral", "qwen2_moe"), help="of --export_hf (auto: the first "
                                                                                "that fits)")
    add_bool(p, "progress", True, "progress bar on stderr")
    g = p.add_argument_group("config keys (override --moe_config)")
    for key, (kind, _) in KEYS.items():
        if kind is bool:
            add_bool(g, key, None)
        else:
            g.add_argument("--" + key, type=_int_list if kind is list else kind, default=None)
    return p


def overrides_of(opts):
    from Models.upcycling import KEYS
    return {k: getattr(opts, k) for k in KEYS if getattr(opts, k) is not None}


def export_family(args, family):
    """The family to export to: `family`, or with "auto" the first of mixtral, qwen2_moe that fits (else an error
    listing why neither does)."""
    from Models.hf_config import hf_config_for
    reasons = []
    for fam in ((family,) if family != "auto" else ("mixtral", "qwen2_moe")):
        try:
            hf_config_for(args, fam)
            return fam
        except UserError as e:
            reasons.append(str(e))
    raise UserError("--export_hf: %s" % " | ".join(reasons))


def dry_run(opts, spec):
    from Models.upcycling import format_report, read_params_only, report, upcycled_args
    dense_args, path = read_params_only(opts.ckpt_dir, opts.vocab_size)
    args = upcycled_args(dense_args, spec)
    form = report(dense_args, args)
    for line in format_report(form, args, path):
        print(line)
    print(json.dumps({"moe_layers": form["layers"], "experts_per_layer": form["experts"], "dense_params": form["dense"],
                      "total_params": form["total"], "active_params": form["active"],
                      "router_params": form["routers"], "moe": args.moe.to_dict()}))


def run(opts, spec):
    import time
    from Models.checkpoints import export_hf, read_checkpoint
    from Models.upcycle_state import convert
    from Models.upcycling import format_report
    if not opts.out_dir:
        raise UserError("--out_dir is required (or pass --dry_run)")
    if os.path.abspath(opts.out_dir) == os.path.abspath(opts.ckpt_dir):
        raise UserError("--out_dir must differ from --ckpt_dir (the dense checkpoint is never overwritten)")
    t0 = time.time()
    args, form = convert(opts.ckpt_dir, spec, opts.out_dir, opts.dtype, int(opts.max_shard_gb * 10**9),
                         opts.progress)
    for line in format_report(form, args, opts.ckpt_dir):
        print(line)
    print("wrote %s: %d shard(s), %.2f GB %s in %.1fs" % (os.path.abspath(opts.out_dir), form["shards"],
                                                           form["bytes"] / 1e9, form["dtype"], time.time() - t0))
    if opts.export_hf:
        family = export_family(args, opts.family)
        _, state = read_checkpoint(opts.out_dir)
        notes = export_hf(state, opts.export_hf, family, args=args, dtype=form["dtype"],
                          max_shard_bytes=int(opts.max_shard_gb * 10**9), tokenizer=opts.ckpt_dir)
        for note in notes:
            print("note: %s" % note, file=sys.stderr)
        print("exported %s to %s" % (family, os.path.abspath(opts.export_hf)))


@cli_main
def main(argv=None):
    from Models.upcycling import load_spec
    opts = build_parser().parse_args(argv)
    if opts.vocab_size is not None and not opts.dry_run:
        raise UserError("--vocab_size is for --dry_run only (a conversion reads it from the embedding)")
    spec = load_spec(opts.moe_config if opts.moe_config else {}, overrides_of(opts),
                     source=opts.moe_config or "flags")
    if opts.dry_run:
        dry_run(opts, spec)
    else:
        run(opts, spec)
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
