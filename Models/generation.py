"""Batched KV-cache generation (SPEC §7 with D8 per-sequence stopping and D14 lazy caches)."""
import numpy as np

from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()

DEFAULT_STOP_TOKENS = (128001, 128009)  # <|end_of_text|>, <|eot_id|>


def sample_top_p(probs, top_p, rng):
    """Nucleus sampling on [B, V] numpy probabilities: keep the smallest prefix whose mass before a token ≤ top_p."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    cum = np.cumsum(sorted_p, axis=-1)
    sorted_p = np.where(cum - sorted_p > top_p, 0.0, sorted_p)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdims=True)
    picks = np.array([rng.choice(sorted_p.shape[-1], p=row) for row in sorted_p.astype(np.float64)])
    return np.take_along_axis(order, picks[:, None], axis=-1)[:, 0]


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def generate(model, prompt_tokens, max_gen_len, temperature=0.0, top_p=0.75, seed=None, on_step=None):
    """Generate continuations for a batch of prompts of different lengths.

    Prefills the common prefix, then decodes one token per step; positions still inside a longer prompt keep the
    prompt's token. A sequence stops at its first stop token or after `max_gen_len` tokens; the batch stops when
    all have. `on_step(start_pos, n_new_positions)` is called after every forward (routing dumps, timing).
    """
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
                if temperature > 0:
                    nxt = sample_top_p(_softmax(last / temperature), top_p, rng)
                else:
                    nxt = last.argmax(-1)
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
