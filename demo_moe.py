"""The MoE-LLM demo (seed 001, issue 15 §5): `bash run.sh moe` (or `python demo_moe.py`). It took 27 min on the
2-core VM while other jobs kept the load average at 6-10 (one OpenMP thread); its SFT stage ran ~4x faster once
the load dropped, so a quiet machine takes much less (README: the numbers of that run).

1. corpus: the docstrings of this Python's standard library (Dataset/text_corpus.py; every machine has it offline);
2. tokenizer: a byte-level BPE trained on the training part (Utils/train_tokenizer.py, ChatML template);
3. pretraining (pretrain.py): a tiny MoE LM (every layer 8 SwiGLU experts, top-2) and a dense LM whose FFN is as
   wide as the two active experts — the same active parameters per token — on the same tokens, same order, same
   schedule;
4. SFT (sft.py) of the MoE LM on generated instruction pairs with checkable answers (Dataset/instruction_generator.py);
5. evaluation: greedy answers to held-out prompts before and after SFT, scored by `score_answer`; the expert load
   of the pretrained MoE on the validation text; both validation-loss curves.

Writes `<out_dir>/` (the runs, their logs, `results.json`) and the pictures `moe_val_loss.png` and
`moe_expert_load.png` to `--img_dir` (docs/img by default, as the README shows them). The corpus, the tokenizer and
the token caches are kept in .cache/demo_moe/ for the next run; the models are trained every time. Every file is
written to a temporary name and renamed. Each training stage shows a progress bar (followed from the run's log.txt;
the stage's own output goes to <out_dir>/logs/). Under `mpirun` the demo runs once, on rank 0, and its stages run as
single processes (the other ranks exit at once, silently).
"""
import json
import os
import shutil
import subprocess
import sys
import time

from Utils.cli import Parser
from Utils.distributed import launcher_rank
from Utils.errors import UserError, cli_main
from Utils.runtime import demo_threads_env

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "demo_moe", "v1")  # bump when the corpus or tokenizer recipe changes
# A tiny Mixtral-style MoE and its dense twin: attention, embeddings and the active FFN width (2 × 256) are equal.
BASE = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 512, "max_seq_len": 128,
        "tie_word_embeddings": True, "rope_theta": 10000.0, "norm_eps": 1e-6}
# The balance loss is per layer (minimind2's sequence-level form): HF's Switch form averages f and P over the layers
# concatenated, and in this demo it sat at its balanced value (2.0 = k) while layer 3 sent 47% of its assignments to
# one expert — each layer favoured a different expert, so the imbalances cancelled in the average (README).
MOE = {"num_experts": 8, "top_k": 2, "expert_hidden": 256, "scoring": "softmax_topk", "norm_topk_prob": True,
       "aux_seq": 0.01}


def build_parser():
    p = Parser(prog="demo_moe.py", description="MoE LLM from scratch: tokenizer, MoE vs dense pretraining, SFT.")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "output", "demo_moe"))
    p.add_argument("--img_dir", default=os.path.join(ROOT, "docs", "img"))
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2, help="pretraining epochs over the corpus (both models)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--n_sft", type=int, default=4000, help="generated SFT conversations")
    p.add_argument("--sft_epochs", type=int, default=3)
    p.add_argument("--n_test", type=int, default=100, help="held-out prompts answered before and after SFT")
    p.add_argument("--max_steps", type=int, default=0, help="cap every training run (0 = no cap; smoke tests)")
    return p


MINIMUM = {"vocab_size": 300, "epochs": 1, "batch_size": 1, "n_sft": 1, "sft_epochs": 1, "n_test": 1, "max_steps": 0}


def check_args(a):
    """One-line errors naming the flag (a byte-level BPE needs its 256 bytes and the special tokens)."""
    for name, low in MINIMUM.items():
        if getattr(a, name) < low:
            raise UserError("--%s must be >= %d, got %d" % (name, low, getattr(a, name)))
    for flag in ("out_dir", "img_dir"):
        path = getattr(a, flag)
        if os.path.exists(path) and not os.path.isdir(path):
            raise UserError("--%s %s: exists and is not a directory" % (flag, path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise UserError("--%s %s: cannot create it (%s)" % (flag, path, e.strerror or e))


def write_json(path, obj, **kw):
    """json.dump to a temporary file, then rename: a killed run never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **kw)
    os.replace(tmp, path)


def single_process_env():
    """Under mpirun: True on rank 0, whose environment loses mpirun's variables so that its stages (and the
    evaluation in this process) run as ordinary single processes; False on the other ranks, which do nothing."""
    if launcher_rank() != 0:
        return False
    for k in list(os.environ):
        if k.startswith(("OMPI_COMM_WORLD", "OMPI_MCA", "PMIX_", "PMI_")):
            del os.environ[k]
    return True


def _total_steps(log):
    """The optimizer steps a pretrain.py / sft.py run announces ("optimizer: N steps ...") once its data is read."""
    try:
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith("optimizer: "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _last_step(run_dir):
    """The last optimizer step the run's log.txt recorded (train or val line), 0 before the first."""
    step = 0
    try:
        with open(os.path.join(run_dir, "log.txt")) as f:
            for line in f:
                try:
                    step = max(step, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError):
                    pass
    except OSError:
        pass
    return step


def run_stage(cmd, log, run_dir, desc, max_steps=0):
    """A pipeline stage in its own process; its output goes to the stage log, and a progress bar follows the run's
    log.txt (one line every --log_interval steps). Returns the seconds it took; a failure is a one-line error."""
    from tqdm import tqdm
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "w") as f, tqdm(desc=desc, unit="step", dynamic_ncols=True, leave=True) as bar:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(2.0)
                if bar.total is None:
                    total = _total_steps(log)
                    if total:
                        bar.total = min(total, max_steps) if max_steps else total
                        bar.refresh()
                step = _last_step(run_dir)
                if step > bar.n:
                    bar.update(step - bar.n)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode == 0 and bar.total:
            bar.update(max(0, bar.total - bar.n))
    if proc.returncode != 0:
        tail = open(log, errors="replace").read().strip().splitlines()[-5:]
        raise UserError("stage failed (%s): %s" % (log, " | ".join(tail)))
    return time.time() - t0


def prepare_text(vocab_size):
    """Corpus + tokenizer (cached); returns their summary."""
    from Dataset.text_corpus import build_corpus, split_paths
    from Utils.train_tokenizer import train_tokenizer
    os.makedirs(CACHE, exist_ok=True)
    corpus = os.path.join(CACHE, "stdlib_docstrings.jsonl")
    train, val = split_paths(corpus)
    info_path = os.path.join(CACHE, "corpus.json")
    if not (os.path.isfile(train) and os.path.isfile(val) and os.path.isfile(info_path)):
        write_json(info_path, build_corpus(corpus), indent=1)
    info = json.load(open(info_path))
    tok_dir = os.path.join(CACHE, "tokenizer_%d" % vocab_size)
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(train, vocab_size, tok_dir)
    from Dataset.pretrain_data import load_corpus
    from Models.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir)
    n_train = len(load_corpus(train, tok, progress=False).tokens)   # token cache beside the file, reused by training
    n_val = len(load_corpus(val, tok, progress=False).tokens)
    return dict(info, train_path=train, val_path=val, tokenizer=tok_dir, train_tokens=n_train, val_tokens=n_val)


def write_configs(out_dir):
    paths = {}
    for name, cfg in (("moe", dict(BASE, moe=MOE)), ("dense", BASE)):
        paths[name] = os.path.join(out_dir, "%s.json" % name)
        write_json(paths[name], cfg, indent=1)
    return paths


def read_log(out_dir, kind):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def answer_all(model, records, max_gen_len=64, batch=32):
    """Greedy answers (text) of the model to each record's prompt, in its chat template."""
    from Dataset.instruction_generator import prompt_messages
    tok = model.tokenizer
    prompts = [tok.encode_chat(prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    out = []
    for i in range(0, len(prompts), batch):
        out += model.generate(prompts[i:i + batch], max_gen_len, temperature=0.0)
    return [tok.decode(o) for o in out]


def score(records, answers):
    from Dataset.instruction_generator import score_answer
    per = {}
    for r, a in zip(records, answers):
        per.setdefault(r["task"], []).append(bool(score_answer(r, a)))
    total = [x for v in per.values() for x in v]
    return {"accuracy": sum(total) / len(total), "per_task": {k: sum(v) / len(v) for k, v in sorted(per.items())}}


def expert_load(model, val_path, max_seq_len, batch_size):
    """{layer: routed assignments per expert} of the model over a validation corpus (one pass, no gradients)."""
    import numpy as np
    from Dataset.pretrain_data import pretrain_eval_data
    from Utils.runtime import import_jittor
    jt = import_jittor()
    model.eval()
    for _, ffn in model.llama.moe_layers():
        ffn.record = True   # keep each forward's Selection under no_grad
    data = pretrain_eval_data(val_path, model.tokenizer, max_seq_len, batch_size, progress=False)
    total = {}
    with jt.no_grad():
        for batch, _ in data.batches():
            model.loss_terms({k: jt.array(v) for k, v in batch.items()})
            for layer, counts in model.routing_load().items():
                total[layer] = total.get(layer, 0) + np.asarray(counts, dtype=np.float64)
    for _, ffn in model.llama.moe_layers():
        ffn.record = False
    return total


def evaluate(a, runs, text, sft_test):
    """Answers before/after SFT, expert load, pictures; returns the results dict."""
    from Models.llama_adapter import LLaMA_adapter
    from Utils import plot
    from Utils.runtime import seed_everything
    seed_everything(0)
    records = [json.loads(l) for l in open(sft_test)][:a.n_test]
    before = LLaMA_adapter.from_pretrained(os.path.join(runs["moe"], "model"))
    ans_before = answer_all(before, records)
    load = expert_load(before, text["val_path"], BASE["max_seq_len"], a.batch_size)
    after = LLaMA_adapter.from_pretrained(os.path.join(runs["sft"], "model"))
    ans_after = answer_all(after, records)
    curves = {}
    for name, label in (("moe", "MoE (8 experts, top-2)"), ("dense", "dense (same active params)")):
        vals = read_log(runs[name], "val")
        curves[label] = ([v["step"] for v in vals], [v["val_loss"] for v in vals])
    pics = {"val_loss": os.path.join(a.img_dir, "moe_val_loss.png"),
            "expert_load": os.path.join(a.img_dir, "moe_expert_load.png")}
    tmp = {k: v[:-len(".png")] + ".tmp.png" for k, v in pics.items()}   # drawn, then renamed into place
    plot.plot_runs(curves, tmp["val_loss"], title="validation loss on held-out stdlib docstrings (same tokens)")
    _, _, matrix = plot.plot_expert_load(load, tmp["expert_load"])
    plot._plt().close("all")
    for k in pics:
        os.replace(tmp[k], pics[k])
    examples = [{"task": r["task"], "prompt": r["conversations"][0]["content"], "expected": r["answer"],
                 "before_sft": b, "after_sft": f} for r, b, f in zip(records, ans_before, ans_after)]
    return {"before_sft": score(records, ans_before), "after_sft": score(records, ans_after),
            "expert_load_share": matrix.round(4).tolist(), "pictures": pics, "examples": examples}


def table(runs, text):
    rows = []
    for name in ("moe", "dense"):
        s = json.load(open(os.path.join(runs[name], "train_summary.json")))
        rows.append({"model": name, "total_params": s["params"]["total"], "active_params": s["params"]["active"],
                     "best_val_loss": s["best_val_loss"], "tokens": s["tokens"], "seconds": s["seconds"],
                     "tokens_per_s": s["tokens_per_s"], "steady_tokens_per_s": s["steady_tokens_per_s"]})
    return rows


@cli_main
def main(argv=None):
    a = build_parser().parse_args(argv)
    if not single_process_env():
        return   # mpirun's other ranks: rank 0 runs the whole demo
    check_args(a)
    t_start = time.time()
    threads_line = demo_threads_env()
    threads = os.environ.get("OMP_NUM_THREADS")
    py = sys.executable
    logs = os.path.join(a.out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    print("[setup] OpenMP threads: %s" % threads_line, flush=True)

    text = prepare_text(a.vocab_size)
    print("[1/5] corpus: %d docstrings of the Python %s standard library, %.2f MB (%d train / %d validation)"
          % (text["documents"], sys.version.split()[0], text["mb"], text["train"], text["validation"]))
    print("[2/5] byte-level BPE tokenizer of %d ids: %d training tokens, %d validation tokens"
          % (a.vocab_size, text["train_tokens"], text["val_tokens"]), flush=True)

    configs = write_configs(a.out_dir)
    runs = {k: os.path.join(a.out_dir, k) for k in ("moe", "dense", "sft")}
    for d in runs.values():
        shutil.rmtree(d, ignore_errors=True)
    common = ["--tokenizer", text["tokenizer"], "--data_path", text["train_path"], "--val_data_path",
              text["val_path"], "--batch_size", a.batch_size, "--epochs", a.epochs, "--lr", "3e-3", "--min_lr",
              "3e-4", "--warmup_steps", 20, "--val_interval", 30, "--log_interval", 5, "--save_interval", 0,
              "--progress", "false", "--max_steps", a.max_steps]
    seconds = {}
    for name in ("moe", "dense"):
        print("[3/5] pretraining the %s LM (%d epochs over the corpus) -> %s" % (name, a.epochs, runs[name]),
              flush=True)
        seconds[name] = run_stage([py, "pretrain.py", "--model_config", configs[name], "--output_dir", runs[name]]
                                  + [str(x) for x in common], os.path.join(logs, "pretrain_%s.log" % name),
                                  runs[name], "pretrain " + name, a.max_steps)

    from Dataset.instruction_generator import write_splits
    sft_dir = os.path.join(a.out_dir, "sft_data")
    write_splits(sft_dir, a.n_sft, 100, a.n_test, seed=0)
    print("[4/5] SFT of the MoE LM on %d generated instruction pairs (%d epochs) -> %s"
          % (a.n_sft, a.sft_epochs, runs["sft"]), flush=True)
    seconds["sft"] = run_stage([py, "sft.py", "--init_from", os.path.join(runs["moe"], "model"), "--data_path",
                                os.path.join(sft_dir, "train.jsonl"), "--val_data_path",
                                os.path.join(sft_dir, "validation.jsonl"), "--output_dir", runs["sft"],
                                "--batch_size", str(a.batch_size), "--epochs", str(a.sft_epochs), "--lr", "2e-3",
                                "--min_lr", "2e-4", "--warmup_steps", "10", "--max_seq_len", "128",
                                "--val_interval", "50", "--log_interval", "5", "--save_interval", "0",
                                "--progress", "false", "--max_steps", str(a.max_steps)],
                               os.path.join(logs, "sft.log"), runs["sft"], "SFT", a.max_steps)

    print("[5/5] answering %d held-out prompts before and after SFT; expert load; pictures" % a.n_test, flush=True)
    res = evaluate(a, runs, text, os.path.join(sft_dir, "test.jsonl"))
    res.update(text=text, table=table(runs, text), stage_seconds=seconds, omp_threads=threads,
               minutes=round((time.time() - t_start) / 60, 1))
    write_json(os.path.join(a.out_dir, "results.json"), res, indent=1)
    print()
    print("%-6s %12s %14s %14s %10s %12s" % ("model", "parameters", "active/token", "best val loss", "tokens",
                                             "tokens/s"))
    for r in res["table"]:
        print("%-6s %12d %14d %14.4f %10d %12.0f" % (r["model"], r["total_params"], r["active_params"],
                                                     r["best_val_loss"], r["tokens"],
                                                     r["steady_tokens_per_s"] or r["tokens_per_s"]))
    for when in ("before_sft", "after_sft"):
        s = res[when]
        print("%s: accuracy %.3f  (%s)" % (when.replace("_", " "), s["accuracy"],
                                           ", ".join("%s %.2f" % kv for kv in s["per_task"].items())))
    for e in res["examples"][:5]:
        print("  %s\n    expected %r | before %r | after %r" % (e["prompt"], e["expected"], e["before_sft"][:60],
                                                              e["after_sft"][:60]))
    print("pictures: %s; everything: %s   (%.1f min)" % (", ".join(res["pictures"].values()),
                                                         os.path.join(a.out_dir, "results.json"), res["minutes"]))


if __name__ == "__main__":
    main()
