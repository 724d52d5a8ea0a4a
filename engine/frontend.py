"""What every training front end does around the loop: hold the output directory, decide what to resume, and turn the
common flags into a `TrainConfig`."""
import os
import sys

from engine.trainer import TrainConfig
from Utils import distributed as dist
from Utils.errors import UserError
from Utils.train_checkpoint import LAST, OutputDirLock, resolve_resume


def run_in_output_dir(output_dir, resume, body):
    """Take `<output_dir>/.train.lock` on rank 0 (every rank learns whether that worked), resolve `--resume`, refuse to
    overwrite a run that left a checkpoint, then return `body(resume_path)`; the lock is released afterwards."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError("--output_dir: %s exists and is not a directory" % output_dir)
    lock, err = OutputDirLock(output_dir), None
    if dist.is_main_process():
        try:
            lock.acquire()
        except UserError as e:
            err = e
    if not dist.main_decides(err is None):
        if err is not None:
            raise err
        sys.exit(2)  # rank 0 reports the reason
    try:
        resume_path = resolve_resume(resume, output_dir)
        if resume_path is None and os.path.isfile(os.path.join(output_dir, LAST)):
            raise UserError("--output_dir %s already holds %s: pass --resume auto to continue it, or choose another "
                            "--output_dir" % (output_dir, LAST))
        return body(resume_path)
    finally:
        lock.release()


def train_config(args, schedule, identity_keys, config, **overrides):
    """TrainConfig from the flags of `engine.flags.add_training_flags` (+ `overrides`); `identity_keys` name the
    flags a resumed run must share with its checkpoint."""
    identity = {"--" + k: getattr(args, k) for k in identity_keys}
    identity.update(overrides.pop("identity", {}))
    kw = dict(output_dir=args.output_dir, lr=args.lr, schedule=schedule, epochs=args.epochs,
              accum_iter=args.accum_iter, max_steps=args.max_steps, weight_decay=args.weight_decay,
              seed=args.seed, val_interval=args.val_interval, save_interval=args.save_interval,
              early_stop_patience=args.early_stop_patience, log_interval=args.log_interval,
              progress=args.progress, identity=identity, config=config)
    kw.update(overrides)
    return TrainConfig(**kw)
