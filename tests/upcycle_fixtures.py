"""Shared set-up of the upcycling tests: a tiny dense LLaMA with a real tokenizer, and the converter called as a library
or as the CLI (in its own process, so exit codes and stderr are the user's)."""
import os
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT

MINIMIND = os.path.join(ROOT, "data", "minimind_tokenizer")
DENSE = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=6400, multiple_of=32)


def make_dense(path, fmt="meta", seed=0, **kw):
    """A random dense LLaMA (Meta or HF files) with minimind's tokenizer.json; returns its {Meta name: array}."""
    from Models.tiny_checkpoint import make_tiny_checkpoint
    state = make_tiny_checkpoint(path, fmt, seed=seed, tokenizer=False, **dict(DENSE, **kw))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(MINIMIND, f), os.path.join(path, f))
    return state


def upcycle(src, out, dtype="auto", **config):
    from Models.upcycle_state import convert
    from Models.upcycling import load_spec
    args, form = convert(src, load_spec(config, source="test config"), out, dtype=dtype, progress=False)
    return out


def cli(*argv):
    """(exit code, stdout, stderr) of `python upcycle.py argv...`."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "upcycle.py")] + [str(a) for a in argv],
                       capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def tokens(batch=2, length=12, seed=5):
    return np.random.default_rng(seed).integers(3, DENSE["vocab_size"], size=(batch, length))


def load(path, **kw):
    from Models import LLaMA_adapter
    return LLaMA_adapter.from_pretrained(path, **kw)


def randomise_routers(model, seed, scale=3.0):
    """Any router initialisation: every router parameter redrawn at a large scale (the gmm temperature too)."""
    from Utils.runtime import import_jittor
    jt = import_jittor()
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if ".feed_forward.router." in name:
            p.update(jt.array((scale * rng.standard_normal(tuple(p.shape))).astype(np.float32)))


def expert_blocks(model, layer, proj="w1"):
    """[E, F, d] numpy of one layer's stacked expert weights (equal widths)."""
    ffn = model.llama.layers[layer].feed_forward
    w = getattr(ffn.experts, proj).numpy()
    return w.reshape(ffn.n_experts, -1, w.shape[1])
