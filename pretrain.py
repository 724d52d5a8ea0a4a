"""Pretrain a decoder-only LM — mixture of experts or dense — on raw text (seed 001's `moe_train.py`).

    python pretrain.py --data_path corpus.jsonl --preset wyf3 --output_dir out [--val_split 0.02] [--dry_run]
    python pretrain.py --data_path corpus.jsonl --model_config params.json --tokenizer tok/ --output_dir out
    python pretrain.py --data_path corpus.jsonl --init_from ckpt_dir --output_dir out          (continue training)
    mpirun --allow-run-as-root --oversubscribe -np 2 python pretrain.py ...                       (data parallel)

Data: jsonl lines {"text": ...} (or a .txt file, one document per paragraph), each document encoded as bos + text +
eos, tokenised once into a cache beside the file (Dataset/pretrain_data.py). `--pack true` (default) concatenates the
documents and cuts the stream into blocks of max_seq_len + 1 tokens, every position a target, documents separated by
eos/bos inside a block; `--pack false` gives one document per row, truncated to max_seq_len and right-padded per
micro-batch (padding is excluded from the loss and from the routers' statistics). Validation: `--val_data_path`, or
`--val_split f` = the last f of the documents in file order (no document is split between the two).

Model: `--preset` (configs/wyf3|minimind|minimind2|mixtral_tiny.json) or `--model_config` (ModelArgs keys with the
"moe" section) from scratch — N(0, 0.02) with the scaled residual init (Models/init.py) — or `--init_from` any
directory `LLaMA_adapter.from_pretrained` reads. The vocabulary is the tokenizer's (`--tokenizer`, default the
checkpoint's own, else data/minimind_tokenizer).

Training: the project's one engine (engine/trainer.py): AdamW (betas 0.9/0.95, no decay on norms and biases),
linear warm-up + cosine to --min_lr, gradient accumulation, --clip_grad, the MoE auxiliary losses added with their
configuration's coefficients and logged apart from "lm", per-layer expert load in the log lines, the loss weighted by
tokens so `mpirun -np 2` equals one process, validation + early stop, exact resume (`--resume auto`) after a kill.

Writes to output_dir: log.txt (JSON lines), tensorboard scalars, config.json, checkpoint-last.pkl /
checkpoint-best.pkl, and at the end `model/` (params.json + consolidated.00.pth + tokenizer, the best weights; read it
with `LLaMA_adapter.from_pretrained`) and train_summary.json (parameters, tokens, tokens/s).
"""
import sys

from engine import lm_frontend as F
from engine.flags import add_training_flags, check_training_flags
from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main

RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "data_seed", "seed", "data_path", "val_data_path",
                     "val_split", "pack", "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "lr_schedule",
                     "weight_decay", "clip_grad", "preset", "model_config") + F.MODEL_IDENTITY


def build_parser():
    p = Parser(description="Pretrain an MoE or dense decoder-only LM on raw text (Jittor).")
    a = p.add_argument
    a("--data_path", default="", help="jsonl of {\"text\": ...} lines, or a .txt file (one document per paragraph)")
    a("--val_data_path", default="", help="validation corpus in the same format")
    a("--val_split", type=float, default=0.0, help="hold out the last fraction of the documents for validation")
    add_bool(p, "pack", True, "true: packed blocks of max_seq_len+1 tokens (default); false: one padded document "
                              "per row")
    a("--token_cache_dir", default=None, help="where the tokenised corpus is cached (default: beside the file)")
    add_training_flags(p, batch_size=8, epochs=1, lr=5e-4, weight_decay=0.1, save_interval=200)
    p.set_defaults(min_lr=5e-5)
    F.add_model_flags(p, scratch=True)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_training_flags(args)
    F.check_model_flags(args, scratch=True)
    return args


def load_data(args, tokenizer, max_seq_len, rank, world, main):
    """(training LMData, validation EvalLMData or None, summary lines)."""
    from Dataset.lm_batches import EvalLMData, LMData
    from Dataset.pretrain_data import corpus_rows, describe, load_corpus, split_corpus
    mode = "packed" if args.pack else "padded"
    if mode == "packed" and tokenizer.eos_id < 0:
        raise UserError("packed pretraining needs an eos token between documents; use --pack false")
    progress = main and args.progress
    corpus = load_corpus(args.data_path, tokenizer, cache_dir=args.token_cache_dir, writer=main, progress=progress)
    val_corpus = None
    if args.val_split:
        corpus, val_corpus = split_corpus(corpus, args.val_split)
    elif args.val_data_path:
        val_corpus = load_corpus(args.val_data_path, tokenizer, cache_dir=args.token_cache_dir, writer=main,
                                 progress=progress)
    rows, stats = corpus_rows(corpus, max_seq_len, mode)
    train = LMData(rows, args.batch_size, args.data_seed, rank, world)
    lines = [describe(args.data_path + (" (training part)" if args.val_split else ""), stats, max_seq_len)]
    if len(train) == 0:
        raise UserError("%s: %d %s rows do not fill one global micro-batch of batch_size x world_size = %d x %d"
                        % (args.data_path, len(rows), mode, args.batch_size, world))
    val = None
    if val_corpus is not None:
        vrows, vstats = corpus_rows(val_corpus, max_seq_len, mode, keep_tail=True)
        if len(vrows) == 0:
            raise UserError("%s: the validation part has no row with a target" % (args.val_data_path or args.data_path))
        val = EvalLMData(vrows, args.batch_size, rank, world)
        lines.append(describe(args.val_data_path or args.data_path + " (validation part)", vstats, max_seq_len))
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
        F.dry_run(args, margs, source, tok_path,
                  args.batch_size * args.world_size * args.accum_iter * margs.max_seq_len)
        return 0
    F.check_data_flags(args)
    # the corpus is read (and bad lines reported) before the output directory is touched
    return F.run_training(args, tokenizer, tok_path, margs, source,
                          lambda rank, world: load_data(args, tokenizer, margs.max_seq_len, rank, world,
                                                        dist.is_main_process()),
                          RESUME_MUST_MATCH, "%d x %d tokens")


if __name__ == "__main__":
    sys.exit(main() or 0)
