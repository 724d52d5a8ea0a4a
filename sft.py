"""Supervised fine-tuning (SFT) of a pretrained decoder-only LM, MoE or dense, on chat data (seed 001's
`moe_sft_train.py`).

    python sft.py --init_from out/pretrain/model --data_path sft.jsonl --output_dir out/sft [--val_split 0.05]
    mpirun --allow-run-as-root --oversubscribe -np 2 python sft.py ...                          (data parallel)

Data (Dataset/sft_data.py; a file may mix both formats): minimind's {"conversations": [{"role": "system" | "user" |
"assistant", "content": ...}, ...]} and wyf3's {"instruction", "input", "output", "history": [[q, a], ...]}. Each
conversation is rendered with the tokenizer's own chat template; the loss is on the assistant turns only (their
content and end-of-turn token): prompts, role headers and template scaffolding are never targets. A conversation
longer than max_seq_len loses its end; one left with no answer token is skipped and counted. Rows are right-padded
per micro-batch; the loss is the mean over every answer token of the global batch (so `mpirun -np 2` equals one
process whatever the lengths). Validation: `--val_data_path`, or `--val_split f` = a random f of the conversations
(by --data_seed).

Everything else — AdamW with decay groups, warm-up + cosine, accumulation, clipping, MoE auxiliary losses with their
coefficients, expert load in the log, early stop, exact resume, `--trainable all|moe|router`, `--dry_run` — is
pretrain.py's (see its --help). Writes output_dir/model/ (read it with `LLaMA_adapter.from_pretrained`),
train_summary.json, log.txt, tensorboard scalars and checkpoints.
"""
import math
import os
import sys
import time

import numpy as np

from engine import lm_frontend as F
from engine.flags import add_training_flags, check_training_flags
from Utils.cli import Parser
from Utils.errors import UserError, cli_main

RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "data_seed", "seed", "data_path", "val_data_path",
                     "val_split", "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule",
                     "weight_decay", "clip_grad") + F.MODEL_IDENTITY


def build_parser():
    p = Parser(description="Supervised fine-tuning of a pretrained MoE or dense LM on chat data (Jittor).")
    a = p.add_argument
    a("--data_path", default="", help="jsonl: minimind conversations or instruction/input/output/history records")
    a("--val_data_path", default="", help="validation conversations in the same formats")
    a("--val_split", type=float, default=0.0, help="hold out a random fraction of the conversations (--data_seed)")
    add_training_flags(p, batch_size=8, epochs=1, lr=1e-4, weight_decay=0.0, save_interval=200)
    p.set_defaults(min_lr=1e-5)
    F.add_model_flags(p, scratch=False)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_training_flags(args)
    F.check_model_flags(args, scratch=False)
    if not 0.0 <= args.val_split < 1.0:
        raise UserError("--val_split must be in [0, 1), got %g" % args.val_split)
    if args.val_split and args.val_data_path:
        raise UserError("give --val_data_path or --val_split, not both")
    return args


def check_paths(args):
    if not args.data_path:
        raise UserError("--data_path is required")
    for flag in ("data_path", "val_data_path"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UserError("--%s: %s is not a file" % (flag, path))


def split_conversations(convs, fraction, seed):
    """(train, validation): round(f·n) conversations (at least 1) drawn by `seed`, the rest in file order."""
    n_val = max(1, int(round(fraction * len(convs))))
    if n_val >= len(convs):
        raise UserError("--val_split %g of %d conversations leaves none for training" % (fraction, len(convs)))
    held = set(np.random.default_rng(seed).permutation(len(convs))[:n_val].tolist())
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def load_data(args, tokenizer, max_seq_len, rank, world):
    """(training LMData, validation EvalLMData or None, summary lines); every record is checked first."""
    from Dataset.lm_batches import EvalLMData, LMData
    from Dataset.sft_data import describe, encode_conversations, read_conversations
    convs = read_conversations(args.data_path)
    val_convs, val_name = None, args.val_data_path
    if args.val_data_path:
        val_convs = read_conversations(args.val_data_path)
    elif args.val_split:
        convs, val_convs = split_conversations(convs, args.val_split, args.data_seed)
        val_name = args.data_path + " (validation part)"
    rows, stats = encode_conversations(convs, tokenizer, max_seq_len, args.data_path)
    train = LMData(rows, args.batch_size, args.data_seed, rank, world)
    if len(train) == 0:
        raise UserError("%s: %d conversations do not fill one global micro-batch of batch_size x world_size = %d x %d"
                        % (args.data_path, len(rows), args.batch_size, world))
    lines = [describe(args.data_path, stats, max_seq_len)]
    val = None
    if val_convs is not None:
        vrows, vstats = encode_conversations(val_convs, tokenizer, max_seq_len, val_name)
        val = EvalLMData(vrows, args.batch_size, rank, world)
        lines.append(describe(val_name, vstats, max_seq_len))
    return train, val, lines


def train(args, tokenizer, tok_path, margs, source, loaded, resume_path):
    from engine.frontend import train_config
    from engine.schedule import StepSchedule
    from engine.trainer import Trainer
    from Utils import distributed as dist
    world, main = dist.world_size(), dist.is_main_process()
    data, val, lines = loaded
    steps_per_epoch = len(data) // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError("--data_path: %d micro-batches per epoch give no optimizer step with --accum_iter %d"
                        % (len(data), args.accum_iter))
    total = args.epochs * steps_per_epoch
    total = min(total, args.max_steps) if args.max_steps else total
    if args.warmup_steps is None:
        args.warmup_steps = int(math.ceil(0.02 * total))
    schedule = StepSchedule(args.lr, total, args.min_lr, args.warmup_steps, args.lr_schedule)
    model = F.build_model(args, margs)
    counts = F.param_counts(margs)
    timed, timed_val = F.TimedData(data), (F.TimedEval(val) if val is not None else None)
    config = dict(vars(args), model=margs.base_params(), model_source=source, tokenizer_path=tok_path,
                  params=counts)
    cfg = train_config(args, schedule, RESUME_MUST_MATCH, config, betas=(0.9, 0.95), clip_grad=args.clip_grad,
                       token_weighted=True)
    out_dir = os.path.join(args.output_dir, "model")
    trainer = Trainer(model, timed, cfg, val_data=timed_val, export=lambda m: F.export_model(m, out_dir))
    header = ["model: %s from %s, %d parameters (%d active per token), %d trainable (--trainable %s)"
              % ("MoE" if margs.moe is not None else "dense", source, counts["total"], counts["active"],
                 model.num_trainable_params(), args.trainable),
              "optimizer: %d steps (%d per epoch), global batch %d conversations of <= %d tokens, lr %.3g -> %.3g, "
              "warm-up %d, world size %d" % (total, steps_per_epoch, args.batch_size * world * args.accum_iter,
                                             margs.max_seq_len, args.lr, args.min_lr, args.warmup_steps, world)]
    header += ["data: " + l for l in lines]
    t0 = time.perf_counter()
    state = trainer.fit(resume_path, header=header)
    speed = F.throughput(timed, timed_val, time.perf_counter() - t0)
    if main:
        summary = dict(params=counts, trainable_params=model.num_trainable_params(), steps=state.step,
                       best_step=state.best_step, best_val_loss=state.best_val if state.best_step >= 0 else None,
                       world_size=world, **speed)
        F.write_json_atomic(os.path.join(args.output_dir, "train_summary.json"), summary)
        print("model (%s weights) written to %s; %d tokens in %.1fs (%.0f tokens/s)"
              % ("best, step %d" % state.best_step if state.best_step >= 0 else "last", out_dir, speed["tokens"],
                 speed["seconds"], speed["tokens_per_s"]), flush=True)
    return 0


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from Utils import distributed as dist
    args.world_size = dist.world_size()
    F.check_dtype(args.dtype)
    tokenizer, tok_path = F.load_lm_tokenizer(args)
    margs, source = F.resolve_model_args(args, tokenizer, tok_path)
    if args.dry_run:
        F.dry_run(args, margs, source, tok_path, None)
        return 0
    check_paths(args)
    from engine.frontend import run_in_output_dir
    # every record is read and checked before the output directory is touched
    loaded = load_data(args, tokenizer, margs.max_seq_len, dist.rank(), args.world_size)
    return run_in_output_dir(args.output_dir, args.resume,
                             lambda resume_path: train(args, tokenizer, tok_path, margs, source, loaded, resume_path))


if __name__ == "__main__":
    sys.exit(main() or 0)
