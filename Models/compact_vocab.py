"""A compact-vocabulary language model for training tiny bases fast: the ids a corpus uses plus one "other" class.

A corpus of generated word problems uses a few hundred of the 128,256 LLaMA-3 ids, and with dim 128 the vocabulary
projection would cost ~95% of every step. `CompactLM` trains a Transformer whose vocabulary is the ids the corpus
(and any extra records) can produce plus one "other" class standing for every remaining id, whose logit is offset by
log(number of remaining ids). `CompactLM.full_state()` puts the compact embedding and output rows back at their
real ids and copies the "other" output row to every remaining id, so the full model's 128,256-way softmax gives
exactly the compact model's probabilities (N equal logits l carry the mass of one logit l + log N). Embedding rows of
ids that never occur keep random values.
"""
import math

import numpy as np

from Models.llama import Transformer
from Utils.runtime import import_jittor

jt = import_jittor()
nn = jt.nn


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
        """Compact tables [n+1, d] → full tables [n_words, d] (see the module notes)."""
        d = emb.shape[1]
        full_emb = (rng.standard_normal((self.n_words, d)) * init_std).astype(np.float32)
        full_emb[self.ids] = emb[:-1]
        full_out = np.repeat(out[-1:], self.n_words, axis=0)
        full_out[self.ids] = out[:-1]
        return full_emb, full_out


class CompactLM(nn.Module):
    """A Transformer over a CompactVocab, every parameter trainable (the engine's model protocol)."""

    def __init__(self, args, vocab):
        self.vocab = vocab
        self.llama = Transformer(args)
        offset = np.zeros((1, vocab.size), dtype=np.float32)
        offset[0, -1] = vocab.log_n_other
        self._offset = jt.array(offset).stop_grad()

    def init_weights(self, emb_std=0.05, std=0.02):
        """Small random init for a stable start from scratch (norm weights stay 1)."""
        for name, p in self.llama.named_parameters():
            if not name.endswith("norm.weight"):
                p.update(jt.randn(p.shape) * (emb_std if "tok_embeddings" in name else std))

    def trainable_parameters(self):
        return [("llama." + n, p) for n, p in self.llama.named_parameters()]

    def loss_weights(self):
        return {"lm": 1.0}

    def loss_terms(self, batch):
        """Mean next-token cross-entropy over labelled positions, with the "other" class's log-count offset."""
        tokens, labels = batch["tokens"], batch["labels"]
        h = self.llama.hidden_states(tokens)
        d = h.shape[-1]
        h = h[:, :-1, :].reshape(-1, d)
        target = labels[:, 1:].reshape(-1)
        logits = self.llama.output(h) + self._offset
        logits = logits - logits.max(1, keepdims=True).stop_grad()
        nll = logits.exp().sum(1).log() - logits.gather(1, jt.maximum(target, 0).reshape(-1, 1)).reshape(-1)
        mask = (target >= 0).float32()
        return {"lm": (nll * mask).sum() / jt.maximum(mask.sum(), 1.0)}

    def full_state(self, rng, emb_std=0.05):
        """{Meta name: float32 array} of the equivalent full-vocabulary model."""
        state = {n: p.numpy().astype(np.float32) for n, p in self.llama.state_dict().items()}
        state["tok_embeddings.weight"], state["output.weight"] = self.vocab.expand(
            state["tok_embeddings.weight"], state["output.weight"], rng, emb_std)
        return state
