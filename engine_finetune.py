"""The fine-tuning loop of MoA (SPEC §5.2): AdamW on the adapters, gradient accumulation, warm-up + cosine lr.

Reads like the reference's `engine_finetune.py`: `train_one_epoch` walks this rank's micro-batches, sets the lr at
accumulation boundaries, accumulates gradients and takes an optimizer step every `accum_iter` micro-batches.
Differences, all deliberate:
* Gradients come from `jt.grad` and are summed here; under mpirun they (and the step's losses) are averaged over
  ranks with ONE all-reduce per optimizer step, and AdamW's bias correction counts optimizer steps — the same
  numbers as PyTorch DDP + `torch.optim.AdamW` (Jittor's own AdamW counts micro-steps, JITTOR_NOTES A3/A4).
* The loss logged per step is the mean over its micro-batches and ranks; a non-finite value stops the run before
  the update (all ranks see the same reduced value, so they stop together).
* Jittor's RNG is re-seeded from (seed, step, rank) at every optimizer step, so a resumed run draws the same
  router noise as an uninterrupted one.
"""
import math
from dataclasses import asdict, dataclass

import numpy as np

from Utils import distributed as dist
from engine.schedule import adjust_learning_rate
from Utils.metric_logger import MetricLogger
from Utils.runtime import import_jittor

jt = import_jittor()


class NonFiniteLoss(RuntimeError):
    def __init__(self, step, value):
        super().__init__("loss is %s at optimizer step %d; stopping (the last good checkpoint is kept)"
                         % (value, step))
        self.step = step


# ------------------------------------------------------------------------------------------- optimizer
def param_groups(named_params, weight_decay):
    """SPEC §5.2 step 5: no weight decay for 1-D parameters and names ending in `.bias`; decay for the rest."""
    decay, no_decay = [], []
    for name, p in named_params:
        (no_decay if len(p.shape) == 1 or name.endswith(".bias") else decay).append((name, p))
    return [{"named": no_decay, "weight_decay": 0.0}, {"named": decay, "weight_decay": weight_decay}]


V_FLOOR = 1e-36  # a normal float32 (FLT_MIN is 1.2e-38); see AdamW.step


class AdamW:
    """torch.optim.AdamW's update on Jittor Vars, driven by gradients we pass in (no backward inside).

    p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
    p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε),   t = number of optimizer steps taken.
    Moments are fp32 Vars kept in a plain dict (never module attributes, so they are not parameters).
    """

    def __init__(self, groups, lr, betas=(0.9, 0.95), eps=1e-8):
        self.param_groups = [dict(g, lr=lr) for g in groups if g["named"]]
        self.betas, self.eps = betas, eps
        self.step_count = 0
        self.state = {name: {"m": jt.zeros(p.shape, "float32"), "v": jt.zeros(p.shape, "float32")}
                      for g in self.param_groups for name, p in g["named"]}

    @property
    def named_params(self):
        return [np_ for g in self.param_groups for np_ in g["named"]]

    def step(self, grads):
        """Apply one update; `grads` maps parameter name → gradient Var (already averaged over ranks)."""
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        touched = []
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for name, p in group["named"]:
                g = grads[name].float32()
                st = self.state[name]
                m = st["m"] * b1 + g * (1.0 - b1)
                v = st["v"] * b2 + g * g * (1.0 - b2)
                # v is floored at a normal float before the sqrt: Jittor's CPU kernels run with flush-to-zero and
                # fast math, where sqrt of a denormal v (a gradient ~1e-20) can come out NaN inside this fused
                # expression. sqrt(V_FLOOR) is ~1e-10 of eps, so the update equals PyTorch's in fp32.
                denom = v.maximum(V_FLOOR).sqrt() / bc2_sqrt + self.eps
                new_p = p * (1.0 - lr * wd) - (m / denom) * (lr / bc1)
                st["m"], st["v"] = m.detach(), v.detach()
                p.update(new_p)
                touched += [p, st["m"], st["v"]]
        jt.sync(touched)  # materialise now so no graph is carried into the next step

    def state_dict(self):
        return {"step": self.step_count,
                "m": {n: s["m"].numpy().astype(np.float32) for n, s in self.state.items()},
                "v": {n: s["v"].numpy().astype(np.float32) for n, s in self.state.items()}}

    def load_state_dict(self, sd):
        missing = set(self.state) ^ set(sd["m"])
        if missing:
            raise ValueError("optimizer state does not match the parameters (e.g. %s)" % sorted(missing)[0])
        self.step_count = int(sd["step"])
        for n, s in self.state.items():
            if tuple(sd["m"][n].shape) != tuple(s["m"].shape):
                raise ValueError("optimizer state for %s has shape %s, parameter has %s"
                                 % (n, sd["m"][n].shape, tuple(s["m"].shape)))
            s["m"] = jt.array(sd["m"][n].astype(np.float32))
            s["v"] = jt.array(sd["v"][n].astype(np.float32))


# ------------------------------------------------------------------------------------------- train state
@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    step: int = 0                    # optimizer steps taken
    epoch: int = 0                   # epoch of the next micro-batch
    micro: int = 0                   # index of the next micro-batch within that epoch
    epoch_loss_sum: float = 0.0      # running sums of the current epoch's step losses
    epoch_loss_count: int = 0
    best_val: float = float("inf")
    best_step: int = -1
    bad_vals: int = 0                # validations in a row without improvement
    last_val_step: int = -1
    stopped: str = ""                # why training ended early ("" = it did not)

    def to_dict(self):
        return asdict(self)


# ------------------------------------------------------------------------------------------- loop
def train_one_epoch(model, data, optimizer, epoch, state, args, on_step=None, print_fn=print):
    """Run `epoch` from micro-batch `state.micro`. `on_step(state, record)` runs after every optimizer step
    (logging, validation, checkpoints) and returns True to stop training. Returns True when stopped early."""
    model.train()
    named = optimizer.named_params
    params = [p for _, p in named]
    accum = args.accum_iter
    n_micro = len(data)
    n_usable = n_micro - n_micro % accum       # a trailing partial accumulation is dropped, as in the reference
    logger = MetricLogger(enabled=dist.is_main_process(), print_fn=print_fn)
    header = "Epoch: [%d]" % epoch
    acc, loss_sum, ce_sum, lr = None, 0.0, 0.0, 0.0
    batches = data.batches(epoch, state.micro)
    for i, tokens, labels in logger.log_every(batches, args.log_interval * accum, header,
                                              total=max(n_micro - state.micro, 0)):
        if i >= n_usable:
            break
        if i % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + i / n_micro, args)
            jt.set_seed(args.seed * 1000003 + state.step * 7919 + dist.rank())
        loss, ce, _ = model(jt.array(tokens), jt.array(labels))
        grads = jt.grad(loss / accum, params)
        acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
        acc = [a.detach() for a in acc]
        jt.sync(acc + [loss, ce])
        loss_sum += loss.item()
        ce_sum += ce.item()
        if (i + 1) % accum:
            continue
        # one all-reduce per optimizer step: gradients plus this step's loss sums
        reduced = dist.all_reduce_grads_mean(acc + [jt.array(np.array([loss_sum, ce_sum], np.float32))])
        loss_value, ce_value = (float(x) / accum for x in reduced[-1].numpy())
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(state.step + 1, loss_value)
        optimizer.step({name: g for (name, _), g in zip(named, reduced[:-1])})
        state.step += 1
        state.micro = i + 1
        state.epoch_loss_sum += loss_value
        state.epoch_loss_count += 1
        logger.update(closs=loss_value, lr=lr)
        acc, loss_sum, ce_sum = None, 0.0, 0.0
        record = {"loss": loss_value, "ce_loss": ce_value, "lr": lr, "epoch": epoch + (i + 1) / n_micro}
        if on_step is not None and on_step(state, record):
            return True
    state.epoch, state.micro = epoch + 1, 0
    return False


def evaluate(model, eval_data):
    """Token-weighted mean cross-entropy over the whole validation set (every rank must call it)."""
    model.eval()
    total, count = 0.0, 0
    with jt.no_grad():
        for tokens, labels, n in eval_data.batches():
            if n == 0:
                continue
            _, ce, _ = model(jt.array(tokens), jt.array(labels))
            total += ce.item() * n
            count += n
    jt.sync_all()
    jt.gc()
    model.train()
    total, count = dist.all_reduce_sum([total, count])
    return total / count if count else float("nan")
