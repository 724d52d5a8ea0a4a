"""Sampling (Models/generation.py): nucleus sampling at the real 128,256-token vocabulary, top-k and Hugging Face's
repetition penalty against numpy re-implementations, the limits that must equal greedy decoding, and the decoding
loop against a numpy oracle on a model whose logits are a lookup table."""
from types import SimpleNamespace

import numpy as np
import pytest

from Utils.errors import UserError

V = 128256


def _rows(rng, n, vocab=V):
    """float32 logits: peaked rows (one token far ahead), flat rows (all equal), and random rows."""
    logits = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
    logits[0::3] = 0.0
    logits[1::3, 17] += 40.0
    return logits


def _softmax32(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("top_p", [0.75, 0.95, 1.0])
def test_top_p_at_real_vocab_is_deterministic_and_stays_in_the_nucleus(top_p):
    from Models.generation import sample_top_p
    probs = _softmax32(_rows(np.random.default_rng(0), 48) / np.float32(0.1))   # inference.py's temperature 0.1
    a = sample_top_p(probs, top_p, np.random.default_rng(123))
    b = sample_top_p(probs, top_p, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (48,) and a.min() >= 0 and a.max() < V
    assert np.all(a[1::3] == 17)                                          # a peaked row has one nucleus token
    p64 = probs.astype(np.float64)
    for row, tok in zip(p64, a):
        before = row[row > row[tok]].sum()                               # mass of the tokens ranked above it
        assert before <= top_p + 1e-12 and row[tok] > 0


def test_sampling_many_rows_never_raises():
    """The reported failure: float32 probabilities over 128,256 entries handed to rng.choice did not sum to 1."""
    from Models.generation import next_tokens
    rng = np.random.default_rng(7)
    for seed in range(4):
        logits = _rows(np.random.default_rng(seed), 32)
        toks = next_tokens(logits, np.zeros((32, 1), np.int64), rng, temperature=0.1, top_p=0.75)
        assert toks.shape == (32,) and np.all((0 <= toks) & (toks < V))


def test_top_p_draws_follow_the_renormalised_nucleus():
    """Frequencies of 40,000 draws against the closed form: p restricted to the nucleus, renormalised."""
    from Models.generation import sample_top_p
    p = np.array([0.5, 0.3, 0.15, 0.05])
    picks = sample_top_p(np.tile(p, (40000, 1)), 0.7, np.random.default_rng(1))   # mass before token 2 is 0.8
    freq = np.bincount(picks, minlength=4) / len(picks)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.01)


def test_tiny_top_p_and_top_k_one_equal_greedy():
    from Models.generation import next_tokens
    logits = _rows(np.random.default_rng(2), 30)[2::3]                   # random rows: no ties at the top
    greedy = next_tokens(logits, np.zeros((10, 1), np.int64), None, temperature=0.0)
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(next_tokens(logits, np.zeros((10, 1), np.int64), rng, 0.8, top_p=1e-9), greedy)
    np.testing.assert_array_equal(next_tokens(logits, np.zeros((10, 1), np.int64), rng, 5.0, top_p=1.0, top_k=1),
                                  greedy)


def test_top_k_matches_numpy():
    from Models.generation import apply_top_k
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[0, :5] = 3.0                                                   # ties at the k-th value are kept
    for k in (1, 3, 7, 50, 0):
        out = apply_top_k(logits, k)
        for row, got in zip(logits, out):
            kth = np.sort(row)[::-1][k - 1] if k else -np.inf
            want = np.where(row >= kth, row, -np.inf)
            np.testing.assert_array_equal(got, want)


def _np_repetition_penalty(logits, history, penalty):
    out = logits.copy()
    for i in range(len(logits)):
        for t in set(int(x) for x in history[i]):
            out[i, t] = logits[i, t] * penalty if logits[i, t] < 0 else logits[i, t] / penalty
    return out


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_matches_numpy(penalty):
    from Models.generation import apply_repetition_penalty
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 40)).astype(np.float32)
    logits[:, 3] = 0.0
    history = rng.integers(0, 40, size=(4, 25))
    history[:, 0] = 3                                                      # a zero logit, and repeated tokens
    np.testing.assert_allclose(apply_repetition_penalty(logits, history, penalty),
                               _np_repetition_penalty(logits, history, penalty), rtol=1e-6, atol=0)


class _TableLlama:
    """Logits of the next token = table[last token]: a model whose decoding a numpy loop can replay exactly."""

    def __init__(self, jt, table):
        self.jt, self.table = jt, table

    def __call__(self, tokens, start_pos=0, use_cache=False, last_only=False):
        return self.jt.array(self.table[tokens.numpy()[:, -1:]])          # [B, 1, V]

    def free_caches(self):
        pass


def _np_decode(table, prompt, n, penalty):
    seq = list(prompt)
    for _ in range(n):
        logits = _np_repetition_penalty(table[seq[-1]][None], np.array([seq]), penalty)[0]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


def test_generate_with_repetition_penalty_equals_numpy_loop(jt):
    from Models.generation import generate
    vocab = 60
    table = np.random.default_rng(6).standard_normal((vocab, vocab)).astype(np.float32)
    table[:, 7] += 2.5                                                     # a token every row wants to repeat
    model = SimpleNamespace(llama=_TableLlama(jt, table), args=SimpleNamespace(max_seq_len=64),
                            tokenizer=SimpleNamespace(stop_tokens=()))
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate(model, prompts, 12)
    assert plain == [_np_decode(table, p, 12, 1.0) for p in prompts]
    assert any(row.count(7) > 1 for row in plain)                          # the penalty has something to change
    for penalty in (1.5, 3.0):
        got = generate(model, prompts, 12, repetition_penalty=penalty)
        assert got == [_np_decode(table, p, 12, penalty) for p in prompts], penalty
        assert got != plain


def test_bad_sampling_settings_are_user_errors(jt):
    from Models.generation import generate
    model = SimpleNamespace(llama=None, args=SimpleNamespace(max_seq_len=64), tokenizer=None)
    for kw in (dict(top_k=-1), dict(repetition_penalty=0.0), dict(temperature=-1.0),
               dict(temperature=0.5, top_p=0.0)):
        with pytest.raises(UserError):
            generate(model, [[1]], 4, **kw)


def test_llama_adapter_generate_takes_top_k_and_repetition_penalty(jt):
    """Through the public API on a real (tiny) model: top_k=1 sampling is greedy decoding."""
    import tiny_variants
    model = tiny_variants.build("soft_moe_lora", 0, max_seq_len=32)
    model.eval()
    prompts = [[1, 5, 6], [7, 8]]
    greedy = model.generate(prompts, 6, temperature=0.0)
    assert model.generate(prompts, 6, temperature=1.0, top_k=1, seed=3) == greedy
    assert model.generate(prompts, 6, temperature=1.0, top_p=1e-9, seed=4) == greedy
    penalised = model.generate(prompts, 6, temperature=0.0, repetition_penalty=1.2)
    assert all(len(o) == 6 for o in penalised)                             # no stop token in a 1000-token vocab
