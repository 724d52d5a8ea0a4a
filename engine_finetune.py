"""MoA fine-tuning's epoch, under the reference's file name (`engine_finetune.py`): the loop itself is the project's
one training engine, `engine/trainer.py`, which Math.py, pretrain.py, sft.py, train_seq2seq.py, the demo's base and
the benchmarks all drive. This module keeps the reference's entry points as thin aliases.

What the engine does differently from the reference, all deliberate: gradients come from `jt.grad` and are summed
there; under mpirun they (and the step's losses) are averaged over ranks with ONE all-reduce per optimizer step, and
AdamW's bias correction counts optimizer steps — the same numbers as PyTorch DDP + `torch.optim.AdamW` (Jittor's
own AdamW counts micro-steps); a non-finite loss stops the run before the update; Jittor's RNG is re-seeded from
(seed, step, rank) at every optimizer step, so a resumed run draws the same router noise as an uninterrupted one.
"""
from engine.optim import V_FLOOR, AdamW, param_groups  # noqa: F401  (the reference's names)
from engine.trainer import NonFiniteLoss, Trainer, TrainState  # noqa: F401

__all__ = ["V_FLOOR", "AdamW", "param_groups", "NonFiniteLoss", "Trainer", "TrainState", "train_one_epoch",
           "evaluate"]


def train_one_epoch(trainer, epoch, on_step=None):
    """One epoch of `trainer` (an engine.trainer.Trainer) from its saved position; True when training stopped."""
    return trainer.run_epoch(epoch, on_step)


def evaluate(trainer):
    """Token-weighted validation cross-entropy over the trainer's validation set (every rank must call it)."""
    return trainer.evaluate()
