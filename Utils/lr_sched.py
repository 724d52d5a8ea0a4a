"""Learning-rate schedule of the reference's training loop (SPEC §5.2 step 7): linear warm-up, then half-cosine.

The schedule is a function of the *fractional* epoch `epoch + i / len(loader)`, evaluated at accumulation
boundaries, so the first optimizer step of a run uses lr 0 (as the reference does).
"""
import math


def lr_at(epoch_float, lr, min_lr, warmup_epochs, epochs):
    """Warm-up `lr·e/warmup` while e < warmup_epochs, then `min_lr + (lr−min_lr)·½(1 + cos(π·progress))`."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    span = epochs - warmup_epochs
    progress = (epoch_float - warmup_epochs) / span if span > 0 else 1.0
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(optimizer_groups, epoch_float, args):
    """Set `lr` on every param group (a list of dicts or an object with `.param_groups`) and return it.

    Every group gets the key explicitly: in Jittor a group's own "lr" wins over the optimizer's (JITTOR_NOTES A3).
    """
    value = lr_at(epoch_float, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    groups = getattr(optimizer_groups, "param_groups", optimizer_groups)
    for group in groups:
        group["lr"] = value
    return value
