"""Tiny assets for the MoEfication tests: a real-text corpus (stdlib docstrings), a byte-level BPE tokenizer trained
on it in a second, and dense checkpoints — Meta or HF layout, LLaMA-2 (MHA, θ 10 000) or LLaMA-3 (GQA, θ 500 000)
shapes, SwiGLU or a plain ReLU FFN — whose weights are large enough that the FFN visibly moves the logits."""
import json
import os
import shutil

import numpy as np

SHAPES = {
    "llama3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, rope_theta=500000.0),
    "llama2": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, rope_theta=10000.0),
}
VOCAB = 320


def corpus(root):
    """(train.jsonl, validation.jsonl) of ~100 stdlib docstrings."""
    from Dataset.text_corpus import build_corpus
    out = os.path.join(root, "corpus.jsonl")
    if not os.path.isfile(os.path.join(root, "corpus.train.jsonl")):
        build_corpus(out, max_docs=120, val_percent=20.0)
    return os.path.join(root, "corpus.train.jsonl"), os.path.join(root, "corpus.validation.jsonl")


def tokenizer_dir(root):
    from Utils.train_tokenizer import train_tokenizer
    d = os.path.join(root, "tok")
    if not os.path.isfile(os.path.join(d, "tokenizer.json")):
        train_tokenizer(corpus(root)[0], VOCAB, d)
    return d


def write_dense(out_dir, tok_dir, fmt="meta", shape="llama3", gated=True, act="silu", seed=0, std=0.08):
    """A random dense checkpoint with the tokenizer beside it; returns (ModelArgs, {Meta name: array})."""
    from Models.model_args import ModelArgs
    from Utils.checkpoint_io import write_safetensors, write_torch_pth
    from Models.tiny_checkpoint import hf_config, random_state
    params = dict(SHAPES[shape], vocab_size=VOCAB, norm_eps=1e-5)
    if not gated or act != "silu":
        params.update(ffn_gated=gated, hidden_act=act)
    args = ModelArgs.create(params)
    state = random_state(args, seed, std)
    if not gated:
        state = {k: v for k, v in state.items() if not k.endswith("feed_forward.w3.weight")}
    os.makedirs(out_dir, exist_ok=True)
    if fmt == "meta":
        with open(os.path.join(out_dir, "params.json"), "w") as f:
            json.dump(params, f)
        write_torch_pth(os.path.join(out_dir, "consolidated.00.pth"), state)
    else:
        from Models.checkpoints import hf_from_meta
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dict(hf_config(args), bos_token_id=1, eos_token_id=2), f)
        write_safetensors(os.path.join(out_dir, "model.safetensors"), hf_from_meta(state, args))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(out_dir, name))
    return args, state


def permute_ffn(state, n_layers, seed=0):
    """The same function with each layer's FFN neurons in another order (rows of w1/w3, columns of w2)."""
    rng = np.random.default_rng(seed)
    out = dict(state)
    for i in range(n_layers):
        p = "layers.%d.feed_forward." % i
        perm = rng.permutation(state[p + "w1.weight"].shape[0])
        out[p + "w1.weight"] = state[p + "w1.weight"][perm]
        if p + "w3.weight" in state:
            out[p + "w3.weight"] = state[p + "w3.weight"][perm]
        out[p + "w2.weight"] = state[p + "w2.weight"][:, perm]
    return out


def tokens(n_rows=2, T=12, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (n_rows, T))


# ---------------------------------------------------------------------------- shared by the MoEfication tests
def build_assets(root):
    """The tokenizer, the corpus and a Meta LLaMA-3-shaped dense model under `root` (a test module's fixture)."""
    tok = tokenizer_dir(root)
    train, val = corpus(root)
    meta3 = os.path.join(root, "meta_llama3")
    args, state = write_dense(meta3, tok, "meta", "llama3")
    return dict(root=root, tok=tok, train=train, val=val, meta3=meta3, args=args, state=state)


def batches(path, tok_dir, seq_len=32, batch_size=4, mode="packed", rank=0, world=1):
    from Dataset.pretrain_data import pretrain_eval_data
    from Models.tokenizer import load_tokenizer
    data = pretrain_eval_data(path, load_tokenizer(tok_dir), seq_len, batch_size, mode, rank=rank, world_size=world,
                              cache=False, progress=False)
    return [b for b, _ in data.batches()]


def load(path):
    from Models.llama_adapter import LLaMA_adapter
    return LLaMA_adapter.from_pretrained(path, trainable="none")


def features(a, work, model_dir=None, **kw):
    from Models.moefication.collect import collect_features
    model = load(model_dir or a["meta3"])
    kw.setdefault("max_tokens", 3000)
    return collect_features(model, batches(a["train"], a["tok"]), work, [0, 1], kw.pop("activation", "product"),
                            progress=False, **kw)


def split_convert(a, work, method, k, state=None, args=None, metric="l2", out=None):
    """Split `a`'s dense model into 8 groups per layer and convert it with top-k = k, routers at their centroid
    initialisation (no features or gate stage needed, except features for the graph split)."""
    from Models.moefication.convert import convert
    from Models.moefication.stages import split_model
    co = None
    if method == "graph":
        from Models.moefication.coactivation import CoactivationAccumulator
        from Models.moefication.collect import iter_layer_activations
        features(a, work)

        def co(layer):
            acc = CoactivationAccumulator(192, "positive")
            for h in iter_layer_activations(work, layer):
                acc.update(h)
            return acc
    args, state = args or a["args"], state or a["state"]
    split_model(args, state, work, 8, method, "gate", metric, seed=0, coactivation=co, log=lambda *_: None)
    out = out or os.path.join(work, "converted")
    convert(args, state, work, out, a["meta3"], num_selects=k, use_gate=False, log=lambda *_: None)
    return out


def moefy_error(capsys, argv):
    """The one-line error `moefy.py argv` prints (exit status 2), asserted to be one line."""
    import pytest
    import moefy
    with pytest.raises(SystemExit) as e:
        moefy.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err
