"""Peak memory of upcycling (issue 16): `upcycle.py` on a generated 1–2 GB dense LLaMA checkpoint, beside the peer
"read the whole checkpoint" (the eager `load_meta_checkpoint` a non-streaming converter starts from), each in its own
fresh process.

    python bench/upcycle_memory.py [--format meta|hf|both] [--dim 2048 --n_layers 12 ...] [--work_dir DIR]

Default shape: dim 2048, 12 layers, 16 heads, vocab 32000, FFN 5632, bf16 (LLaMA-2's storage dtype): 748 M
parameters = 1.50 GB on disk. Upcycled with the seed's kind of config (8 experts, top-2, every other layer from the
middle) it writes ~3 GB. Records (one JSON line each): {"bench": "upcycle_memory", "source", "checkpoint_mb",
"written_mb", "largest_tensor_mb" (fp32, as the converter holds it), "peak_rss_mb", "seconds"} for each source
format, {"bench": "eager_read", ...} for the peer, and {"bench": "ratio", "what": "peak_rss_mb", "ours", "peer",
"ratio"}.

Peak RSS is the kernel's VmHWM of the measured process itself, read at its end: getrusage's ru_maxrss carries a
parent's peak across fork + exec, which would credit a child with this process's own size.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

from common import ROOT, Parser, emit, log, setup_output   # noqa: I100  (bench/ runs with its own directory first)
from Utils.cli import add_bool
from Utils.errors import cli_main

# The measured child: run a Python snippet, then print VmHWM (bytes) as the last stdout line.
_PROBE = textwrap.dedent("""
    import runpy, sys
    sys.path.insert(0, %r)
    mode = sys.argv[1]
    if mode == "upcycle":
        sys.argv = ["upcycle.py"] + sys.argv[2:]
        try:
            runpy.run_path(%r, run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    else:
        from Models.checkpoints import load_meta_checkpoint
        state = load_meta_checkpoint(sys.argv[2])
        print("read %%d tensors" %% len(state), file=sys.stderr)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print("VMHWM", int(hwm.split()[1]) * 1024)
""" % (ROOT, os.path.join(ROOT, "upcycle.py")))


def build_parser():
    p = Parser("Peak RSS of upcycle.py on a generated dense checkpoint vs. reading it whole.")
    a = p.add_argument
    a("--format", default="both", choices=("meta", "hf", "both"), help="dense checkpoint format(s) to convert")
    a("--dim", type=int, default=2048)
    a("--n_layers", type=int, default=12)
    a("--n_heads", type=int, default=16)
    a("--vocab_size", type=int, default=32000)
    a("--multiple_of", type=int, default=256)
    a("--num_experts", type=int, default=8)
    a("--expert_top_k", type=int, default=2)
    a("--work_dir", default=os.path.join(ROOT, ".cache", "bench_upcycle"), help="where checkpoints are written "
                                                                                 "(removed at the end)")
    add_bool(p, "keep", False, "keep the generated checkpoints")
    return p


def make_dense(out_dir, fmt, args, seed=0):
    """A random bf16 dense LLaMA written tensor by tensor (the generator never holds the model in fp32)."""
    import numpy as np
    from Models.hf_layout import layout
    from Models.param_count import param_shapes
    from Utils.checkpoint_io import Bf16Bits, LazyTensor, to_bf16_bits, write_safetensors, write_torch_pth
    from Models.tiny_checkpoint import hf_config
    rng = np.random.default_rng(seed)

    def draw(shape):
        if len(shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return 0.02 * rng.standard_normal(shape, dtype=np.float32)
    os.makedirs(out_dir, exist_ok=True)
    shapes = param_shapes(args)
    if fmt == "meta":
        with open(os.path.join(out_dir, "params.json"), "w") as f:
            json.dump({k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                                     "norm_eps")}, f)
        write_torch_pth(os.path.join(out_dir, "consolidated.00.pth"),
                        {k: Bf16Bits(to_bf16_bits(draw(s))) for k, s in shapes.items()})
    else:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config(args, "bfloat16"), f)
        hf = {part[0]: LazyTensor(part[1], lambda s=part[1]: draw(s))
              for parts in layout(args, "llama").values() for part in parts}
        write_safetensors(os.path.join(out_dir, "model.safetensors"), hf, dtype="bfloat16")


def measure(mode, argv, what):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PROBE, mode] + argv, stdout=subprocess.PIPE, stderr=None, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit("%s failed (status %d)" % (what, r.returncode))
    return int(r.stdout.strip().splitlines()[-1].split()[1]), time.perf_counter() - t0


def _size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


@cli_main
def main(argv=None):
    opts = build_parser().parse_args(argv)
    setup_output()
    from Models.model_args import ModelArgs
    args = ModelArgs(dim=opts.dim, n_layers=opts.n_layers, n_heads=opts.n_heads, vocab_size=opts.vocab_size,
                     multiple_of=opts.multiple_of, norm_eps=1e-5)
    start = opts.n_layers // 2
    config = ["--num_experts", str(opts.num_experts), "--expert_top_k", str(opts.expert_top_k), "--moe_start_layer",
              str(start), "--moe_layer_freq", "2", "--gate_type", "linear", "--progress", "false"]
    largest = max(args.vocab_size * args.dim, args.ffn_hidden_dim * args.dim) * 4 / 2**20
    formats = ("meta", "hf") if opts.format == "both" else (opts.format,)
    os.makedirs(opts.work_dir, exist_ok=True)
    ours_meta = None
    try:
        for fmt in formats:
            src, out = os.path.join(opts.work_dir, "dense_" + fmt), os.path.join(opts.work_dir, "moe_" + fmt)
            log("writing a %s bf16 dense checkpoint to %s" % (fmt, src))
            make_dense(src, fmt, args)
            peak, secs = measure("upcycle", ["--ckpt_dir", src, "--out_dir", out] + config, "upcycle.py")
            rec = {"bench": "upcycle_memory", "source": fmt, "checkpoint_mb": round(_size(src) / 2**20, 1),
                   "written_mb": round(_size(out) / 2**20, 1), "largest_tensor_mb": round(largest, 1),
                   "peak_rss_mb": round(peak / 2**20, 1), "seconds": round(secs, 1),
                   "command": "upcycle.py --ckpt_dir DENSE --out_dir OUT " + " ".join(config)}
            emit(rec)
            if fmt == "meta":
                ours_meta = rec
                peer, secs = measure("eager", [src], "eager read")
                emit({"bench": "eager_read", "source": fmt, "checkpoint_mb": rec["checkpoint_mb"],
                      "peak_rss_mb": round(peer / 2**20, 1), "seconds": round(secs, 1),
                      "command": "Models.checkpoints.load_meta_checkpoint(DENSE) (whole checkpoint as fp32)"})
                emit({"bench": "ratio", "what": "peak_rss_mb", "ours": rec["peak_rss_mb"],
                      "peer": round(peer / 2**20, 1), "ratio": round(peak / peer, 3)})
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not opts.keep:
            shutil.rmtree(opts.work_dir, ignore_errors=True)
    return ours_meta


if __name__ == "__main__":
    main()
