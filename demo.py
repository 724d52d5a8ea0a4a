"""The main job on the embedded default: `python demo.py` (see README). `python demo.py generate ...` runs a plain
generation from a checkpoint directory (or the cached tiny demo base when none is given)."""
import argparse
import os
import sys
import time

from Utils.errors import UserError, cli_main

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "demo")


def tiny_base_dir():
    """A tiny LLaMA-3-shaped random base with the real tokenizer, written once and reused."""
    from Utils.tiny_checkpoint import make_tiny_checkpoint
    d = os.path.join(CACHE, "random_base")
    if not os.path.isfile(os.path.join(d, "consolidated.00.pth")):
        make_tiny_checkpoint(d, fmt="meta", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, seed=0)
    return d


def cmd_generate(argv):
    p = argparse.ArgumentParser(prog="demo.py generate", description="Greedy/top-p generation from a checkpoint.")
    p.add_argument("--ckpt_dir", default=None)
    p.add_argument("--adapter_path", default=None)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--max_gen_len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=0.75)
    a = p.parse_args(argv)
    from Models import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(1)
    ckpt = a.ckpt_dir or tiny_base_dir()
    model = LLaMA_adapter.from_pretrained(ckpt, adapter_path=a.adapter_path)
    prompts = a.prompt or ["Below is an instruction.", "3 + 4 ="]
    toks = [model.tokenizer.encode(t, bos=True, eos=False) for t in prompts]
    t0 = time.time()
    outs = model.generate(toks, a.max_gen_len, temperature=a.temperature, top_p=a.top_p)
    for t, o in zip(prompts, outs):
        print("%s -> %r" % (t, model.tokenizer.decode(o)))
    print("generated %d tokens in %.2fs" % (sum(map(len, outs)), time.time() - t0))


@cli_main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        return cmd_generate(argv[1:])
    return cmd_generate(argv)


if __name__ == "__main__":
    main()
