"""The demo's tiny-base trainer (demo.train_tiny_base over Models/compact_vocab.py, driven by the engine): the
compact-vocabulary export must give the full 128,256-way model exactly the compact model's probabilities, and the
written checkpoint must load as a base."""
import json

import numpy as np

from Models.compact_vocab import CompactVocab


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_expanded_tables_reproduce_compact_probabilities():
    rng = np.random.default_rng(0)
    n_words, d = 5000, 16
    vocab = CompactVocab(rng.choice(n_words, size=40, replace=False), n_words)
    emb = rng.normal(size=(vocab.size, d)).astype(np.float32)
    out = rng.normal(size=(vocab.size, d)).astype(np.float32)
    h = rng.normal(size=(7, d)).astype(np.float64)
    offset = np.zeros(vocab.size)
    offset[-1] = vocab.log_n_other
    compact = _log_softmax(h @ out.T.astype(np.float64) + offset)
    full_emb, full_out = vocab.expand(emb, out, rng, 0.05)
    full = _log_softmax(h @ full_out.T.astype(np.float64))
    np.testing.assert_allclose(full[:, vocab.ids], compact[:, :-1], rtol=0, atol=1e-9)
    others = np.setdiff1d(np.arange(n_words), vocab.ids)
    np.testing.assert_allclose(np.log(np.exp(full[:, others]).sum(-1)), compact[:, -1], atol=1e-9)
    np.testing.assert_array_equal(full_emb[vocab.ids], emb[:-1])


def test_to_compact_maps_ids_and_keeps_ignored_labels():
    vocab = CompactVocab([7, 3, 11], 20)
    tokens, labels = vocab.to_compact(np.array([[3, 7, 11, 5]]), np.array([[-100, 7, 5, 11]]))
    assert tokens.tolist() == [[0, 1, 2, 3]]          # 5 is not in the corpus: the "other" class
    assert labels.tolist() == [[-100, 1, 3, 2]]


def test_pretrained_base_loads_and_learned_the_corpus(tmp_path, jt, tokenizer):
    from Dataset import generate_math_dataset
    from Models.llama_adapter import LLaMA_adapter
    from Dataset import lm_examples
    from demo import train_tiny_base
    records = generate_math_dataset(64, "base", seed=0)
    out = tmp_path / "base"
    losses = train_tiny_base(str(out), records, tokenizer, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                             steps=30, batch_size=8, lr=1e-2, warmup=5, log=lambda *a: None)
    assert losses[0] > 10 and losses[-1] < losses[0] / 2          # starts at ~log(128256) = 11.76
    params = json.loads((out / "params.json").read_text())
    assert params["vocab_size"] == tokenizer.n_words and params["dim"] == 32
    model = LLaMA_adapter.from_pretrained(str(out))
    ids, labels = lm_examples(records[:1], tokenizer, 128)[0]
    logp = _log_softmax(model.logits(np.array([ids]))[0, :-1].astype(np.float64))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    assert nll < losses[0] / 2     # the full-vocabulary model keeps what the compact model learned
