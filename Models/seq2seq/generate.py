"""Generation for the encoder–decoder: greedy, temperature / top-k / top-p sampling and beam search, batched, with
the decoder cache (the encoder runs once; each step feeds one token per row through the same layers, MoE
included, as the training forward — `Seq2SeqTransformer.decode_step`).

Greedy picks the lowest-index maximum (as argmax); sampling reuses `Models.generation.next_tokens` (HF's order:
repetition penalty, temperature, top-k, top-p). Beam search keeps `num_beams` hypotheses per source, scores a
finished one by Σ log p / (generated tokens, eos included)^length_penalty, and stops a source when it has
num_beams finished hypotheses and no running beam can still beat the worst of them (HF's early_stopping=False
rule); with num_beams 1 it returns the greedy sequence. Outputs are token lists without the start token, cut
before the first eos.
"""
import numpy as np

from Models.generation import check_sampling, next_tokens
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()


def pad_sources(sources, pad_id):
    """List of token lists → (ids [B, S] int32, mask [B, S] bool), right-padded."""
    if any(len(s) == 0 for s in sources):
        raise UserError("generate: every source needs at least one token")
    S = max(len(s) for s in sources)
    ids = np.full((len(sources), S), pad_id, np.int32)
    mask = np.zeros((len(sources), S), bool)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    return ids, mask


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _sample(model, src, mask, max_new, rng, temperature, top_p, top_k, repetition_penalty, min_new=0):
    cfg = model.cfg
    B = src.shape[0]
    cache = model.new_cache(src, mask)
    cur = np.full((B, 1), cfg.decoder_start_token_id, np.int32)
    hist, done = cur, np.zeros(B, bool)
    for step in range(max_new):
        logits = model.decode_step(cur, cache)[:, -1]
        if step < min_new:   # HF's min_new_tokens: eos is not a candidate yet
            logits[:, cfg.eos_token_id] = -np.inf
        nxt = next_tokens(logits, hist, rng, temperature, top_p, top_k, repetition_penalty).astype(np.int32)
        nxt = np.where(done, cfg.pad_token_id, nxt)
        hist = np.concatenate([hist, nxt[:, None]], 1)
        done |= nxt == cfg.eos_token_id
        if done.all():
            break
        cur = nxt[:, None]
    return [_cut(row[1:], cfg.eos_token_id) for row in hist]


def _cut(tokens, eos):
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def _beam(model, src, mask, max_new, K, length_penalty):
    cfg = model.cfg
    B, V = src.shape[0], cfg.vocab_size
    cache = model.new_cache(np.repeat(src, K, 0), np.repeat(mask, K, 0))
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0                                         # the first step expands one beam per source
    seqs = np.zeros((B * K, 0), np.int64)
    cur = np.full((B * K, 1), cfg.decoder_start_token_id, np.int32)
    finished = [[] for _ in range(B)]                          # (normalised score, tokens)
    done = np.zeros(B, bool)
    for step in range(max_new):
        logp = _log_softmax(model.decode_step(cur, cache)[:, -1])                    # [B·K, V]
        cand = (scores.reshape(B * K, 1) + logp).reshape(B, K * V)
        new_scores, toks = np.full((B, K), -np.inf), np.full((B, K), cfg.pad_token_id)
        rows = np.repeat(np.arange(B) * K, K).reshape(B, K)                          # unfilled slots: beam 0
        for b in range(B):
            if done[b]:
                continue
            order = np.argsort(-cand[b], kind="stable")[:2 * K]
            n = 0
            for rank, c in enumerate(order):
                beam, tok = divmod(int(c), V)
                if not np.isfinite(cand[b, c]):
                    break
                if tok == cfg.eos_token_id:
                    if rank < K:   # an eos outside the top K candidates is not a finished hypothesis (HF)
                        hyp = list(seqs[b * K + beam])
                        finished[b].append((cand[b, c] / (len(hyp) + 1) ** length_penalty, hyp))
                    continue
                new_scores[b, n], rows[b, n], toks[b, n] = cand[b, c], b * K + beam, tok
                n += 1
                if n == K:
                    break
            if len(finished[b]) >= K:
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_running = new_scores[b].max() / (step + 1) ** length_penalty
                done[b] = finished[b][-1][0] >= best_running
        if done.all():
            break
        flat = rows.reshape(-1)
        seqs = np.concatenate([seqs[flat], toks.reshape(-1, 1)], 1)
        scores = new_scores
        cache.reorder(flat)
        cur = toks.reshape(-1, 1).astype(np.int32)
    out = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:   # out of budget: the running beams compete as they are
            hyps += [(scores[b, j] / max(seqs.shape[1], 1) ** length_penalty, list(seqs[b * K + j]))
                     for j in range(K) if np.isfinite(scores[b, j])]
        best = max(hyps, key=lambda h: h[0])[1] if hyps else []
        out.append([int(t) for t in best])
    return out


def generate(model, sources, max_new_tokens=64, num_beams=1, temperature=0.0, top_k=0, top_p=1.0,
             repetition_penalty=1.0, length_penalty=1.0, seed=None, batch_size=32, min_new_tokens=0):
    """Generated token lists for `sources` (lists of source token ids, encoded as in training), in eval mode.
    `min_new_tokens` (greedy / sampling) keeps eos out of the first tokens, as HF's."""
    check_sampling(temperature, top_p, top_k, repetition_penalty)
    if num_beams < 1 or max_new_tokens < 1 or batch_size < 1:
        raise UserError("generate: num_beams, max_new_tokens and batch_size must be >= 1")
    if num_beams > 1 and temperature > 0:
        raise UserError("generate: beam search is deterministic; use temperature 0 with num_beams > 1")
    was_training = model.is_training()
    model.eval()
    rng = np.random.default_rng(seed)
    out = []
    try:
        with jt.no_grad():
            for i in range(0, len(sources), batch_size):
                src, mask = pad_sources(sources[i:i + batch_size], model.cfg.pad_token_id)
                if num_beams > 1:
                    out += _beam(model, src, mask, max_new_tokens, num_beams, length_penalty)
                else:
                    out += _sample(model, src, mask, max_new_tokens, rng, temperature, top_p, top_k,
                                   repetition_penalty, min_new_tokens)
    finally:
        if was_training:
            model.train()
        jt.gc()
    return out
