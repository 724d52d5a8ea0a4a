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
import sys

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
    return args


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
    F.check_data_flags(args)
    # every record is read and checked before the output directory is touched
    return F.run_training(args, tokenizer, tok_path, margs, source,
                          lambda rank, world: load_data(args, tokenizer, margs.max_seq_len, rank, world),
                          RESUME_MUST_MATCH, "%d conversations of <= %d tokens")


if __name__ == "__main__":
    sys.exit(main() or 0)
