"""Learning-rate schedules of the one training engine: MoA's warm-up + half-cosine over fractional epochs (the
reference's `util/lr_sched.py`), and step-based warm-up + cosine / constant / linear for pretraining, SFT and the
encoder–decoder.

MoA's schedule is a function of the *fractional* epoch `epoch + i / len(loader)`, evaluated at accumulation
boundaries, so the first optimizer step of a run uses lr 0 (as the reference does). Step-based schedules are a
function of the number of optimizer steps already taken, s = 0, 1, ...: warm-up lr·s/warmup (the first step also
uses lr 0, as transformers' `get_*_schedule_with_warmup`), then the decay over the remaining steps.
"""
import math

from Utils.errors import UserError

STEP_KINDS = ("cosine", "constant", "linear")


def lr_at(epoch_float, lr, min_lr, warmup_epochs, epochs):
    """Warm-up `lr·e/warmup` while e < warmup_epochs, then `min_lr + (lr−min_lr)·½(1 + cos(π·progress))`."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    span = epochs - warmup_epochs
    progress = (epoch_float - warmup_epochs) / span if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer_groups, epoch_float, args):
    """Set `lr` on every param group (a list of dicts or an object with `.param_groups`) and return it.

    Every group gets the key explicitly: in Jittor a group's own "lr" wins over the optimizer's.
    """
    value = lr_at(epoch_float, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    groups = getattr(optimizer_groups, "param_groups", optimizer_groups)
    for group in groups:
        group["lr"] = value
    return value


def lr_at_step(step, total_steps, lr, min_lr=0.0, warmup_steps=0, kind="cosine"):
    """lr for the optimizer step that follows `step` steps already taken (0-based)."""
    if kind not in STEP_KINDS:
        raise UserError("--lr_schedule: %r is not one of %s" % (kind, ", ".join(STEP_KINDS)))
    if step < warmup_steps:
        return lr * step / warmup_steps
    if kind == "constant":
        return lr
    span = total_steps - warmup_steps
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0) if span > 0 else 1.0
    if kind == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochSchedule:
    """MoA's schedule (`lr_at`) as the engine calls it: with the fractional epoch of an accumulation boundary."""

    def __init__(self, lr, min_lr, warmup_epochs, epochs):
        self.lr, self.min_lr, self.warmup_epochs, self.epochs = lr, min_lr, warmup_epochs, epochs

    def __call__(self, step, epoch_float):
        return lr_at(epoch_float, self.lr, self.min_lr, self.warmup_epochs, self.epochs)


class StepSchedule:
    """A step-based schedule (`lr_at_step`) over `total_steps` optimizer steps."""

    def __init__(self, lr, total_steps, min_lr=0.0, warmup_steps=0, kind="cosine"):
        lr_at_step(0, total_steps, lr, min_lr, warmup_steps, kind)  # validates kind
        self.lr, self.total_steps, self.min_lr, self.warmup_steps, self.kind = lr, total_steps, min_lr, \
            warmup_steps, kind

    def __call__(self, step, epoch_float):
        return lr_at_step(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps, self.kind)
