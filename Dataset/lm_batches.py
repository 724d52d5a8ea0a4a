"""Language-model rows served through the data protocol: per-rank training micro-batches and validation batches.

Shared by pretraining (`Dataset.pretrain_data`) and SFT (`Dataset.sft_data`). A *row* is a pair (ids, labels) of
equal-length int arrays, labels NOT shifted: labels[t] is the target of the prediction made at position t-1, so the
model compares logits[:, :-1] with labels[:, 1:] (`Models.llama_adapter`), and labels[:, 0] is never used.

Order and sharding are those of `Dataset.finetune_dataset.FinetuneData`: one permutation per epoch from
`np.random.default_rng(data_seed + epoch)`, a global micro-batch is `batch_size · world_size` consecutive entries of
it, rank r takes the slice `[r·batch_size, (r+1)·batch_size)`, the incomplete tail is dropped so every rank runs the
same number of micro-steps. Each micro-batch is right-padded to its own longest row.

A batch is a dict of numpy arrays: `tokens` int32 [B, T] (PAD_ID on padding), `labels` int32 [B, T]
(IGNORE_INDEX on padding and on unsupervised positions), `token_mask` bool [B, T] (True on real tokens, so MoE
auxiliary losses can leave padding out).
"""
import numpy as np

from Dataset.encoding import IGNORE_INDEX, PAD_ID


def collate(rows):
    """Right-pad [(ids, labels), ...] to the longest row: {"tokens", "labels", "token_mask"}."""
    if not rows:
        raise ValueError("collate needs at least one row")
    T = max(len(ids) for ids, _ in rows)
    tokens = np.full((len(rows), T), PAD_ID, dtype=np.int32)
    labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int32)
    mask = np.zeros((len(rows), T), dtype=bool)
    for b, (ids, lab) in enumerate(rows):
        n = len(ids)
        if len(lab) != n:
            raise ValueError("row %d: %d ids but %d labels" % (b, n, len(lab)))
        tokens[b, :n] = ids
        labels[b, :n] = lab
        mask[b, :n] = True
    return {"tokens": tokens, "labels": labels, "token_mask": mask}


def n_targets(labels):
    """Number of (shifted) targets the loss uses in a labels array [B, T]."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _check_shard(batch_size, rank, world_size):
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1, got %r" % (batch_size,))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError("rank %r is not in [0, world_size=%r)" % (rank, world_size))


class LMData:
    """Training rows (anything with len() and [j] -> (ids, labels)) as this rank's micro-batches."""

    def __init__(self, rows, batch_size, data_seed=0, rank=0, world_size=1):
        _check_shard(batch_size, rank, world_size)
        self.rows = rows
        self.batch_size = batch_size
        self.data_seed = data_seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self):
        """Micro-steps per epoch, identical on every rank (the incomplete global micro-batch is dropped)."""
        return len(self.rows) // (self.batch_size * self.world_size)

    def permutation(self, epoch):
        return np.random.default_rng(self.data_seed + epoch).permutation(len(self.rows))

    def indices(self, epoch, i, perm=None):
        """Row indices of this rank's part of global micro-batch i of `epoch`."""
        perm = self.permutation(epoch) if perm is None else perm
        start = i * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[start:start + self.batch_size]

    def batches(self, epoch, start=0):
        """Yield (i, batch) for micro-steps start..len-1 of `epoch` (resuming at `start` skips no work twice)."""
        perm = self.permutation(epoch)
        for i in range(start, len(self)):
            yield i, collate([self.rows[int(j)] for j in self.indices(epoch, i, perm)])

    @staticmethod
    def target_count(batch):
        """Targets of one micro-batch (for the engine's token-weighted loss)."""
        return n_targets(batch["labels"])

    def global_target_count(self, epoch, first, n):
        """Targets of global micro-batches first..first+n-1 over every rank, computed locally (the order is a
        function of data_seed and epoch), so the engine can weight each micro-batch by its share of the step."""
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        total = 0
        for j in perm[first * g:(first + n) * g]:
            labels = np.asarray(self.rows[int(j)][1])
            total += int((labels[1:] != IGNORE_INDEX).sum())
        return total


class EvalLMData:
    """Validation rows split across ranks without dropping any: rank r takes every world_size-th row.

    Shards may differ by one row; the caller sums (token losses, n_target_tokens) over its batches and reduces the
    two sums once at the end, so the loss is the token-weighted mean over the whole set for any number of ranks.
    """

    def __init__(self, rows, batch_size, rank=0, world_size=1):
        _check_shard(batch_size, rank, world_size)
        self.rows = rows
        self.shard = range(rank, len(rows), world_size)
        self.batch_size = batch_size

    def __len__(self):
        """Rows in the whole validation set (all ranks)."""
        return len(self.rows)

    def n_batches(self):
        return -(-len(self.shard) // self.batch_size)

    def batches(self):
        """Yield (batch, n_target_tokens) over this rank's shard."""
        for s in range(0, len(self.shard), self.batch_size):
            batch = collate([self.rows[j] for j in self.shard[s:s + self.batch_size]])
            yield batch, n_targets(batch["labels"])
