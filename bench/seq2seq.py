"""Encoder–decoder MoE benchmark: our training step and greedy generation against HF SwitchTransformers on torch CPU
(bench/peer_switch.py, run as a subprocess on the same config), one JSON record per line on stdout.

Shape (`--preset small`, "switch-base-like, small"): HF SwitchTransformers' own config with d_model 256, d_kv 32,
8 heads, d_ff 1024, 4 encoder + 4 decoder layers with every second FFN sparse (num_sparse_*_layers 2 → layers 1
and 3), 8 ReLU experts, expert_capacity 64 per sequence, vocab 32128, tied embeddings, relative buckets 32/128,
dropout 0 (switch-base-8 is d_model 768, d_ff 2048, 12 + 12 layers, 12 heads: the same structure, ~9× the
FLOPs). Both sides build the model from that config dict (ours through Models/seq2seq/hf_switch.config_from_hf).

train: batch × src_len source tokens and batch × tgt_len target tokens, a step = forward (CE + z-loss + load
balance with HF's coefficients) + backward + AdamW (lr 1e-4, betas 0.9/0.999, wd 0.01) + clipping to norm 1 —
ours through engine.Trainer.optimizer_step; tokens_per_s = batch·(src_len + tgt_len) / median step.
generate: greedy, min_new_tokens = max_new_tokens = new_tokens (both sides decode exactly that many tokens), the
wall time of the whole call (encoder + every decode step); new_tokens_per_s = batch·new_tokens / median.
`--rounds N` alternates ours and the peer N times (the VM's speed drifts) and reports the median ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import emit, log, setup_output  # noqa: E402

PRESETS = {
    "small": dict(vocab_size=32128, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4,
                  num_heads=8, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8,
                  expert_capacity=64, dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0),
    "tiny": dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=16,
                 dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0),
}


def ours_train(hf_cfg, a):
    import numpy as np
    from engine.schedule import StepSchedule
    from engine.trainer import TrainConfig, Trainer
    from Models.seq2seq.hf_switch import config_from_hf
    from Models.seq2seq.model import Seq2SeqTransformer
    from Utils.runtime import seed_everything
    seed_everything(a.seed)
    model = Seq2SeqTransformer(config_from_hf(hf_cfg))
    model.train()
    rng = np.random.default_rng(a.seed)
    V = hf_cfg["vocab_size"]
    batch = {"src": rng.integers(2, V, (a.batch, a.src_len)).astype(np.int32),
             "src_mask": np.ones((a.batch, a.src_len), bool),
             "tgt_in": rng.integers(2, V, (a.batch, a.tgt_len)).astype(np.int32),
             "tgt_out": rng.integers(2, V, (a.batch, a.tgt_len)).astype(np.int32)}
    out = tempfile.mkdtemp(prefix="bench_s2s_")
    tr = Trainer(model, _OneBatch(batch), TrainConfig(output_dir=out, lr=1e-4, schedule=StepSchedule(1e-4, 100),
                                                      betas=(0.9, 0.999), weight_decay=0.01, clip_grad=1.0,
                                                      progress=False))
    times, first = [], None
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        rec = tr.optimizer_step([batch], 1e-4)
        dt = time.perf_counter() - t
        first = first if first is not None else dt
        if i >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    return dict(bench="seq2seq_train", impl="jittor", batch=a.batch, src_len=a.src_len, tgt_len=a.tgt_len,
                steps=a.steps, sec_per_step=med, first_step_s=first,
                tokens_per_s=a.batch * (a.src_len + a.tgt_len) / med, final_loss=rec["loss"])


class _OneBatch:
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1


def ours_generate(hf_cfg, a):
    import numpy as np
    from Models.seq2seq.hf_switch import config_from_hf
    from Models.seq2seq.model import Seq2SeqTransformer
    from Utils.runtime import seed_everything
    seed_everything(a.seed)
    model = Seq2SeqTransformer(config_from_hf(hf_cfg))
    model.eval()
    rng = np.random.default_rng(a.seed)
    sources = [list(rng.integers(2, hf_cfg["vocab_size"], a.src_len)) for _ in range(a.batch)]
    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        out = model.generate(sources, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             batch_size=a.batch)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(bench="seq2seq_generate", impl="jittor", batch=a.batch, src_len=a.src_len, new_tokens=a.new_tokens,
                runs=a.steps, generate_s=med, new_tokens_per_s=a.batch * a.new_tokens / med,
                generated=min(len(o) for o in out))


def peer(hf_cfg, a):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(hf_cfg, f)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "peer_switch.py"), "--mode", a.mode, "--config", f.name,
           "--batch", str(a.batch), "--src_len", str(a.src_len), "--tgt_len", str(a.tgt_len),
           "--new_tokens", str(a.new_tokens), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--seed", str(a.seed)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        raise SystemExit("peer failed:\n" + r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    setup_output()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["train", "generate"], default="train")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src_len", type=int, default=128)
    p.add_argument("--tgt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the peer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", action="store_true", help="also run HF SwitchTransformers and report the ratio")
    p.add_argument("--rounds", type=int, default=1)
    a = p.parse_args()
    hf_cfg = PRESETS[a.preset]
    key = "tokens_per_s" if a.mode == "train" else "new_tokens_per_s"
    ratios = []
    for r in range(a.rounds):
        ours = (ours_train if a.mode == "train" else ours_generate)(hf_cfg, a)
        emit(dict(ours, preset=a.preset, round=r))
        if a.peer:
            theirs = peer(hf_cfg, a)
            emit(dict(theirs, preset=a.preset, round=r))
            ratios.append(ours[key] / theirs[key])
            emit({"bench": "ratio", "what": key, "ours": ours[key], "peer": theirs[key], "ratio": ratios[-1],
                  "round": r})
            log("round %d: ours %.1f, peer %.1f, ratio %.2f" % (r, ours[key], theirs[key], ratios[-1]))
    if len(ratios) > 1:
        emit({"bench": "ratio_summary", "what": key, "ratios": ratios, "median": statistics.median(ratios),
              "min": min(ratios), "max": max(ratios)})


if __name__ == "__main__":
    main()
