"""Full-parameter training of a tiny LLaMA-3-shaped base on records (the demo's "base that speaks the format").

Not part of MoA: the demo needs a base model that knows the prompt format before adapters are tuned on a task it
has not seen. Single process, every parameter trainable, every token of the formatted example supervised (plain
language modelling); writes a Meta checkpoint with the full LLaMA-3 vocabulary.

Speed trick, exact rather than approximate: a corpus of generated word problems uses a few hundred of the 128,256
token ids, and with dim 128 the vocabulary projection would cost ~95% of every step. We therefore train a compact
model whose vocabulary is the ids the corpus (and `extra_records`) can produce plus one "other" class standing for
every remaining id, whose logit is offset by log(number of remaining ids). On export the compact embedding and
output rows go back to their real ids and every remaining output row is the "other" row, so the exported model's
full 128,256-way softmax gives exactly the compact model's probabilities (N equal logits l carry the mass of one
logit l + log N). Embedding rows of ids that never occur keep their random initial values.
"""
import json
import math
import os
import shutil
import time

import numpy as np

from Utils.runtime import import_jittor, seed_everything


class CompactVocab:
    """Ids seen in the corpus → 0..n-1; everything else → n (the "other" class)."""

    def __init__(self, ids, n_words):
        self.ids = np.array(sorted(set(int(i) for i in ids)), dtype=np.int64)
        self.n_words = n_words
        self.lookup = np.full(n_words, len(self.ids), dtype=np.int32)
        self.lookup[self.ids] = np.arange(len(self.ids), dtype=np.int32)

    @property
    def size(self):  # compact classes including "other"
        return len(self.ids) + 1

    @property
    def log_n_other(self):
        return math.log(self.n_words - len(self.ids))

    def to_compact(self, tokens, labels):
        labels = np.where(labels >= 0, self.lookup[np.maximum(labels, 0)], labels)
        return self.lookup[tokens], labels.astype(np.int32)

    def expand(self, emb, out, rng, init_std):
        """Compact tables [n+1, d] → full tables [n_words, d] (see the module docstring)."""
        d = emb.shape[1]
        full_emb = (rng.standard_normal((self.n_words, d)) * init_std).astype(np.float32)
        full_emb[self.ids] = emb[:-1]
        full_out = np.repeat(out[-1:], self.n_words, axis=0)
        full_out[self.ids] = out[:-1]
        return full_emb, full_out


def lm_examples(records, tokenizer, max_seq_len):
    """Every token of every formatted example is a target (labels = input ids)."""
    from Dataset import encode_dataset
    examples, _ = encode_dataset(records, tokenizer, max_seq_len)
    return [(ids, list(ids)) for ids, _ in examples]


def pretrain_tiny_base(out_dir, records, tokenizer, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       steps=300, batch_size=16, lr=3e-3, warmup=30, seed=0, extra_records=(), log=print):
    """Train a fresh tiny base on `records` and write `params.json` + `consolidated.00.pth` + tokenizer to out_dir.

    `extra_records` only widen the compact vocabulary (e.g. a fine-tuning task's words, so adapters can later learn
    to produce them); they are not trained on. Returns the per-step losses (nats per token).
    """
    from Dataset import pad_batch
    from Dataset.encoding import PAD_ID
    from Models.llama import Transformer
    from Models.model_args import ModelArgs
    from Utils.checkpoint_io import write_torch_pth
    jt = import_jittor()
    seed_everything(seed)
    examples = lm_examples(records, tokenizer, max_seq_len)
    seen = {PAD_ID, tokenizer.bos_id, tokenizer.eos_id}
    for ids, _ in examples + lm_examples(list(extra_records), tokenizer, max_seq_len):
        seen.update(ids)
    vocab = CompactVocab(seen, tokenizer.n_words)
    params = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=tokenizer.n_words,
                  multiple_of=32, norm_eps=1e-5, rope_theta=500000.0)
    args = ModelArgs.create(dict(params, vocab_size=vocab.size, max_seq_len=max_seq_len), {"routing": "soft_moe"},
                            source="pretrain_tiny_base")
    model = Transformer(args)
    init_std = 0.02
    for name, p in model.named_parameters():  # small init for a stable start from scratch
        if not name.endswith("norm.weight"):
            p.update(jt.randn(p.shape) * (0.05 if "tok_embeddings" in name else init_std))
    params_list = [p for _, p in model.named_parameters()]
    offset = np.zeros((1, vocab.size), dtype=np.float32)
    offset[0, -1] = vocab.log_n_other
    offset = jt.array(offset).stop_grad()
    opt = jt.optim.AdamW(params_list, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = rng.choice(len(examples), size=batch_size, replace=False)
        tokens, labels = vocab.to_compact(*pad_batch([examples[i] for i in idx]))
        opt.lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / steps)))
        loss = compact_lm_loss(jt, model, jt.array(tokens), jt.array(labels), offset)
        opt.step(loss)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == 0:
            log("  base step %d/%d  loss %.3f  (%.1fs)" % (step + 1, steps, np.mean(losses[-50:]), time.time() - t0))
    state = {n: p.numpy().astype(np.float32) for n, p in model.state_dict().items()}
    state["tok_embeddings.weight"], state["output.weight"] = vocab.expand(
        state["tok_embeddings.weight"], state["output.weight"], rng, 0.05)
    tmp = out_dir.rstrip(os.sep) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write_torch_pth(os.path.join(tmp, "consolidated.00.pth"), state)
    with open(os.path.join(tmp, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    shutil.copyfile(tokenizer.model_path, os.path.join(tmp, "tokenizer.model"))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return losses


def compact_lm_loss(jt, model, tokens, labels, offset):
    """Mean next-token cross-entropy over labelled positions, with the "other" class's log-count offset."""
    h = model.hidden_states(tokens)
    d = h.shape[-1]
    h = h[:, :-1, :].reshape(-1, d)
    target = labels[:, 1:].reshape(-1)
    logits = model.output(h) + offset
    logits = logits - logits.max(1, keepdims=True).stop_grad()
    nll = logits.exp().sum(1).log() - logits.gather(1, jt.maximum(target, 0).reshape(-1, 1)).reshape(-1)
    mask = (target >= 0).float32()
    return (nll * mask).sum() / jt.maximum(mask.sum(), 1.0)
