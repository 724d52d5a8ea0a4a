#!/usr/bin/env python
"""Peak RSS of a training step, ours vs. the PyTorch peer, each in its own fresh process.

Ours: bench/train_step.py as a subprocess (same model/adapter flags, --steps N --warmup W --no_machine), its
peak_rss_mb (ru_maxrss right after the steps). Peer: bench/peer_torch.py --mode memory (plain LoRA with our rank,
alpha, targets and layers; same batch, seq_len, steps, warmup). ru_maxrss is a process-lifetime peak, hence one
process per side. This process imports no Jittor and builds no model.

Records: the two runs' own lines (bench "train_step" / "memory"), then "memory_compare": ours_peak_rss_mb,
peer_peak_rss_mb, ours_rss_before_model_mb, peer_rss_before_model_mb (RSS once the framework is imported, before
the model), ours_model_mb / peer_model_mb (= peak − before: what the model and the steps added), batch, seq_len,
steps, warmup, routing, trainable_params (ours, peer); and ratio lines "peak_rss_mb" and "peak_minus_baseline_mb"
(ratio = ours / peer: > 1 means we use more).

Standard shape:  python bench/memory.py --preset lora
Tiny:            python bench/memory.py --preset lora --dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2
                     --vocab_size 1000 --multiple_of 32 --batch 2 --seq_len 32
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402  (puts the repository root on sys.path)
from Utils.errors import cli_main  # noqa: E402

TRAIN_STEP = os.path.join(C.BENCH_DIR, "train_step.py")


def build_parser():
    p = C.Parser(__doc__)
    C.add_model_flags(p)
    C.add_train_workload(p, steps=3, warmup=0, scope=" per side")
    return p


def passthrough(ns):
    """Our parsed model/adapter flags back as a command line for train_step.py (only the given ones)."""
    out = []
    names = ["params_json", "max_seq_len", "preset", "seed"] + list(C.SHAPE_TYPES) + list(C.ADAPTER_FLAGS)
    for name in names:
        v = getattr(ns, name, None)
        if v is not None:
            out += ["--" + name, str(v).lower() if isinstance(v, bool) else str(v)]
    return out


@cli_main
def main(argv=None):
    ns = build_parser().parse_args(argv)
    margs = C.model_args(ns, max_seq_len=ns.seq_len)
    C.require_adapters(margs)  # validates the flags before anything runs
    peer_args = C.peer_train_args(margs, "memory", ns.batch, ns.seq_len, ns.steps, ns.warmup, ns.seed)
    C.setup_output()
    ours = C.run_json_subprocess(
        [sys.executable, TRAIN_STEP] + passthrough(ns) + ["--batch", str(ns.batch), "--seq_len", str(ns.seq_len),
                                                           "--steps", str(ns.steps), "--warmup", str(ns.warmup),
                                                           "--no_machine"], "train_step.py")
    for r in ours:
        C.emit(r)
    peer = C.run_peer(peer_args)
    for r in peer:
        C.emit(r)
    o, q = ours[-1], peer[-1]
    o_model = o["peak_rss_mb"] - o["rss_before_model_mb"]
    q_model = q["peak_rss_mb"] - q["rss_before_model_mb"]
    C.emit(dict(bench="memory_compare", ours_peak_rss_mb=o["peak_rss_mb"], peer_peak_rss_mb=q["peak_rss_mb"],
                ours_rss_before_model_mb=o["rss_before_model_mb"], peer_rss_before_model_mb=q["rss_before_model_mb"],
                ours_model_mb=o_model, peer_model_mb=q_model, batch=ns.batch, seq_len=ns.seq_len, steps=ns.steps,
                warmup=ns.warmup, routing=o["routing"], trainable_params=o["trainable_params"],
                peer_trainable_params=q["trainable_params"]))
    C.emit(C.ratio_record("peak_rss_mb", o["peak_rss_mb"], q["peak_rss_mb"]))
    C.emit(C.ratio_record("peak_minus_baseline_mb", o_model, q_model))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
