"""The encoder–decoder MoE demo (seed 003, issue 18): `bash run.sh seq2seq` (or `python demo_seq2seq.py`), about
15 minutes on 2 CPUs.

1. data: generated question → answer pairs with checkable answers (Dataset/instruction_generator.py: word
   problems with worked steps, reversing words, sorting numbers, counting capitals, upper-casing), as the seed's
   {"question", "answer"} JSON;
2. tokenizer: the seed's BPE recipe (Utils/train_tokenizer.py --recipe seq2seq) on the training pairs;
3. training (train_seq2seq.py): an MoE encoder–decoder in the seed's style (8 ReLU experts, top-1, HF Switch's
   fixed capacity per sequence — 6 tokens per expert, ~4× a balanced share of a 12-token answer —, in every second
   layer of both stacks) and the same model with dense FFNs — the same active parameters per token — on the same
   pairs, order and schedule;
4. evaluation: greedy answers to the held-out test pairs: exact match, the task's own answer check
   (`score_answer`), BLEU and chrF (sacrebleu), per task; the MoE's expert load per layer on the test pairs; a few
   answers; both loss curves.

Writes `<out_dir>/` (data, tokenizer, both runs with their logs and models, `results.json`) and the pictures
`seq2seq_loss.png` and `seq2seq_expert_load_{encoder,decoder}.png` to `--img_dir` (docs/img, as the README shows
them).
"""
import json
import os
import subprocess
import sys
import time

from Utils.cli import Parser
from Utils.errors import UserError, cli_main
from Utils.runtime import demo_threads_env

ROOT = os.path.dirname(os.path.abspath(__file__))
BASE = {"embed_size": 128, "num_heads": 4, "hidden_dim": 512, "enc_layers": 4, "dec_layers": 4, "dropout": 0.1,
        "style": "seed", "encoder_sparse_step": 2, "decoder_sparse_step": 2}
MOE = {"num_experts": 8, "top_k": 1, "expert_capacity": 6, "jitter": 0.01, "aux_switch": 0.01, "aux_z": 0.001}


def build_parser():
    p = Parser(prog="demo_seq2seq.py", description="Encoder-decoder MoE vs dense on checkable question/answer pairs")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "output", "demo_seq2seq"))
    p.add_argument("--img_dir", default=os.path.join(ROOT, "docs", "img"))
    p.add_argument("--n_train", type=int, default=6000)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps per model")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    return p


def run_stage(cmd, log):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise UserError("stage failed (%s): %s" % (log, " | ".join(open(log).read().strip().splitlines()[-5:])))
    return time.time() - t0


def write_data(out, n_train, n_test):
    from Dataset.instruction_generator import generate_splits
    splits = generate_splits(n_train, 200, n_test, seed=0)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, recs in splits.items():
        rows = [{"question": r["conversations"][0]["content"], "answer": r["conversations"][1]["content"],
                 "task": r["task"], "check": r["answer"]} for r in recs]
        paths[name] = os.path.join(out, name + ".json")
        with open(paths[name] + ".tmp", "w") as f:
            json.dump(rows, f, ensure_ascii=False)
        os.replace(paths[name] + ".tmp", paths[name])
    return paths, splits


def read_log(run, kind):
    with open(os.path.join(run, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def evaluate(model_dir, test_records):
    """Greedy answers and scores on the test pairs, and (MoE) the expert load per layer over them."""
    import numpy as np
    import sacrebleu
    from Dataset.instruction_generator import score_answer
    from Dataset.seq2seq_data import Encoder, EvalSeq2SeqData
    from Models.seq2seq.files import load_model
    from Utils.runtime import import_jittor
    jt = import_jittor()
    model = load_model(model_dir)
    tok = model.tokenizer
    enc = Encoder(tok, 256, 256)
    pairs = [(r["conversations"][0]["content"], r["conversations"][1]["content"]) for r in test_records]
    out = model.generate([enc.source(q) for q, _ in pairs], max_new_tokens=64)
    preds = [tok.decode(t).strip() for t in out]
    refs = [a.strip() for _, a in pairs]
    per_task = {}
    for r, p, a in zip(test_records, preds, refs):
        t = per_task.setdefault(r["task"], [0, 0, 0])
        t[0] += 1
        t[1] += p == a
        t[2] += bool(score_answer(r, p))
    res = {"n": len(refs), "exact_match": float(np.mean([p == a for p, a in zip(preds, refs)])),
           "answer_correct": float(np.mean([bool(score_answer(r, p)) for r, p in zip(test_records, preds)])),
           "bleu": sacrebleu.corpus_bleu(preds, [refs]).score, "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
           "per_task": {k: {"n": v[0], "exact_match": v[1] / v[0], "answer_correct": v[2] / v[0]}
                        for k, v in sorted(per_task.items())},
           "examples": [{"question": q, "reference": a, "prediction": p} for (q, a), p in zip(pairs[:6], preds)],
           "parameters": model.num_parameters()}
    if model.cfg.is_moe:   # teacher-forced pass over the test pairs, counting kept assignments per expert
        load = {}
        cfg = model.cfg
        data = EvalSeq2SeqData(enc.pairs(pairs), 32, (cfg.pad_token_id, cfg.decoder_start_token_id,
                                                       cfg.eos_token_id))
        for batch, _ in data.batches():
            model.loss_terms({k: jt.array(v) for k, v in batch.items()})
            for name, v in model.routing_load().items():
                load[name] = load.get(name, 0) + v
        res["expert_load"] = {k: [int(x) for x in v] for k, v in sorted(load.items())}
    return res


@cli_main
def main(argv=None):
    a = build_parser().parse_args(argv)
    t_start = time.time()
    print("threads: %s" % demo_threads_env(), flush=True)
    os.makedirs(a.out_dir, exist_ok=True)
    os.makedirs(a.img_dir, exist_ok=True)
    times = {}
    print("[1/4] data: %d training pairs, 200 validation, %d test (5 checkable tasks)" % (a.n_train, a.n_test),
          flush=True)
    paths, splits = write_data(os.path.join(a.out_dir, "data"), a.n_train, a.n_test)
    print("[2/4] tokenizer: the seed's BPE recipe, vocab %d" % a.vocab_size, flush=True)
    from Utils.train_tokenizer import train_tokenizer
    tok_dir = os.path.join(a.out_dir, "tokenizer")
    train_tokenizer(paths["train"], a.vocab_size, tok_dir, recipe="seq2seq")
    runs = {}
    for name, cfg in (("moe", dict(BASE, moe=MOE)), ("dense", dict(BASE, moe=None))):
        cfg_path = os.path.join(a.out_dir, "%s_params.json" % name)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=1)
        runs[name] = os.path.join(a.out_dir, name)
        if os.path.isdir(runs[name]):
            import shutil
            shutil.rmtree(runs[name])
        cmd = [sys.executable, os.path.join(ROOT, "train_seq2seq.py"), "--data_path", paths["train"],
               "--val_data_path", paths["validation"], "--tokenizer", tok_dir, "--model_config", cfg_path,
               "--output_dir", runs[name], "--batch_size", str(a.batch_size), "--epochs", "100",
               "--max_steps", str(a.steps), "--lr", str(a.lr), "--warmup_steps", "50", "--lr_schedule", "cosine",
               "--val_interval", str(max(a.steps // 2, 1)), "--val_generate", "50", "--val_max_new_tokens", "48",
               "--log_interval", "10",
               "--save_interval", "0", "--progress", "false"]
        print("[3/4] training the %s model (%d steps): %s" % (name, a.steps, " ".join(cmd[1:])), flush=True)
        times["train_" + name] = run_stage(cmd, os.path.join(a.out_dir, "%s.log" % name))
        print("      %.0f s" % times["train_" + name], flush=True)
    print("[4/4] evaluation on %d held-out pairs" % a.n_test, flush=True)
    t0 = time.time()
    results = {name: evaluate(os.path.join(run, "model"), splits["test"]) for name, run in runs.items()}
    times["evaluate"] = time.time() - t0

    from Utils.plot import plot_expert_load, plot_runs
    curves = {}
    for name, run in runs.items():
        tr = read_log(run, "train")
        curves["%s train" % name] = ([r["step"] for r in tr], [r.get("nll", r["loss"]) for r in tr])
        va = read_log(run, "val")
        curves["%s validation" % name] = ([r["step"] for r in va], [r["val_loss"] for r in va])
    curves = {k: v for k, v in curves.items() if v[0]}   # (a very short run may log no train line)
    plot_runs(curves, os.path.join(a.img_dir, "seq2seq_loss.png"),
              title="cross-entropy per target token: MoE vs dense encoder-decoder (train: unsmoothed)")
    pictures = [os.path.join(a.img_dir, "seq2seq_loss.png")]
    for stack in ("encoder", "decoder"):   # one picture per stack: its layer ids label the rows
        load = {int(k.split(".")[1]): v for k, v in results["moe"]["expert_load"].items() if k[:3] == stack[:3]}
        pictures.append(os.path.join(a.img_dir, "seq2seq_expert_load_%s.png" % stack))
        plot_expert_load(load, pictures[-1], title="MoE %s: share of the test pairs' kept assignments per expert "
                                                   "(balanced = 1/8)" % stack)
    times["total"] = time.time() - t_start
    results["seconds"] = times
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)

    print("\n| model | parameters | exact match | answer correct | BLEU | chrF |")
    print("|---|---|---|---|---|---|")
    for name in ("moe", "dense"):
        r = results[name]
        print("| %s | %d | %.3f | %.3f | %.1f | %.1f |" % (name, r["parameters"], r["exact_match"],
                                                           r["answer_correct"], r["bleu"], r["chrf"]))
    print("\nper task (exact match / answer correct):")
    for task in results["moe"]["per_task"]:
        m, d = results["moe"]["per_task"][task], results["dense"]["per_task"][task]
        print("  %-15s MoE %.2f / %.2f   dense %.2f / %.2f" % (task, m["exact_match"], m["answer_correct"],
                                                              d["exact_match"], d["answer_correct"]))
    print("\nMoE answers:")
    for ex in results["moe"]["examples"]:
        print("  Q: %s\n     expected: %s\n     MoE:      %s" % (ex["question"], ex["reference"], ex["prediction"]))
    print("\nexpert load per layer (kept assignments):")
    for layer, v in results["moe"]["expert_load"].items():
        print("  %s %s" % (layer, v))
    print("\npictures: %s; results: %s; total %.0f s" % (", ".join(pictures), os.path.join(a.out_dir, "results.json"),
                                                         times["total"]))
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)
