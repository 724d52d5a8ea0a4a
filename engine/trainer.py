"""The one training loop: every front end (Math.py, pretrain.py, sft.py, train_seq2seq.py, the demo's base, the
benchmarks) builds a model, data and a `TrainConfig` and hands them to `Trainer`.

Per optimizer step: the learning rate is set from the schedule at the accumulation boundary; each micro-batch's
loss terms come from `model.loss_terms(batch)` and are weighted by `model.loss_weights()`; gradients come from
`jt.grad` and are summed here; under mpirun they are averaged over ranks together with the step's loss sums in ONE
all-reduce; optional global-norm clipping and loss scaling; a non-finite loss stops the run before the update
(every rank sees the same reduced value); AdamW counts optimizer steps, not micro-steps. Jittor's RNG is re-seeded
from (seed, step, rank) at every step, so a resumed run draws the same noise as an uninterrupted one.

Loss normalisation: by default each micro-batch's language-model loss is its own token mean and micro-batches and
ranks are averaged (the reference's DDP numerics). With `token_weighted`, the LM term is weighted by the micro-batch's
share of the global step's target tokens, so the step's loss is the mean over every target token of the global batch
and 2 ranks equal 1 process exactly whatever the sequence lengths (the data object counts tokens, no communication).
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from engine.optim import AdamW, LossScaler, clip_coefficient, global_norm, param_groups
from Utils import distributed as dist
from Utils.errors import UserError
from Utils.metric_logger import MetricLogger, TrainReporter
from Utils.runtime import import_jittor
from Utils.train_checkpoint import BEST, LAST, capture_rng, load_train_checkpoint, restore_rng, save_train_checkpoint

jt = import_jittor()


class NonFiniteLoss(RuntimeError):
    def __init__(self, step, value):
        super().__init__("loss is %s at optimizer step %d; stopping (the last good checkpoint is kept)"
                         % (value, step))
        self.step = step


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
    skipped_steps: int = 0           # steps skipped by loss scaling (inf/NaN gradients)

    def to_dict(self):
        return asdict(self)


@dataclass
class TrainConfig:
    output_dir: str
    lr: float
    schedule: Callable            # (optimizer steps taken, fractional epoch) -> lr
    epochs: int = 1
    accum_iter: int = 1
    max_steps: int = 0            # 0 = no cap
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 0.0        # max global norm; 0 = off
    loss_scaling: bool = False    # dynamic loss scaling (fp16 on CUDA)
    token_weighted: bool = False  # see the module notes
    seed: int = 0
    val_interval: int = 0         # optimizer steps; 0 = at epoch ends
    save_interval: int = 0        # optimizer steps; 0 = at epoch ends only
    early_stop_patience: int = 0
    log_interval: int = 10
    progress: bool = True
    identity: dict = field(default_factory=dict)  # values a resumed run must share with its checkpoint (flag: value)
    config: dict = field(default_factory=dict)    # the resolved configuration (config.json, checkpoints)
    extra: dict = field(default_factory=dict)     # front-end data stored in every checkpoint


class Trainer:
    """Build with a model (see docs/architecture.md, "The model protocol"), training data, an optional validation
    set and a config; call `fit()`. `export(model)` writes the final artefact (rank 0) with the best weights."""

    def __init__(self, model, data, cfg, val_data=None, optimizer=None, export=None, on_validate=None,
                 print_fn=None):
        self.model, self.data, self.val_data, self.cfg = model, data, val_data, cfg
        self.named = list(model.trainable_parameters())
        if not self.named:
            raise UserError("nothing to train: the model has no trainable parameters")
        self.params = [p for _, p in self.named]
        # Trainable parameters that get no gradient by construction (sparse MoA's Γ in the reference's mode): the
        # optimizer skips them like torch skips a parameter whose .grad is None, weight decay included.
        self.gradientless = set(model.gradientless_parameters()) if hasattr(model, "gradientless_parameters") else set()
        self.optimizer = optimizer or AdamW(param_groups(self.named, cfg.weight_decay), cfg.lr, cfg.betas, cfg.eps)
        self.scaler = LossScaler(cfg.loss_scaling)
        self.state = TrainState()
        self.best_weights = None
        self.export, self.on_validate = export, on_validate
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main_process()
        self.reporter = None
        self._print = print_fn
        self.steps_per_epoch = len(data) // cfg.accum_iter
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self._weights = None

    # ------------------------------------------------------------------------------------------ output
    def print(self, *args):
        if self.reporter is not None:
            self.reporter.print(*args)
        elif self.main:
            (self._print or print)(*args)

    def log(self, kind, **fields):
        if self.reporter is not None:
            self.reporter.log(kind, **fields)

    # ------------------------------------------------------------------------------------------ weights
    def weights_numpy(self):
        """{name: float32 array} of the trainable parameters (every rank: it syncs)."""
        return {n: p.numpy().astype(np.float32) for n, p in self.named}

    def load_weights(self, arrays, source):
        names = {n for n, _ in self.named}
        extra, missing = sorted(set(arrays) - names), sorted(names - set(arrays))
        if extra or missing:
            raise UserError("%s: weight names do not match the model (%s %s)" % (
                source, "unexpected" if extra else "missing", (extra or missing)[0]))
        for n, p in self.named:
            if tuple(arrays[n].shape) != tuple(p.shape):
                raise UserError("%s: %s has shape %s, the model has %s" % (source, n, arrays[n].shape,
                                                                           tuple(p.shape)))
            p.update(jt.array(arrays[n].astype(np.float32)).cast(p.dtype))
        jt.sync(self.params)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, name, weights=None):
        payload = {"trainable": weights if weights is not None else self.weights_numpy(),
                   "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                   "state": self.state.to_dict(), "rng": capture_rng(), "identity": self.cfg.identity,
                   "config": self.cfg.config, "extra": self.cfg.extra,
                   "log_lines": self.reporter.lines if self.reporter is not None else 0}
        if self.main:
            save_train_checkpoint(os.path.join(self.cfg.output_dir, name), payload)

    def resume(self, path):
        """Restore everything from a checkpoint written by `save` (refusing one made with other settings)."""
        ckpt = load_train_checkpoint(path)
        for key, value in self.cfg.identity.items():
            saved = ckpt.get("identity", {})
            if key in saved and saved[key] != value:
                raise UserError("--resume: %s was made with %s %r but this run has %r (exact resumption needs the "
                                "same value)" % (path, key, saved[key], value))
        self.state = TrainState(**ckpt["state"])
        self.state.stopped = ""
        self.load_weights(ckpt["trainable"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        if self.state.best_step >= 0:
            best_path = os.path.join(os.path.dirname(os.path.abspath(path)), BEST)
            best = load_train_checkpoint(best_path)
            if best["state"]["step"] != self.state.best_step:
                raise UserError("--resume: %s is from step %d, expected the best step %d"
                                % (best_path, best["state"]["step"], self.state.best_step))
            self.best_weights = best["trainable"]
        return ckpt

    # ------------------------------------------------------------------------------------------ one step
    def _to_vars(self, batch):
        return {k: jt.array(v) for k, v in batch.items()}

    def optimizer_step(self, micro_batches, lr, epoch=None, first_micro=None):
        """One optimizer step over this rank's micro-batches (a list of batch dicts); returns the step's record
        {"loss", <term>: value, "lr", "grad_norm"} averaged over micro-batches and ranks. Raises NonFiniteLoss."""
        cfg, model = self.cfg, self.model
        accum = len(micro_batches)
        self.optimizer.set_lr(lr)
        jt.set_seed(cfg.seed * 1000003 + self.state.step * 7919 + self.rank)
        weights = model.loss_weights()
        factor_den = None
        if cfg.token_weighted:
            factor_den = self.data.global_target_count(epoch, first_micro, accum)
        acc, sums, names = None, None, None
        for batch in micro_batches:
            terms = model.loss_terms(self._to_vars(batch))
            if factor_den is not None and "lm" in terms:
                terms = dict(terms, lm=terms["lm"] * (self.data.target_count(batch) * self.world * accum
                                                      / max(factor_den, 1)))
            total = None
            for name, value in terms.items():
                w = weights.get(name, 0.0)
                if w:
                    total = value * w if total is None else total + value * w
            names = names or sorted(terms)
            grads = jt.grad(total * (self.scaler.scale / accum), self.params)
            acc = grads if acc is None else [a + g for a, g in zip(acc, grads)]
            acc = [a.detach() for a in acc]
            jt.sync(acc + [total] + [terms[n] for n in names])
            values = [total.item()] + [terms[n].item() for n in names]
            sums = values if sums is None else [s + v for s, v in zip(sums, values)]
        reduced = dist.all_reduce_grads_mean(acc + [jt.array(np.array(sums, np.float32))])
        means = [float(x) / accum for x in reduced[-1].numpy()]
        grads = reduced[:-1]
        record = {"loss": means[0], **dict(zip(names, means[1:])), "lr": lr}
        if not math.isfinite(record["loss"]):
            raise NonFiniteLoss(self.state.step + 1, record["loss"])
        finite, grad_scale = True, 1.0
        if cfg.clip_grad or self.scaler.enabled:
            norm = global_norm(grads)
            finite = math.isfinite(norm)
            if finite and self.scaler.enabled:   # unscale: the norm here, the gradients inside the update
                norm, grad_scale = norm / self.scaler.scale, 1.0 / self.scaler.scale
            record["grad_norm"] = norm
            if cfg.clip_grad and finite:
                grad_scale *= clip_coefficient(cfg.clip_grad, norm)
        if finite:
            pending = {n: g for (n, _), g in zip(self.named, grads) if n not in self.gradientless}
            del acc, reduced, grads   # the optimizer releases each gradient once applied; hold no other reference
            self.optimizer.step(pending, grad_scale)
        else:
            self.state.skipped_steps += 1
            record["skipped"] = True
        self.scaler.update(finite)
        self.state.step += 1
        return record

    # ------------------------------------------------------------------------------------------ loop
    def run_epoch(self, epoch, on_step=None):
        """Optimizer steps of `epoch` from micro-batch `state.micro`; a trailing partial accumulation is dropped, as
        in the reference. Returns True when training stopped early."""
        cfg, state = self.cfg, self.state
        self.model.train()
        accum = cfg.accum_iter
        n_micro = len(self.data)
        n_usable = n_micro - n_micro % accum
        logger = MetricLogger(enabled=self.main, print_fn=self.print)
        pending, first = [], None
        batches = self.data.batches(epoch, state.micro)
        for i, batch in logger.log_every(batches, cfg.log_interval * accum, "Epoch: [%d]" % epoch,
                                         total=max(n_micro - state.micro, 0)):
            if i >= n_usable:
                break
            if i % accum == 0:
                pending, first = [], i
            pending.append(batch)
            if (i + 1) % accum:
                continue
            lr = cfg.schedule(state.step, epoch + first / n_micro)
            record = self.optimizer_step(pending, lr, epoch, first)
            state.micro = i + 1
            state.epoch_loss_sum += record["loss"]
            state.epoch_loss_count += 1
            logger.update(closs=record["loss"], lr=lr)
            record["epoch"] = epoch + (i + 1) / n_micro
            if on_step is not None and on_step(record):
                return True
        state.epoch, state.micro = epoch + 1, 0
        return False

    def evaluate(self):
        """Token-weighted mean of the "lm" term over the whole validation set (every rank must call it)."""
        self.model.eval()
        total, count = 0.0, 0
        with jt.no_grad():
            for batch, n in self.val_data.batches():
                if n == 0:
                    continue
                total += self.model.loss_terms(self._to_vars(batch))["lm"].item() * n
                count += n
        jt.sync_all()
        jt.gc()
        self.model.train()
        total, count = dist.all_reduce_sum([total, count])
        return total / count if count else float("nan")

    def validate(self):
        state, cfg = self.state, self.cfg
        val = self.evaluate()
        extra = self.on_validate(self.model) if self.on_validate is not None else {}
        state.last_val_step = state.step
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_vals = val, state.step, 0
            self.best_weights = self.weights_numpy()
            self.save(BEST, self.best_weights)
        else:
            state.bad_vals += 1
        self.log("val", step=state.step, val_loss=val, best_val_loss=state.best_val, best_step=state.best_step,
                 **extra)
        self.reporter.scalar("val_loss", val, state.step)
        for k, v in extra.items():
            self.reporter.scalar("val_" + k, v, state.step)
        self.print("step %d: val_loss %.4f (best %.4f at step %d)%s" % (
            state.step, val, state.best_val, state.best_step,
            "".join(" %s %.4g" % kv for kv in sorted(extra.items()))))
        if cfg.early_stop_patience and state.bad_vals >= cfg.early_stop_patience:
            state.stopped = "early stop at step %d: val_loss did not improve for %d validations" % (
                state.step, state.bad_vals)
            return True
        return False

    def _on_step(self, record):
        cfg, state, rep = self.cfg, self.state, self.reporter
        rep.advance(loss="%.4f" % record["loss"], lr="%.2e" % record["lr"])
        rep.scalar("c_train_loss", record["loss"], state.step)
        rep.scalar("lr", record["lr"], state.step)
        terms = {k: v for k, v in record.items() if k not in ("loss", "lr", "epoch", "skipped")}
        for k, v in terms.items():
            rep.scalar("train_" + k, v, state.step)
        if state.step % cfg.log_interval == 0:
            fields = dict(step=state.step, epoch=round(record["epoch"], 6), loss=record["loss"], lr=record["lr"],
                          **terms)
            load = self.model.routing_load() if hasattr(self.model, "routing_load") else {}
            if load:
                fields["expert_load"] = {str(k): [round(float(x), 6) for x in v] for k, v in sorted(load.items())}
            if record.get("skipped"):
                fields["skipped"] = True
            self.log("train", **fields)
        stop = False
        if self.val_data is not None and cfg.val_interval and state.step % cfg.val_interval == 0:
            stop = self.validate()
        if cfg.max_steps and state.step >= cfg.max_steps:
            state.stopped = state.stopped or "reached --max_steps %d" % cfg.max_steps
            stop = True
        if not stop and cfg.save_interval and state.step % cfg.save_interval == 0:
            self.save(LAST)
        return stop

    def fit(self, resume_path=None, header=(), start_fields=None):
        """Resume if asked, then train to the end; returns the final TrainState. `header`: lines printed once after
        the config; `start_fields`: extra fields of the start/resume event in log.txt."""
        cfg = self.cfg
        ckpt = self.resume(resume_path) if resume_path else None
        self.reporter = TrainReporter(cfg.output_dir, self.main, self.total_steps, start_step=self.state.step,
                                      keep_lines=ckpt["log_lines"] if ckpt is not None else None,
                                      progress=cfg.progress)
        if self.main:
            path = os.path.join(cfg.output_dir, "config.json")
            with open(path + ".tmp", "w") as f:
                json.dump(cfg.config, f, indent=1, default=list)
            os.replace(path + ".tmp", path)
        self.print("config: %s" % json.dumps(cfg.config, default=list))
        for line in header:
            self.print(line)
        self.log("event", event="resume" if ckpt is not None else "start", step=self.state.step,
                 world_size=self.world, lr=cfg.lr, **(start_fields or {}))
        state = self.state
        finished = bool(cfg.max_steps and state.step >= cfg.max_steps) or \
            bool(cfg.early_stop_patience and state.bad_vals >= cfg.early_stop_patience)
        try:
            for epoch in range(state.epoch, cfg.epochs):
                if finished:
                    break
                finished = self.run_epoch(epoch, self._on_step)
                if finished:
                    break
                self.log("epoch", epoch=epoch, step=state.step,
                         train_loss=state.epoch_loss_sum / max(state.epoch_loss_count, 1))
                state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
                if self.val_data is not None and not cfg.val_interval:
                    finished = self.validate()
                self.save(LAST)
        except NonFiniteLoss as e:
            self.log("event", event="non_finite_loss", step=e.step)
            self.reporter.close()
            raise UserError(str(e))
        if self.val_data is not None and state.last_val_step != state.step and not state.stopped.startswith("early"):
            self.validate()
        self.save(LAST)
        if state.stopped:
            self.print(state.stopped)
        if self.best_weights is not None:
            self.load_weights(self.best_weights, "best weights")
        jt.sync_all()
        if self.export is not None and self.main:
            self.export(self.model)
        self.log("event", event="done", step=state.step, best_step=state.best_step,
                 best_val_loss=state.best_val if state.best_step >= 0 else None, stopped=state.stopped)
        self.reporter.close()
        dist.barrier()
        return state
