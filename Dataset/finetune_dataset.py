"""Batching and rank sharding of encoded fine-tuning examples (docs/moa.md §5.2 step 6 with decision D7).

Order: one permutation per epoch from `np.random.default_rng(data_seed + epoch)` — the same on every rank and in
every run, independent of `--seed`. A *global* micro-batch is `batch_size · world_size` consecutive entries of
that permutation; rank r takes the contiguous slice `[r·batch_size, (r+1)·batch_size)`. The incomplete tail is
dropped (`drop_last`), so every rank runs the same number of micro-steps (no collective can hang).

Padding: each micro-batch is right-padded to its own longest example, or to `pad_to` (max_seq_len) when given. For
per-token routing the loss does not depend on the padding (causal mask, ignored labels), Jittor does not recompile
for new lengths (docs/jittor_notes.md#a7) and short batches cost less. The variants whose routing sees padding —
instance MoA and UniPEFT average the padded sequence, Top-K / AdaMoLE count every position in their load-balance
loss — get `pad_to = max_seq_len` from Math.py, as the reference pads every example there (docs/moa.md).
"""
import numpy as np

from Dataset.encoding import IGNORE_INDEX, encode_dataset, pad_batch


class FinetuneData:
    """Encoded (input_ids, labels) pairs served as per-rank micro-batches of numpy int32 [B, T]."""

    def __init__(self, examples, batch_size, data_seed=0, rank=0, world_size=1, n_truncated=0, pad_to=None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.pad_to = pad_to
        self.examples = list(examples)
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.rank = rank
        self.world_size = world_size
        self.n_truncated = n_truncated

    @classmethod
    def from_records(cls, records, tokenizer, max_seq_len, batch_size, data_seed=0, rank=0, world_size=1, chat=None,
                     pad_to=None):
        examples, n_truncated = encode_dataset(records, tokenizer, max_seq_len, chat)
        return cls(examples, batch_size, data_seed, rank, world_size, n_truncated, pad_to)

    def __len__(self):
        """Micro-steps per epoch (identical on every rank)."""
        return len(self.examples) // (self.batch_size * self.world_size)

    def permutation(self, epoch):
        return np.random.default_rng(self.data_seed + epoch).permutation(len(self.examples))

    def indices(self, epoch, i):
        """Example indices of this rank's part of global micro-batch i in `epoch`."""
        perm = self.permutation(epoch)
        start = i * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[start:start + self.batch_size]

    def batches(self, epoch, start=0):
        """Yield (i, {"tokens", "labels"}) for micro-steps start..len-1 of `epoch` (int32 [B, T] each)."""
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        for i in range(start, len(self)):
            idx = perm[i * g + self.rank * self.batch_size:i * g + (self.rank + 1) * self.batch_size]
            tokens, labels = pad_batch([self.examples[j] for j in idx], self.pad_to)
            yield i, {"tokens": tokens, "labels": labels}

    @staticmethod
    def target_count(batch):
        """Supervised (shifted) targets of one micro-batch."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def global_target_count(self, epoch, first, n):
        """Supervised targets of global micro-batches first..first+n-1 over every rank (no communication: the
        order is a function of data_seed and epoch)."""
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        return int(sum(sum(t != IGNORE_INDEX for t in self.examples[j][1][1:]) for j in perm[first * g:(first + n) * g]))


class EvalData:
    """Validation examples, split across ranks without dropping any: rank r takes every world_size-th example.

    Shards may differ by one example; callers reduce (sum of token losses, token count) once at the end,
    so the loss is the token-weighted mean over the whole set whatever the number of ranks.
    """

    def __init__(self, examples, batch_size, rank=0, world_size=1, n_truncated=0, pad_to=None):
        self.examples = list(examples)
        self.pad_to = pad_to
        self.shard = self.examples[rank::world_size]
        self.batch_size = batch_size
        self.n_truncated = n_truncated

    def __len__(self):
        return len(self.examples)

    def batches(self):
        """Yield ({"tokens", "labels"}, n_supervised) where n_supervised counts the shifted targets the loss uses."""
        for s in range(0, len(self.shard), self.batch_size):
            tokens, labels = pad_batch(self.shard[s:s + self.batch_size], self.pad_to)
            yield {"tokens": tokens, "labels": labels}, int((labels[:, 1:] != IGNORE_INDEX).sum())


def split_records(records, val_split, data_seed):
    """Hold out round(val_split · n) records (chosen by `data_seed`) as validation: (train, val)."""
    if not val_split:
        return list(records), []
    n_val = int(round(len(records) * val_split))
    n_val = min(max(n_val, 1), len(records) - 1)
    perm = np.random.default_rng(data_seed).permutation(len(records))
    held = set(perm[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    val = [records[i] for i in sorted(held)]
    return train, val
