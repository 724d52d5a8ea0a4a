"""The Dense2MoE demo (`bash run.sh upcycle`, seed 002): a tiny dense LLaMA trained on real text, upcycled to 8
experts top-2 in every other layer, then trained further beside the same dense model for the same extra tokens.

    python demo_upcycle.py [--out_dir output/upcycle_demo] [--base_steps 600] [--extra_steps 300] [--img_dir DIR]

Runs with OMP_NUM_THREADS=1 unless it is set: on a 2-core machine shared with other work, a training step of this
model took 0.6 s with one thread and 3–7 s with two (threads spin-waiting for a busy core).

Stages (the corpus, tokenizer and dense base are cached in .cache/upcycle_demo/ and reused):
1. corpus: the docstrings of Python's standard library (`Dataset.text_corpus`), 95% train / 5% validation;
2. tokenizer: byte-level BPE with 2048 ids trained on the train split (`Utils.train_tokenizer`);
3. dense base: dim 128, 4 layers, GQA 4/2, FFN 352, context 128, trained from scratch (engine.Trainer, AdamW);
4. upcycling: `upcycle.py` with configs/upcycle_demo.json (8 experts, top-2, layers 1 and 3, linear gate, the
   seed's MI loss with weight 0.01, normalize_top_k on);
5. both models trained for the same steps on the same batches with the same schedule; validation every
   --val_interval steps; at each validation the mean pairwise distance between the copied experts of every MoE
   layer (Models.upcycling.expert_spread); the expert load of the logged steps.
Writes to out_dir: summary.json, the runs' log.txt, and plots/{upcycle_val_loss,upcycle_expert_load_first,
upcycle_expert_load,upcycle_expert_spread}.png (Utils.plot; also copied to --img_dir when given).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

from Utils.cli import Parser
from Utils.errors import UserError, cli_main

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "upcycle_demo", "v1")
CONFIG = os.path.join(ROOT, "configs", "upcycle_demo.json")
DENSE = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0)


def build_parser():
    p = Parser(prog="demo_upcycle.py", description="Dense LLaMA -> upcycled MoE, trained further beside the dense "
                                                   "model.")
    a = p.add_argument
    a("--out_dir", default=os.path.join(ROOT, "output", "upcycle_demo"))
    a("--base_steps", type=int, default=600, help="dense pretraining steps (cached)")
    a("--extra_steps", type=int, default=300, help="steps of further training, for both models")
    a("--lr", type=float, default=1e-3, help="peak learning rate of the further training (warm-up 20, cosine)")
    a("--val_interval", type=int, default=25)
    a("--batch_size", type=int, default=16)
    a("--max_seq_len", type=int, default=128)
    a("--vocab_size", type=int, default=2048)
    a("--img_dir", default=None, help="also copy the pictures here (the README's are docs/img)")
    return p


def log(*parts):
    print("[upcycle demo]", *parts, flush=True)


# ------------------------------------------------------------------------------------------------ stages 1-3
def corpus_and_tokenizer(vocab_size):
    from Dataset.text_corpus import build_corpus, split_paths
    train, val = split_paths(os.path.join(CACHE, "corpus.jsonl"))
    if not os.path.isfile(val):
        s = build_corpus(os.path.join(CACHE, "corpus.jsonl"))
        log("corpus: %d stdlib docstrings (%s MB), %d train / %d validation" % (s["documents"], s["mb"], s["train"],
                                                                                 s["validation"]))
    tok_dir = os.path.join(CACHE, "tokenizer_%d" % vocab_size)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        from Utils.train_tokenizer import train_tokenizer
        s = train_tokenizer([train], vocab_size, tok_dir)
        log("tokenizer: byte-level BPE, %d ids, trained in %ss" % (s["vocab_size"], s["seconds"]))
    return train, val, tok_dir


def data(train, val, tokenizer, opts):
    from Dataset.pretrain_data import PretrainData, pretrain_eval_data
    tr = PretrainData(train, tokenizer, opts.max_seq_len, opts.batch_size, data_seed=0, progress=False)
    va = pretrain_eval_data(val, tokenizer, opts.max_seq_len, opts.batch_size, progress=False)
    return tr, va


def fresh_dense(tokenizer, max_seq_len, seed=0):
    """A dense LLaMA_adapter (everything trainable) with GPT-2-style init: N(0, 0.02), residual outputs / √(2L)."""
    from Models.llama_adapter import LLaMA_adapter
    from Models.model_args import ModelArgs
    from Utils.runtime import import_jittor, seed_everything
    jt = import_jittor()
    seed_everything(seed)
    args = ModelArgs.create(dict(DENSE, vocab_size=tokenizer.n_words, max_seq_len=max_seq_len), source="demo")
    model = LLaMA_adapter(args, tokenizer, trainable="all")
    for name, p in model.llama.named_parameters():
        if not name.endswith("norm.weight"):
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.update(jt.randn(p.shape) * std)
    return model


def cosine(lr, steps, warmup, floor=0.1):
    return lambda step, epoch: lr * min(1.0, (step + 1) / warmup) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))


def fit(model, tr, va, out, steps, lr, warmup, val_interval, on_validate=None):
    """engine.Trainer over `steps` optimizer steps; returns (validation loss before training, curve [(step, loss)],
    seconds of training)."""
    from engine.trainer import TrainConfig, Trainer
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(output_dir=out, lr=lr, schedule=cosine(lr, steps, warmup), epochs=10**6, max_steps=steps,
                      val_interval=val_interval, log_interval=5, save_interval=0, betas=(0.9, 0.95), seed=0)
    trainer = Trainer(model, tr, cfg, val_data=va, on_validate=on_validate, print_fn=lambda *a: None)
    start = trainer.evaluate()
    t0 = time.time()
    trainer.fit()
    seconds = time.time() - t0
    curve = [(r["step"], r["val_loss"]) for r in read_log(out) if r["kind"] == "val"]
    return start, curve, seconds


def read_log(run):
    with open(os.path.join(run, "log.txt")) as f:
        return [json.loads(line) for line in f]


def dense_base(tokenizer, tok_dir, tr, va, opts):
    d = os.path.join(CACHE, "dense_%d_%d_%d" % (opts.base_steps, opts.max_seq_len, tokenizer.n_words))
    if os.path.isfile(os.path.join(d, "consolidated.00.pth")):
        log("dense base: cached in %s" % d)
        return d
    log("dense base: training dim %d, %d layers from scratch for %d steps (batch %d x %d tokens)"
        % (DENSE["dim"], DENSE["n_layers"], opts.base_steps, opts.batch_size, opts.max_seq_len))
    model = fresh_dense(tokenizer, opts.max_seq_len)
    _, curve, secs = fit(model, tr, va, d + ".run", opts.base_steps, 3e-3, 40, max(opts.base_steps // 4, 1))
    model.save_pretrained(d)
    shutil.rmtree(d + ".run", ignore_errors=True)
    log("dense base: validation loss %.4f after %d steps (%.0fs)" % (curve[-1][1], opts.base_steps, secs))
    return d


# ------------------------------------------------------------------------------------------------ stages 4-5
def upcycle(dense_dir, out):
    cmd = [sys.executable, os.path.join(ROOT, "upcycle.py"), "--ckpt_dir", dense_dir, "--moe_config", CONFIG,
           "--out_dir", out, "--progress", "false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise UserError("upcycle.py failed: %s" % r.stderr.strip()[-500:])
    return r.stdout.strip().splitlines()


def spread_probe(model):
    """on_validate: how far each MoE layer's copied experts have moved apart (mean pairwise relative distance)."""
    from Models.upcycling import expert_spread

    def probe(m):
        out = {}
        for i, ffn in m.llama.moe_layers():
            E = ffn.n_experts
            blocks = [getattr(ffn.experts, p).numpy().reshape(E, -1) for p in ("w1", "w3", "w2")]
            s = expert_spread(blocks)
            out["spread_L%d" % i], out["cosine_L%d" % i] = s["distance"], s["cosine"]
        return out
    return probe


def loads_of(run, first, last):
    """({layer: assignments per expert} summed over the first `first` logged steps, the same over the last `last`)
    from the run log's expert_load records."""
    import numpy as np
    recs = [r["expert_load"] for r in read_log(run) if r["kind"] == "train" and "expert_load" in r]
    total = lambda rs: {int(k): sum(np.asarray(r[k], float) for r in rs) for k in rs[0]}
    return total(recs[:first]), total(recs[-last:])


def plots(out_dir, runs, spreads, loads, tokens_per_step, img_dir):
    from Utils.plot import _plt, plot_expert_load, plot_runs
    d = os.path.join(out_dir, "plots")
    os.makedirs(d, exist_ok=True)
    made = [os.path.join(d, n + ".png") for n in ("upcycle_val_loss", "upcycle_expert_load_first",
                                                 "upcycle_expert_load", "upcycle_expert_spread")]
    curves = {label: ([s * tokens_per_step / 1e3 for s, _ in runs[k]["curve"]], [v for _, v in runs[k]["curve"]])
              for k, label in (("dense", "dense, trained further"), ("moe", "upcycled MoE (8 experts, top-2)"))}
    plot_runs(curves, made[0], title="validation loss after upcycling (both %.4f at 0): same batches, same schedule"
              % runs["moe"]["start"], xlabel="extra training tokens (thousands)", ylabel="loss (nats/token)")
    for out, load, when in ((made[1], loads[0], "first"), (made[2], loads[1], "last")):
        plot_expert_load(load, out, title="share of top-2 assignments per expert, %s 10%% of the steps "
                                          "(balanced = 0.125)" % when)
    plot_runs({"layer %d" % i: ([s for s, _ in c], [v for _, v in c]) for i, c in sorted(spreads.items())}, made[3],
              title="how far the 8 copies of each FFN have moved apart", xlabel="optimizer steps after upcycling",
              ylabel="mean pairwise |w_a - w_b| / |w|")
    _plt().close("all")
    if img_dir:
        os.makedirs(img_dir, exist_ok=True)
        for f in made:
            shutil.copyfile(f, os.path.join(img_dir, os.path.basename(f)))
    return made


@cli_main
def main(argv=None):
    opts = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # before Jittor starts (see the module docstring)
    t_start = time.time()
    os.makedirs(opts.out_dir, exist_ok=True)
    from Models.hf_tokenizer import HFTokenizer
    from Models.llama_adapter import LLaMA_adapter
    from Models.param_count import count_params
    train, val, tok_dir = corpus_and_tokenizer(opts.vocab_size)
    tokenizer = HFTokenizer(tok_dir)
    tr, va = data(train, val, tokenizer, opts)
    log("data: %s | %s" % (tr.summary, va.summary))
    dense_dir = dense_base(tokenizer, tok_dir, tr, va, opts)
    t_base = time.time()

    moe_dir = os.path.join(opts.out_dir, "upcycled")
    for line in upcycle(dense_dir, moe_dir):
        log("upcycle.py: " + line)
    dense = LLaMA_adapter.from_pretrained(dense_dir, trainable="all")
    moe = LLaMA_adapter.from_pretrained(moe_dir, trainable="all")
    counts = {"dense": count_params(dense.args), "moe": count_params(moe.args)}

    runs = {}
    for name, model in (("moe", moe), ("dense", dense)):
        run = os.path.join(opts.out_dir, name + "_run")
        probe = spread_probe(model) if name == "moe" else None
        log("%s: training %d more steps (the same batches and schedule for both)" % (name, opts.extra_steps))
        start, curve, secs = fit(model, tr, va, run, opts.extra_steps, opts.lr, 20, opts.val_interval, probe)
        runs[name] = dict(start=start, curve=[(0, start)] + curve, seconds=secs, run=run)
        log("%s: validation loss %.6f right after upcycling, %.4f after %d steps (%.0fs, %.0f tokens/s)" % (
            name, start, curve[-1][1], opts.extra_steps, secs, opts.extra_steps * opts.batch_size * opts.max_seq_len
            / secs))

    vals = [r for r in read_log(runs["moe"]["run"]) if r["kind"] == "val"]
    layers = [i for i, _ in moe.llama.moe_layers()]
    spreads = {i: [(0, 0.0)] + [(r["step"], r["spread_L%d" % i]) for r in vals] for i in layers}
    n_logged = len([r for r in read_log(runs["moe"]["run"]) if r["kind"] == "train"])
    loads = loads_of(runs["moe"]["run"], max(n_logged // 10, 1), max(n_logged // 10, 1))
    tps = opts.batch_size * opts.max_seq_len
    made = plots(opts.out_dir, runs, spreads, loads, tps, opts.img_dir)
    summary = {
        "loss_at_upcycling": {"dense": runs["dense"]["start"], "moe": runs["moe"]["start"],
                              "difference": abs(runs["dense"]["start"] - runs["moe"]["start"])},
        "final_val_loss": {k: runs[k]["curve"][-1][1] for k in runs},
        "best_val_loss": {k: min(v for _, v in runs[k]["curve"]) for k in runs},
        "extra_tokens": opts.extra_steps * tps, "params": counts,
        "seconds": {"base_and_data": round(t_base - t_start, 1), "dense_extra": round(runs["dense"]["seconds"], 1),
                    "moe_extra": round(runs["moe"]["seconds"], 1), "total": round(time.time() - t_start, 1)},
        "tokens_per_s": {k: round(opts.extra_steps * tps / runs[k]["seconds"], 1) for k in runs},
        "expert_spread_final": {i: spreads[i][-1][1] for i in layers},
        "expert_load_first": {i: (loads[0][i] / loads[0][i].sum()).round(4).tolist() for i in layers},
        "expert_load_last": {i: (loads[1][i] / loads[1][i].sum()).round(4).tolist() for i in layers},
        "curves": {k: runs[k]["curve"] for k in runs}, "plots": made,
    }
    with open(os.path.join(opts.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log("loss at upcycling: dense %.6f, MoE %.6f (difference %.1e)" % (
        runs["dense"]["start"], runs["moe"]["start"], summary["loss_at_upcycling"]["difference"]))
    log("after %d more tokens: dense %.4f, MoE %.4f; experts moved apart by %s; %.0fs in all" % (
        summary["extra_tokens"], summary["final_val_loss"]["dense"], summary["final_val_loss"]["moe"],
        ", ".join("%.3f (layer %d)" % (v, i) for i, v in summary["expert_spread_final"].items()),
        summary["seconds"]["total"]))
    log("pictures: %s" % ", ".join(made))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
