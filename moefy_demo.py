"""The MoEfication demo (`bash run.sh moefy`, or `python moefy.py demo`): MoEfication's finding on models a laptop
trains in minutes, end to end.

1. corpus: the docstrings of Python's standard library (Dataset/text_corpus.py), train / validation by hash;
2. a byte-level BPE tokenizer trained on the training part (Utils/train_tokenizer.py);
3. two tiny LLaMA-shaped models pretrained by the project's front end (pretrain.py → engine.Trainer) on the same
   tokens: one with LLaMA's SwiGLU FFN, one with a plain ReLU FFN of the same parameter count;
4. each MoEfied by `moefy.py all`: split into E groups, features, routers, conversion, perplexity on the held-out
   docstrings for k/E ∈ {12.5, 25, 50, 100 %} with ground-truth, trained-router, similarity and random selection;
5. the FFN speed-up at k/E = 25 % at decode shapes (bench/moefy_ffn.py);
6. one picture with both models' curves and router recall per layer, and the numbers as a table.

Steps 1–3 are cached (.cache/moefy_demo/); a re-run redoes 4–6. Everything lands in --out_dir; the picture is also
copied to --img_dir (docs/img/moefy_retained.png, the README's). On a machine busier than its CPUs the stages run
with one OpenMP thread (OMP_NUM_THREADS overrides).
"""
import json
import os
import shutil
import subprocess
import sys
import time

from Utils.cli import Parser
from Utils.errors import UserError, cli_main
from Utils.runtime import demo_threads_env

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "moefy_demo", "v1")
MODELS = {  # same attention, same FFN parameter count (SwiGLU: 3·d·384, ReLU: 2·d·576)
    "SwiGLU": dict(intermediate_size=384),
    "ReLU": dict(intermediate_size=576, hidden_act="relu", ffn_gated=False),
}


def build_parser():
    p = Parser(prog="moefy.py demo", description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default=os.path.join(ROOT, "output", "moefy_demo"))
    p.add_argument("--steps", type=int, default=400, help="pretraining steps per model")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--num_experts", type=int, default=16)
    p.add_argument("--num_selects", type=int, default=4)
    p.add_argument("--method", default="kmeans", choices=("random", "contiguous", "kmeans", "graph"))
    p.add_argument("--criterion", default="l2_norm", choices=("plain", "positive", "l1_norm", "l2_norm"))
    p.add_argument("--activation", default="product", choices=("auto", "gate", "product"))
    p.add_argument("--feature_tokens", type=int, default=40000, help="tokens of FFN features per model")
    p.add_argument("--gate_epochs", type=int, default=10)
    p.add_argument("--eval_rows", type=int, default=64, help="held-out rows of --seq_len tokens (0 = all)")
    p.add_argument("--bench_shape", default="2048,5632", help="dim,d_ff of the FFN speed measurement ('' = skip)")
    p.add_argument("--img_dir", default=os.path.join(ROOT, "docs", "img"),
                   help="where moefy_retained.png goes (the README shows docs/img's)")
    return p


def _run(cmd, log_path, what):
    """A stage as its own process, its output in log_path; a failure is one line with the log's tail."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode != 0:
        tail = open(log_path).read().strip().splitlines()[-3:]
        raise UserError("%s failed (%s): %s" % (what, log_path, " | ".join(tail)))


def corpus_and_tokenizer(vocab_size, log):
    from Dataset.text_corpus import build_corpus
    train, val = os.path.join(CACHE, "corpus.train.jsonl"), os.path.join(CACHE, "corpus.validation.jsonl")
    if not (os.path.isfile(train) and os.path.isfile(val)):
        os.makedirs(CACHE, exist_ok=True)
        build_corpus(os.path.join(CACHE, "corpus.jsonl"))
    tok = os.path.join(CACHE, "tok_%d" % vocab_size)
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
        from Utils.train_tokenizer import train_tokenizer
        s = train_tokenizer(train, vocab_size, tok)
        log("      tokenizer: %d ids (byte-level BPE) trained on %d docstrings in %.1fs" % (s["vocab_size"],
                                                                                          s["texts"], s["seconds"]))
    return train, val, tok


def pretrain(name, o, train, val, tok, logs, log):
    """The dense model `name` trained by pretrain.py (cached); returns its model/ directory."""
    out = os.path.join(CACHE, "%s_d%d_l%d_v%d_s%d" % (name.lower(), o.dim, o.n_layers, o.vocab_size, o.steps))
    model = os.path.join(out, "model")
    if os.path.isfile(os.path.join(model, "consolidated.00.pth")):
        log("      %s: cached in %s" % (name, model))
        return model
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cfg = dict(dim=o.dim, n_layers=o.n_layers, n_heads=4, n_kv_heads=2, max_seq_len=o.seq_len, multiple_of=32,
               norm_eps=1e-5, rope_theta=10000.0, **MODELS[name])
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(cfg, f)
    t0 = time.time()
    _run([sys.executable, "pretrain.py", "--data_path", train, "--val_data_path", val, "--model_config",
          os.path.join(out, "params.json"), "--tokenizer", tok, "--output_dir", os.path.join(out, "run"),
          "--batch_size", "16", "--max_seq_len", str(o.seq_len), "--epochs", "100", "--max_steps", str(o.steps),
          "--lr", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "40", "--weight_decay", "0.1", "--val_interval",
          str(max(o.steps // 4, 1)), "--save_interval", "0", "--log_interval", "50", "--progress", "false",
          "--token_cache_dir", os.path.join(CACHE, "token_cache")],
         os.path.join(logs, "pretrain_%s.log" % name.lower()), "pretraining %s" % name)
    os.replace(os.path.join(out, "run", "model"), model)
    with open(os.path.join(out, "run", "train_summary.json")) as f:
        summary = json.load(f)
    shutil.copyfile(os.path.join(out, "run", "train_summary.json"), os.path.join(out, "train_summary.json"))
    log("      %s: %d steps, best val loss %.3f, %.0f tokens/s (%.0fs)" % (
        name, summary["steps"], summary.get("best_val_loss") or float("nan"), summary["tokens_per_s"],
        time.time() - t0))
    return model


def moefy(name, model, o, train, val, logs):
    work = os.path.join(o.out_dir, name.lower())
    shutil.rmtree(work, ignore_errors=True)
    template = "gate"
    _run([sys.executable, "moefy.py", "all", "--model", model, "--work_dir", work, "--data", train, "--eval_data",
          val, "--num_experts", str(o.num_experts), "--num_selects", str(o.num_selects), "--method", o.method,
          "--template", template, "--activation", o.activation, "--criterion", o.criterion, "--seq_len",
          str(o.seq_len), "--batch_size", "16", "--max_tokens", str(o.feature_tokens), "--epochs",
          str(o.gate_epochs), "--max_eval_rows", str(o.eval_rows), "--progress", "false"],
         os.path.join(logs, "moefy_%s.log" % name.lower()),
         "MoEfying %s" % name)
    with open(os.path.join(work, "eval", "results.json")) as f:
        return json.load(f)


def bench(shape, logs):
    if not shape:
        return []
    d, f = (int(v) for v in shape.split(","))
    path = os.path.join(logs, "bench_moefy_ffn.jsonl")
    cmd = [sys.executable, "bench/moefy_ffn.py", "--dim", str(d), "--d_ff", str(f), "--rounds", "3", "--reps", "10"]
    with open(path, "w") as out, open(os.path.join(logs, "bench_moefy_ffn.log"), "w") as err:
        r = subprocess.run(cmd, stdout=out, stderr=err, cwd=ROOT)
    if r.returncode != 0:
        raise UserError("bench/moefy_ffn.py failed (%s)" % os.path.join(logs, "bench_moefy_ffn.log"))
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def table(results):
    """Markdown rows: model (dense perplexity), selection, then perplexity (retained %) at each k/E."""
    ks = sorted({(r["k"], r["num_experts"]) for res in results.values() for r in res["rows"]})
    lines = ["| model | selection | " + " | ".join("k = %d/%d" % k for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for name, res in results.items():
        by = {(r["method"], r["k"]): r for r in res["rows"]}
        for method in dict.fromkeys(r["method"] for r in res["rows"]):
            cells = []
            for k, _ in ks:
                r = by.get((method, k))
                cells.append("%.2f (%.1f%%)" % (r["ppl"], 100 * r["retained"]) if r else "-")
            lines.append("| %s (dense ppl %.2f) | %s | %s |" % (name, res["dense"]["ppl"], method, " | ".join(cells)))
    return lines


def write_json(path, obj):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


@cli_main
def main(argv=None):
    o = build_parser().parse_args(argv)
    if o.dim % 4 or o.num_selects > o.num_experts:
        raise UserError("--dim must be a multiple of 4 heads and --num_selects <= --num_experts")
    if o.bench_shape:
        try:
            d, f = (int(v) for v in o.bench_shape.split(","))
        except ValueError:
            d = f = 0
        if d < 1 or f < 1 or f % o.num_experts:
            raise UserError("--bench_shape: expected 'dim,d_ff' with d_ff a multiple of --num_experts %d, got %r"
                            % (o.num_experts, o.bench_shape))
    t_start = time.time()
    logs = os.path.join(o.out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    log = lambda *a: print(*a, flush=True)
    log("OpenMP threads: %s" % demo_threads_env())
    log("[1/6] corpus + tokenizer: Python's stdlib docstrings, byte-level BPE (%d ids)" % o.vocab_size)
    train, val, tok = corpus_and_tokenizer(o.vocab_size, log)
    log("[2/6] pretraining the dense models (pretrain.py, %d steps each; cached): %s" % (o.steps, ", ".join(MODELS)))
    bases = {name: pretrain(name, o, train, val, tok, logs, log) for name in MODELS}
    results = {}
    for i, (name, model) in enumerate(bases.items()):
        log("[%d/6] MoEfying %s: %s split into %d experts, routers for k=%d, evaluation" % (
            3 + i, name, o.method, o.num_experts, o.num_selects))
        t0 = time.time()
        results[name] = moefy(name, model, o, train, val, logs)
        by = results[name]["retained"]
        log("      %s: retained at k/E=25%%: %s (%.0fs)" % (name, ", ".join(
            "%s %.1f%%" % (m, 100 * v.get("0.25", float("nan"))) for m, v in by.items()), time.time() - t0))
    log("[5/6] FFN speed at decode shapes, k/E = %d/%d (bench/moefy_ffn.py %s)" % (
        o.num_selects, o.num_experts, o.bench_shape))
    speed = bench(o.bench_shape, logs)
    for r in speed:
        log("      batch %d: dense %.3f ms, MoE %.3f ms -> %.2fx (experts read: %.0f%%)" % (
            r["rows"], r["dense_ms"], r["moe_ms"], r["ratio"], 100 * r["union_fraction"]))
    log("[6/6] picture and table")
    from Utils.moefy_plot import plot_moefication
    picture = os.path.join(o.out_dir, "moefy_retained.png")
    label = ("k/E=%d/%d, FFN %dx%d\n" % (o.num_selects, o.num_experts, speed[0]["d"], speed[0]["d_ff"])
             + ", ".join("B=%d %.1fx" % (r["rows"], r["ratio"]) for r in speed)) if speed else None
    plot_moefication(results, picture, speedup=label,
                     title="MoEfication of two tiny LLaMA-shaped models (%d experts per FFN, held-out docstrings)"
                           % o.num_experts)
    if o.img_dir:
        os.makedirs(o.img_dir, exist_ok=True)
        dst = os.path.join(o.img_dir, "moefy_retained.png")
        shutil.copyfile(picture, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    summary = {"results": results, "speed": speed, "minutes": (time.time() - t_start) / 60, "args": vars(o)}
    write_json(os.path.join(o.out_dir, "summary.json"), summary)
    log("")
    for line in table(results):
        log(line)
    log("")
    for name, res in results.items():
        gate = res.get("gate") or {}
        log("%s router recall@%d per layer: %s" % (name, o.num_selects, ", ".join(
            "%.2f" % gate[k]["val_recall"] for k in sorted(gate, key=int))))
    log("picture: %s; logs and stage files: %s (%.1f min)" % (picture, o.out_dir, summary["minutes"]))


if __name__ == "__main__":
    main()
