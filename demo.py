"""The main job on the embedded default: `python demo.py` (see README). `python demo.py generate ...` runs a plain
generation from a checkpoint directory (or the cached tiny demo base when none is given)."""
import os
import sys
import time

from Utils.cli import Parser
from Utils.errors import UserError, cli_main

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "demo")
DEMO_VERSION = 3  # bump when the generated data or the base recipe changes, so stale caches are not reused


def tiny_base_dir():
    """A tiny LLaMA-3-shaped random base with the real tokenizer, written once and reused."""
    from Models.tiny_checkpoint import make_tiny_checkpoint
    d = os.path.join(CACHE, "random_base")
    if not os.path.isfile(os.path.join(d, "consolidated.00.pth")):
        make_tiny_checkpoint(d, fmt="meta", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, seed=0)
    return d


def build_generate_parser():
    p = Parser(prog="demo.py generate", description="Greedy/top-p generation from a checkpoint.")
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--adapter_path", default=None)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max_gen_len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=0.75)
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help="Hugging Face's repetition penalty on prompt and generated tokens (1.0 = off)")
    return p


def cmd_generate(argv):
    a = build_generate_parser().parse_args(argv)
    from Models import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(1)
    ckpt = a.ckpt_dir or tiny_base_dir()
    model = LLaMA_adapter.from_pretrained(ckpt, adapter_path=a.adapter_path)
    prompts = a.prompt or ["Below is an instruction.", "3 + 4 ="]
    toks = [model.tokenizer.encode(t, bos=True, eos=False) for t in prompts]
    t0 = time.time()
    outs = model.generate(toks, a.max_gen_len, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          repetition_penalty=a.repetition_penalty)
    for t, o in zip(prompts, outs):
        print("%s -> %r" % (t, model.tokenizer.decode(o)))
    print("generated %d tokens in %.2fs" % (sum(map(len, outs)), time.time() - t0))


def train_tiny_base(out_dir, records, tokenizer, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                    steps=300, batch_size=16, lr=3e-3, warmup=30, seed=0, extra_records=(), log=print):
    """Train a fresh tiny LLaMA-3-shaped base on `records` (plain language modelling) with the project's engine and
    write `params.json` + `consolidated.00.pth` + the tokenizer to out_dir. The model trains over a compact
    vocabulary (Models/compact_vocab.py) and is exported with the full one; `extra_records` only widen that
    vocabulary (a fine-tuning task's words, so adapters can later learn to produce them). Returns the per-step losses.
    """
    import json
    import math
    import shutil
    import numpy as np
    from Dataset import LMData, lm_examples
    from Dataset.encoding import PAD_ID
    from engine.optim import param_groups
    from engine.trainer import Trainer, TrainConfig
    from Models.compact_vocab import CompactLM, CompactVocab
    from Models.model_args import ModelArgs
    from Utils.checkpoint_io import write_torch_pth
    from Utils.runtime import seed_everything
    seed_everything(seed)
    examples = lm_examples(records, tokenizer, max_seq_len)
    seen = {PAD_ID, tokenizer.bos_id, tokenizer.eos_id}
    for ids, _ in examples + lm_examples(list(extra_records), tokenizer, max_seq_len):
        seen.update(ids)
    vocab = CompactVocab(seen, tokenizer.n_words)
    rows = []
    for ids, labels in examples:
        t, lab = vocab.to_compact(np.array(ids), np.array(labels))
        rows.append((t.tolist(), lab.tolist()))
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=tokenizer.n_words,
                  multiple_of=32, norm_eps=1e-5, rope_theta=500000.0)
    args = ModelArgs.create(dict(params, vocab_size=vocab.size, max_seq_len=max_seq_len), {"routing": "soft_moe"},
                            source="train_tiny_base")
    model = CompactLM(args, vocab)
    model.init_weights()
    data = LMData(rows, batch_size, data_seed=seed)

    def schedule(step, epoch_float):  # warm-up, then a cosine down to 10% of lr
        return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))

    tmp = out_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    work = os.path.join(tmp, "train")
    cfg = TrainConfig(output_dir=work, lr=lr, schedule=schedule, epochs=-(-steps // len(data)), max_steps=steps,
                      seed=seed, save_interval=0, log_interval=1, progress=False, config=dict(params, steps=steps))
    trainer = Trainer(model, data, cfg, optimizer=None, print_fn=log)
    trainer.optimizer.param_groups = [dict(g, lr=lr) for g in param_groups(model.trainable_parameters(), 0.0)
                                      if g["named"]]
    trainer.fit()
    with open(os.path.join(work, "log.txt")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    write_torch_pth(os.path.join(tmp, "consolidated.00.pth"), model.full_state(np.random.default_rng(seed)))
    with open(os.path.join(tmp, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    shutil.copyfile(tokenizer.model_path, os.path.join(tmp, "tokenizer.model"))
    shutil.rmtree(work)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return losses


def _run(cmd, log):
    """Run a pipeline stage as its own process (mpirun needs that); its output goes to the stage log."""
    import subprocess
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode != 0:
        tail = open(log).read().strip().splitlines()[-5:]
        raise UserError("stage failed (%s): %s" % (log, " | ".join(tail)))


def _accuracy(save_dir):
    import json
    with open(os.path.join(save_dir, "acc_score.json")) as f:
        scores = json.load(f)
    return scores


def draw_plots(out_dir, ft_dir, eval_dir, stem="task"):
    """The README's pictures from this run: layer x adapter-type heatmap, one example's tokens x types in the middle
    layer, and the train/val loss curves."""
    from Utils import plot
    d = os.path.join(out_dir, "plots")
    os.makedirs(d, exist_ok=True)
    plt = plot._plt()
    made = []
    tw = plot.load_pickle(os.path.join(eval_dir, stem + "_type_weight.pkl"), "type")
    made.append(os.path.join(d, "type_weight.png"))
    plot.plot_type_weight(tw, made[-1])
    tok = plot.load_pickle(os.path.join(eval_dir, stem + "_token_weight.pkl"), "token")
    layers = sorted(tok[0]["layers"])
    layer = layers[len(layers) // 2]
    made.append(os.path.join(d, "token_weight_layer%d.png" % layer))
    plot.plot_token_weight(tok, 0, layer, made[-1])
    made.append(os.path.join(d, "loss_curves.png"))
    plot.plot_curves(ft_dir, made[-1])
    plt.close("all")
    return made


def build_demo_parser():
    p = Parser(prog="demo.py", description="The embedded demo: tiny base -> MoA fine-tune -> eval.")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "output", "demo"))
    p.add_argument("--np", type=int, default=2, help="mpirun processes for fine-tuning")
    p.add_argument("--base_steps", type=int, default=2500)
    p.add_argument("--ft_steps", type=int, default=600)
    p.add_argument("--n_test", type=int, default=100)
    p.add_argument("--routing", default="soft_moa")
    return p


def cmd_demo(argv):
    a = build_demo_parser().parse_args(argv)
    import shutil
    py = sys.executable
    t_start = time.time()
    os.makedirs(a.out_dir, exist_ok=True)
    logs = os.path.join(a.out_dir, "logs")
    os.makedirs(logs, exist_ok=True)

    from Dataset.math_generator import write_splits
    cache = os.path.join(CACHE, "v%d" % DEMO_VERSION)
    data = os.path.join(cache, "data")
    for fam, n in (("base", 20000), ("task", 1500)):
        if not os.path.isfile(os.path.join(data, fam, "test.json")):
            write_splits(os.path.join(data, fam), fam, n, 100, 200, seed=0 if fam == "base" else 1)
    print("[1/4] data: generated arithmetic word problems in %s (base family for the base model, an unseen "
          "task family for the adapters)" % data)

    base = os.path.join(cache, "base_%d" % a.base_steps)
    if not os.path.isfile(os.path.join(base, "consolidated.00.pth")):
        print("[2/4] training the tiny LLaMA-3-shaped base (dim 128, 4 layers, real LLaMA-3 tokenizer) on the base "
              "family, %d steps; cached for later runs" % a.base_steps)
        from Dataset import load_records
        from Models.tokenizer import Tokenizer
        train_tiny_base(base, load_records(os.path.join(data, "base", "train.json")), Tokenizer(),
                        steps=a.base_steps, extra_records=load_records(os.path.join(data, "task", "train.json")))
    else:
        print("[2/4] tiny base: cached in %s" % base)

    ft = os.path.join(a.out_dir, a.routing)
    shutil.rmtree(ft, ignore_errors=True)
    print("[3/4] fine-tuning %s adapters with mpirun -np %d on the task family (%d steps)" % (a.routing, a.np,
                                                                                         a.ft_steps))
    task = os.path.join(data, "task")
    _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(a.np), py, "Math.py",
          "--llama_path", base, "--data_path", os.path.join(task, "train.json"),
          "--val_data_path", os.path.join(task, "validation.json"), "--output_dir", ft, "--routing", a.routing,
          "--lora_layers", "0-4", "--lora_targets", "Q,K,V,O,FFN_DOWN", "--lora_rank", "8", "--lora_alpha", "8",
          "--prompt_layers", "0-4", "--p_adapter_layers", "0-4", "--swi_x", "4", "--batch_size", "8",
          "--epochs", "10", "--warmup_epochs", "0.2", "--lr", "8e-3", "--weight_decay", "0.02",
          "--max_steps", str(a.ft_steps), "--max_seq_len", "128", "--val_interval", "75", "--log_interval", "75",
          "--progress", "false"], os.path.join(logs, "finetune.log"))

    print("[4/4] evaluating base and adapted model on %d held-out task problems (greedy)" % a.n_test)
    results = {}
    for name, extra in (("base", []), ("adapted", ["--adapter_path", os.path.join(ft, "adapter"),
                                                   "--dump_type_weight", "true", "--dump_token_weight", "2"])):
        save = os.path.join(a.out_dir, "eval_" + name) + os.sep
        shutil.rmtree(save, ignore_errors=True)
        if os.path.isfile(save[:-1]):  # a stale predictions file where the directory goes
            os.remove(save[:-1])
        _run([py, "inference.py", "--ckpt_dir", base, "--data_path", os.path.join(task, "test.json"),
              "--save_path", save, "--max_gen_len", "64", "--max_batch_size", "50", "--temperature", "0",
              "--max_examples", str(a.n_test)] + extra, os.path.join(logs, "eval_%s.log" % name))
        results[name] = _accuracy(save)
    plots = draw_plots(a.out_dir, ft, os.path.join(a.out_dir, "eval_adapted"))
    print()
    for name in ("base", "adapted"):
        print("%-8s accuracy on the unseen task: %.3f" % (name, results[name].get("average", 0.0)))
    print("pictures: %s" % ", ".join(plots))
    print("adapters, logs, predictions and routing dumps: %s   (%.1f min)" % (a.out_dir, (time.time() - t_start) / 60))


@cli_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    return cmd_demo(argv)


if __name__ == "__main__":
    main()
