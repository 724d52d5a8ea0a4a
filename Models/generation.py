"""Batched KV-cache generation (docs/moa.md §7 with D8 per-sequence stopping and D14 lazy caches)."""
import numpy as np

from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()

DEFAULT_STOP_TOKENS = (128001, 128009)  # <|end_of_text|>, <|eot_id|>


def sample_top_p(probs, top_p, rng):
    """Nucleus sampling on [B, V] probabilities: keep the smallest prefix (by decreasing probability) whose mass
    before a token is <= top_p, then draw one token per row by inverse CDF with one uniform from `rng`.

    Works in float64 and never needs the kept mass to sum to exactly 1 (at 128k entries a float32 renormalisation
    does not, and `rng.choice` refuses it); an all-zero row cannot happen, as the top token is always kept.
    """
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    keep = np.cumsum(sorted_p, axis=-1) - sorted_p <= top_p                     # a prefix: the mass only grows
    cdf = np.cumsum(np.where(keep, sorted_p, 0.0), axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # the first index whose cdf passes u, kept inside the nucleus should u round up to the total
    picks = np.minimum((cdf <= u[:, None]).sum(-1), keep.sum(-1) - 1)
    return np.take_along_axis(order, picks[:, None], axis=-1)[:, 0]


def apply_top_k(logits, k):
    """Keep the k largest logits of each row (ties with the k-th are kept, as HF's TopKLogitsWarper); 0 = off."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k]
    return np.where(logits < kth[:, None], -np.inf, logits)


def apply_repetition_penalty(logits, history, penalty):
    """HF's repetition penalty: the logit of every token already in a row's history (prompt + generated) is
    divided by `penalty` when positive, multiplied when negative; each token once. penalty 1.0 = off."""
    if penalty == 1.0:
        return logits
    seen = np.zeros(logits.shape, dtype=bool)
    seen[np.arange(logits.shape[0])[:, None], history] = True
    return np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def next_tokens(logits, history, rng, temperature=0.0, top_p=0.75, top_k=0, repetition_penalty=1.0):
    """One decoding step on [B, V] logits (HF order): repetition penalty, then greedy (temperature 0), or
    temperature, top-k and top-p sampling. `history` [B, t] holds every row's tokens so far."""
    logits = apply_repetition_penalty(np.asarray(logits), history, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    return sample_top_p(_softmax(apply_top_k(logits.astype(np.float64) / temperature, top_k)), top_p, rng)


def check_sampling(temperature, top_p, top_k, repetition_penalty):
    """One-line errors for sampling settings outside their domains (top_p only matters when sampling)."""
    if temperature < 0 or (temperature > 0 and not 0 < top_p <= 1):
        raise UserError("temperature must be >= 0 and top_p in (0, 1], got %g and %g" % (temperature, top_p))
    if top_k < 0 or repetition_penalty <= 0:
        raise UserError("top_k must be >= 0 and repetition_penalty > 0, got %d and %g" % (top_k, repetition_penalty))


def generate(model, prompt_tokens, max_gen_len, temperature=0.0, top_p=0.75, seed=None, on_step=None, top_k=0,
             repetition_penalty=1.0):
    """Generate continuations for a batch of prompts of different lengths.

    Prefills the common prefix, then decodes one token per step; positions still inside a longer prompt keep the
    prompt's token. A sequence stops at its first stop token or after `max_gen_len` tokens; the batch stops when
    all have. `on_step(start_pos, n_new_positions)` is called after every forward (routing dumps, timing).
    Sampling (`next_tokens`): greedy at temperature 0; `top_k` 0 and `repetition_penalty` 1.0 are off.
    """
    check_sampling(temperature, top_p, top_k, repetition_penalty)
    llama = model.llama
    args = model.args
    bsz = len(prompt_tokens)
    if bsz == 0:
        return []
    lens = [len(t) for t in prompt_tokens]
    if min(lens) == 0:
        raise UserError("generate: every prompt needs at least one token (BOS)")
    if max(lens) >= args.max_seq_len:
        raise UserError("generate: a prompt has %d tokens but max_seq_len is %d" % (max(lens), args.max_seq_len))
    stop = np.array(sorted(model.tokenizer.stop_tokens if model.tokenizer is not None else DEFAULT_STOP_TOKENS))
    total_len = min(args.max_seq_len, max_gen_len + max(lens))
    tokens = np.zeros((bsz, total_len), dtype=np.int32)
    known = np.zeros((bsz, total_len), dtype=bool)
    for i, t in enumerate(prompt_tokens):
        tokens[i, :len(t)] = t
        known[i, :len(t)] = True
    budget_end = np.array([min(total_len, n + max_gen_len) for n in lens])
    done = np.zeros(bsz, dtype=bool)
    rng = np.random.default_rng(seed)
    prev = 0
    try:
        with jt.no_grad():
            for cur in range(min(lens), total_len):
                logits = llama(jt.array(tokens[:, prev:cur]), start_pos=prev, use_cache=True, last_only=True)
                last = logits.numpy()[:, -1, :]
                if on_step is not None:
                    on_step(prev, cur - prev)
                nxt = next_tokens(last, tokens[:, :cur], rng, temperature, top_p, top_k, repetition_penalty)
                nxt = np.where(known[:, cur], tokens[:, cur], nxt).astype(np.int32)
                tokens[:, cur] = nxt
                generated = ~known[:, cur]
                done |= generated & np.isin(nxt, stop)
                done |= cur + 1 >= budget_end
                prev = cur
                if done.all():
                    break
    finally:
        llama.free_caches()
        jt.gc()
    out = []
    for i, n in enumerate(lens):
        toks = tokens[i, n:min(budget_end[i], prev + 1)].tolist()
        for j, t in enumerate(toks):
            if t in stop:
                toks = toks[:j]
                break
        out.append(toks)
    return out
