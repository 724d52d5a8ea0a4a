"""Question → answer pairs for the encoder–decoder, served through the engine's data protocol.

Records: the seed's JSON list of {"question", "answer"} (also JSON lines, one record per line); other keys are
ignored; a record without string question and answer is a one-line error naming the file and record. The
source is the question only and the target the answer only — the encoder never sees the answer (the seed fed
the whole `<|bos|>q<|sep|>a<|eos|>` to the encoder):

    src    = ids(question) + [eos]                          (the encoder's input, T5's convention)
    tgt_in = [decoder_start] + ids(answer)                  (the decoder's input, shifted right)
    tgt_out = ids(answer) + [eos]                           (what the decoder predicts)

Over-long sources keep their first max_src_len − 1 tokens and the eos; over-long answers their first
max_tgt_len − 1 tokens; both are counted. A batch is {"src" int32 [B, S] (pad on padding), "src_mask" bool,
"tgt_in" int32 [B, T], "tgt_out" int32 [B, T] (−100 on padding)}. Order and sharding are those of
`Dataset.lm_batches.LMData`: one permutation per epoch from (data_seed, epoch), rank r takes slice r of each
global micro-batch, the incomplete tail is dropped.
"""
import json
import os

import numpy as np

from Dataset.encoding import IGNORE_INDEX
from Utils.errors import UserError


def load_pairs(path):
    """[(question, answer)] from a JSON list or a JSON-lines file."""
    if not os.path.isfile(path):
        raise UserError("%s: data file not found" % path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records = None
    if text.lstrip().startswith("["):
        try:
            records = [("%s item %d" % (path, i), r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError("%s: not valid JSON (%s)" % (path, e.msg))
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(("%s line %d" % (path, n), json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError("%s line %d: not valid JSON (%s)" % (path, n, e.msg))
    pairs = []
    for where, r in records:
        if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not isinstance(r.get("answer"), str):
            raise UserError("%s: expected a record with string fields 'question' and 'answer'" % where)
        pairs.append((r["question"], r["answer"]))
    if not pairs:
        raise UserError("%s: no records" % path)
    return pairs


class Encoder:
    """Text → token ids for sources and targets, with the truncation rule of the module notes."""

    def __init__(self, tokenizer, max_src_len=256, max_tgt_len=256):
        if tokenizer.eos_id < 0:
            raise UserError("%s: the tokenizer has no eos token" % getattr(tokenizer, "path", "tokenizer"))
        if max_src_len < 2 or max_tgt_len < 2:
            raise UserError("max_src_len and max_tgt_len must be >= 2")
        self.tok, self.max_src_len, self.max_tgt_len = tokenizer, max_src_len, max_tgt_len
        self.n_truncated = 0

    def source(self, question):
        ids = self.tok.encode(question, False, False)
        if len(ids) > self.max_src_len - 1:
            ids = ids[:self.max_src_len - 1]
            self.n_truncated += 1
        return ids + [self.tok.eos_id]

    def target(self, answer):
        ids = self.tok.encode(answer, False, False)
        if len(ids) > self.max_tgt_len - 1:
            ids = ids[:self.max_tgt_len - 1]
            self.n_truncated += 1
        return ids

    def pairs(self, pairs):
        return [(self.source(q), self.target(a)) for q, a in pairs]


def collate(examples, pad_id, start_id, eos_id):
    """[(src ids, answer ids)] → the batch dict of the module notes."""
    S = max(len(s) for s, _ in examples)
    T = max(len(t) for _, t in examples) + 1
    B = len(examples)
    src = np.full((B, S), pad_id, np.int32)
    src_mask = np.zeros((B, S), bool)
    tgt_in = np.full((B, T), pad_id, np.int32)
    tgt_out = np.full((B, T), IGNORE_INDEX, np.int32)
    for b, (s, t) in enumerate(examples):
        src[b, :len(s)] = s
        src_mask[b, :len(s)] = True
        tgt_in[b, :len(t) + 1] = [start_id] + list(t)
        tgt_out[b, :len(t) + 1] = list(t) + [eos_id]
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "tgt_out": tgt_out}


def n_targets(batch):
    return int((batch["tgt_out"] != IGNORE_INDEX).sum())


class Seq2SeqData:
    """Training examples as this rank's micro-batches (the data protocol of engine/trainer.py)."""

    def __init__(self, examples, batch_size, special, data_seed=0, rank=0, world_size=1):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError("bad batch_size %r or rank %r of %r" % (batch_size, rank, world_size))
        self.examples, self.batch_size, self.special = examples, batch_size, special   # special: (pad, start, eos)
        self.data_seed, self.rank, self.world_size = data_seed, rank, world_size

    def __len__(self):
        return len(self.examples) // (self.batch_size * self.world_size)

    def permutation(self, epoch):
        return np.random.default_rng(self.data_seed + epoch).permutation(len(self.examples))

    def batches(self, epoch, start=0):
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        for i in range(start, len(self)):
            idx = perm[i * g + self.rank * self.batch_size:i * g + (self.rank + 1) * self.batch_size]
            yield i, collate([self.examples[int(j)] for j in idx], *self.special)

    @staticmethod
    def target_count(batch):
        return n_targets(batch)

    def global_target_count(self, epoch, first, n):
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        return int(sum(len(self.examples[int(j)][1]) + 1 for j in perm[first * g:(first + n) * g]))


class EvalSeq2SeqData:
    """Validation examples split across ranks without dropping any (rank r takes every world_size-th)."""

    def __init__(self, examples, batch_size, special, rank=0, world_size=1):
        self.examples, self.batch_size, self.special = examples, batch_size, special
        self.shard = list(range(rank, len(examples), world_size))

    def __len__(self):
        return len(self.examples)

    def batches(self):
        for s in range(0, len(self.shard), self.batch_size):
            batch = collate([self.examples[j] for j in self.shard[s:s + self.batch_size]], *self.special)
            yield batch, n_targets(batch)
