"""Train the encoder–decoder MoE (seed 003) on question → answer pairs with the project's one training engine.

    python train_seq2seq.py --data_path train.json --tokenizer tok/ --model_config model_params.json \\
        --output_dir out [--val_data_path val.json] [--init_from switch_dir]
    mpirun --allow-run-as-root --oversubscribe -np 2 python train_seq2seq.py ...      (data parallel)

The model config is the seed's model_params.json (vocab_size, embed_size, num_heads, hidden_dim, enc_layers,
dec_layers, dropout) plus the keys of Models/seq2seq/config.py (style, sparse steps, the "moe" section); the
vocabulary comes from the tokenizer (a smaller vocab_size is an error, ids are never clamped). `--init_from` starts
from a model directory instead (ours, or HF SwitchTransformers' config.json + safetensors). AdamW (betas 0.9/0.999
as the seed's torch default), warm-up then constant / cosine / linear, gradient accumulation, clipping by global norm
(`--clip_grad` is the max norm — the seed passed the learning rate there), label smoothing as torch's, the MoE
auxiliary losses with the config's coefficients, `--grad_checkpoint`, exact resume, validation loss plus greedy
exact match / BLEU / chrF (sacrebleu) on `--val_generate` examples. On CUDA `--dtype float16` (with loss
scaling) or `bfloat16` casts the model; the CPU trains in float32 only. Writes to output_dir: log.txt,
tensorboard scalars, checkpoint-last/best.pkl, val_predictions.jsonl, and model/ (the best weights, config and
tokenizer), which generate_seq2seq.py loads.
"""
import json
import os
import sys

from engine.flags import add_training_flags, check_training_flags
from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main

RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "data_seed", "seed", "data_path", "val_data_path",
                     "val_split", "epochs", "lr", "min_lr", "weight_decay", "warmup_steps", "lr_schedule",
                     "max_src_len", "max_tgt_len", "label_smoothing", "clip_grad", "model_config", "init_from",
                     "tokenizer", "dtype", "token_weighted", "max_steps")


def build_parser():
    p = Parser(description="Train the encoder-decoder MoE (Jittor)")
    a = p.add_argument
    a("--data_path", required=True, help="question/answer records: JSON list or JSON lines")
    a("--val_data_path", default="", help="validation records; if empty, --val_split of the training file")
    a("--val_split", type=float, default=0.0)
    a("--tokenizer", required=True, help="tokenizer directory (tokenizer.json), e.g. from Utils.train_tokenizer "
                                         "--recipe seq2seq")
    a("--model_config", default="", help="model_params.json (the seed's keys + Models/seq2seq/config.py's)")
    a("--init_from", default="", help="start from a model directory (ours or HF SwitchTransformers) instead")
    add_training_flags(p, batch_size=32, epochs=10, lr=3e-4, weight_decay=0.01, save_interval=200)
    a("--warmup_steps", type=int, default=100)
    a("--lr_schedule", default="constant", help="after warm-up: constant | cosine | linear")
    a("--clip_grad", type=float, default=1.0, help="max global gradient norm (0 = off)")
    a("--label_smoothing", type=float, default=0.1)
    a("--max_src_len", type=int, default=256)
    a("--max_tgt_len", type=int, default=256)
    a("--dtype", default="float32", help="float32 | bfloat16 | float16 (half types: CUDA only)")
    add_bool(p, "loss_scaling", None, "dynamic loss scaling (default: on for float16)")
    add_bool(p, "grad_checkpoint", False, "recompute each layer in the backward")
    add_bool(p, "token_weighted", True, "every target token of a global step weighs the same")
    a("--val_generate", type=int, default=200, help="validation examples decoded greedily for exact match / BLEU")
    a("--val_max_new_tokens", type=int, default=64)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_training_flags(args)
    if not 0.0 <= args.label_smoothing < 1.0:
        raise UserError("--label_smoothing must be in [0, 1), got %g" % args.label_smoothing)
    if args.clip_grad < 0 or args.warmup_steps < 0 or args.val_generate < 0:
        raise UserError("--clip_grad, --warmup_steps and --val_generate must be >= 0")
    if args.lr_schedule not in ("constant", "cosine", "linear"):
        raise UserError("--lr_schedule %r: expected constant, cosine or linear" % args.lr_schedule)
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise UserError("--dtype %r: expected float32, bfloat16 or float16" % args.dtype)
    if bool(args.model_config) == bool(args.init_from):
        raise UserError("give exactly one of --model_config and --init_from")
    if args.loss_scaling is None:
        args.loss_scaling = args.dtype == "float16"
    return args


def build_model(args, tokenizer):
    from Models.seq2seq.config import Seq2SeqConfig
    from Models.seq2seq.files import load_model
    from Models.seq2seq.model import Seq2SeqTransformer
    if args.init_from:
        model = load_model(args.init_from, tokenizer)
        model.cfg.validate()
    else:
        cfg = Seq2SeqConfig.from_json(args.model_config).with_tokenizer(tokenizer)
        model = Seq2SeqTransformer(cfg, tokenizer)
    model.label_smoothing = args.label_smoothing
    model.set_grad_checkpoint(args.grad_checkpoint)
    return model


def set_dtype(model, dtype):
    """Half types on CUDA only (docs/jittor_notes.md A5: CPU half matmuls are ~300–900× slower and bf16 is inexact)."""
    if dtype == "float32":
        return
    from Utils.runtime import import_jittor
    if not import_jittor().flags.use_cuda:
        raise UserError("--dtype %s needs CUDA; on the CPU train in float32" % dtype)
    for _, p in model.named_parameters():
        p.assign(p.cast(dtype))


def make_validator(args, model, val_examples, tokenizer, world, rank):
    """on_validate: greedy answers for the first --val_generate validation examples (split over ranks)."""
    from Utils import distributed as dist
    import sacrebleu
    chosen = val_examples[:args.val_generate]
    mine = list(range(rank, len(chosen), world))

    def on_validate(m):
        if not chosen:
            return {}
        preds = m.generate([chosen[i][0] for i in mine], max_new_tokens=args.val_max_new_tokens) if mine else []
        pairs = dict(p for part in dist.gather_objects(list(zip(mine, preds))) for p in part)
        hyp = [tokenizer.decode(pairs[i]).strip() for i in range(len(chosen))]
        ref = [tokenizer.decode(chosen[i][1]).strip() for i in range(len(chosen))]
        if dist.is_main_process():
            path = os.path.join(args.output_dir, "val_predictions.jsonl")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for h, r in zip(hyp, ref):
                    f.write(json.dumps({"prediction": h, "reference": r}, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
        return {"exact_match": sum(h == r for h, r in zip(hyp, ref)) / len(ref),
                "bleu": sacrebleu.corpus_bleu(hyp, [ref]).score, "chrf": sacrebleu.corpus_chrf(hyp, [ref]).score}
    return on_validate


def train(args, resume_path):
    from Dataset.seq2seq_data import Encoder, EvalSeq2SeqData, Seq2SeqData, load_pairs
    from engine.frontend import train_config
    from engine.schedule import StepSchedule
    from engine.trainer import Trainer
    from Models.seq2seq.files import save_model
    from Models.tokenizer import load_tokenizer
    from Utils import distributed as dist
    from Utils.runtime import seed_everything
    import numpy as np
    rank, world = dist.rank(), dist.world_size()
    args.world_size = world
    tokenizer = load_tokenizer(args.tokenizer)

    pairs = load_pairs(args.data_path)
    if args.val_data_path:
        val_pairs = load_pairs(args.val_data_path)
    else:
        n_val = int(round(len(pairs) * args.val_split))
        order = np.random.default_rng(args.data_seed).permutation(len(pairs))
        val_pairs = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in sorted(order[n_val:])]
    enc = Encoder(tokenizer, args.max_src_len, args.max_tgt_len)
    train_examples = enc.pairs(pairs)
    n_trunc = enc.n_truncated
    val_examples = enc.pairs(val_pairs)

    seed_everything(args.seed)
    model = build_model(args, tokenizer)
    set_dtype(model, args.dtype)
    model.train()
    dist.broadcast_params([p for _, p in model.trainable_parameters()])
    cfg = model.cfg
    special = (cfg.pad_token_id, cfg.decoder_start_token_id, cfg.eos_token_id)
    data = Seq2SeqData(train_examples, args.batch_size, special, args.data_seed, rank, world)
    val = EvalSeq2SeqData(val_examples, args.batch_size, special, rank, world) if val_examples else None
    steps_per_epoch = len(data) // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError("--data_path: %d examples give no optimizer step (global batch %d × accum_iter %d)"
                        % (len(train_examples), args.batch_size * world, args.accum_iter))
    total = steps_per_epoch * args.epochs
    total = min(total, args.max_steps) if args.max_steps else total
    schedule = StepSchedule(args.lr, total, args.min_lr, args.warmup_steps, args.lr_schedule)
    config = dict(vars(args), model=cfg.to_dict())
    tcfg = train_config(args, schedule, RESUME_MUST_MATCH, config, betas=(0.9, 0.999), eps=1e-8,
                        clip_grad=args.clip_grad, loss_scaling=args.loss_scaling,
                        token_weighted=args.token_weighted, extra={"model_config": cfg.to_dict()})
    out_dir = os.path.join(args.output_dir, "model")
    on_validate = make_validator(args, model, val_examples, tokenizer, world, rank) if val else None
    trainer = Trainer(model, data, tcfg, val_data=val, on_validate=on_validate,
                      export=lambda m: save_model(m, out_dir, tokenizer.dir))
    moe = "dense" if not cfg.is_moe else "MoE: %d experts, top-%d, encoder layers %s, decoder layers %s" % (
        cfg.moe.num_experts, cfg.moe.top_k, cfg.encoder_moe_layers(), cfg.decoder_moe_layers())
    header = ["model: %s style, %d parameters, vocabulary %d, %s" % (cfg.style, model.num_parameters(),
                                                                     cfg.vocab_size, moe),
              "data: %d train pairs (%d truncated), %d validation pairs | world size %d | %d optimizer steps"
              % (len(train_examples), n_trunc, len(val_examples), world, total)]
    state = trainer.fit(resume_path, header=header, start_fields=dict(n_train=len(train_examples),
                                                                      n_val=len(val_examples)))
    if dist.is_main_process():
        print("model (%s) written to %s" % ("best, step %d" % state.best_step if state.best_step >= 0 else "last",
                                            out_dir), flush=True)
    return 0


@cli_main
def main(argv=None):
    args = parse_args(argv)
    for flag in ("data_path", "val_data_path", "model_config"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UserError("--%s: %s is not a file" % (flag, path))
    for flag in ("tokenizer", "init_from"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            raise UserError("--%s: %s is not a directory" % (flag, path))
    from engine.frontend import run_in_output_dir
    return run_in_output_dir(args.output_dir, args.resume, lambda resume_path: train(args, resume_path))


if __name__ == "__main__":
    sys.exit(main() or 0)
