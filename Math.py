"""Fine-tune MoA / MoE-LoRA adapters on a frozen LLaMA-family base (the reference's `main_finetune.py`).

    python Math.py --llama_path CKPT --data_path train.json --output_dir out [--dry_run]
    mpirun --allow-run-as-root --oversubscribe -np 2 python Math.py ...      (data parallel)

Flags keep the reference's names and defaults (docs/moa.md); booleans take `--flag` alone or `--flag true|false`
(Utils/cli.py). The loop is the project's one training engine (engine/trainer.py). Writes to `output_dir`: `log.txt`
(JSON lines), tensorboard scalars, `checkpoint-last.pkl` / `checkpoint-best.pkl` (adapters + optimizer + data
position, never the base) and, at the end, `adapter/` with the best adapters (adapter.pth + adapter_params.json).
"""
import json
import os
import sys

from Dataset.prompts import PROMPT_TEMPLATES, parse_template_kwargs
from engine.flags import ADAPTER_FLAGS, add_adapter_flags, add_training_flags, check_training_flags
from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main

MODEL_FLAGS = ADAPTER_FLAGS + ("max_seq_len", "max_batch_size")
# Changing these between a checkpoint and its resumption would break "continues exactly".
RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "data_seed", "seed", "max_seq_len", "data_path",
                     "val_data_path", "val_split", "epochs", "warmup_epochs", "lr", "min_lr", "weight_decay",
                     "prompt_template", "chat_template_kwargs")


def build_parser():
    p = Parser(description="MoA fine-tuning (Jittor)")
    a = p.add_argument
    a("--llama_path", default="/path/to/llama", help="Meta (params.json) or HF checkpoint directory")
    a("--data_path", default="", help="training records (JSON array or JSONL)")
    a("--val_data_path", default="", help="validation records; if empty, --val_split of the training file")
    a("--val_split", type=float, default=0.0, help="fraction of the training records held out for validation")
    a("--prompt_template", default="alpaca", choices=PROMPT_TEMPLATES,
      help="alpaca: the reference's prompt; chat: the tokenizer's chat template, instruction (+ input) as the user "
           "turn, the output as the supervised assistant turn (give inference.py the same flags)")
    a("--chat_template_kwargs", default="",
      help="JSON object of chat template variables, e.g. '{\"enable_thinking\": false}' for Qwen3 (with "
           "--prompt_template chat)")
    add_training_flags(p, batch_size=64, epochs=400, weight_decay=0.05, save_interval=100)
    a("--warmup_epochs", type=float, default=None, help="default 1 (40 for topk_moe, adamole, instance, unipeft)")
    a("--blr", type=float, default=1e-3, help="base lr: lr = blr * eff_batch / 256 unless --lr is given")
    add_bool(p, "dry_run", False, "print the resolved config and param count")
    a("--max_seq_len", type=int, default=512)
    a("--max_batch_size", type=int, default=32)
    add_adapter_flags(p)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_training_flags(args)
    args.chat_template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    if args.chat_template_kwargs and args.prompt_template != "chat":
        raise UserError("--chat_template_kwargs needs --prompt_template chat")
    if args.warmup_epochs is None:  # the reference scripts' default: 1, or 40 for sparse_moe, instance, UniPEFT
        from Models.variants import variant
        args.warmup_epochs = variant(args.routing).warmup_epochs
    if args.warmup_epochs < 0:
        raise UserError("--warmup_epochs must be >= 0")
    return args


def resolve_lr(args, world):
    """docs/moa.md §5.2 step 4: eff_batch = batch_size · accum_iter · world_size; lr = blr · eff_batch / 256 unless
    given."""
    args.world_size = world
    args.eff_batch_size = args.batch_size * args.accum_iter * world
    if args.lr is None:
        args.lr = args.blr * args.eff_batch_size / 256
    return args


def model_args_from(args):
    """ModelArgs from `<llama_path>/params.json` (or HF config.json) + the adapter flags; reads no weights."""
    from Models.model_args import FieldError, ModelArgs
    if not os.path.isdir(args.llama_path):
        raise UserError("--llama_path: %s is not a directory" % args.llama_path)
    overrides = {k: getattr(args, k) for k in MODEL_FLAGS}
    meta = os.path.join(args.llama_path, "params.json")
    hf = os.path.join(args.llama_path, "config.json")
    try:
        if os.path.isfile(meta):
            return ModelArgs.from_params_json(meta, **overrides)
        if os.path.isfile(hf):
            return ModelArgs.from_hf_config(hf, **overrides)
    except FieldError as e:  # name the flag the user typed
        if e.field in overrides:
            raise UserError("--%s: %s" % (e.field, e.detail))
        raise
    raise UserError("--llama_path: %s holds neither params.json nor config.json" % args.llama_path)


def base_param_count(m):
    d, L, F, V = m.dim, m.n_layers, m.ffn_hidden_dim, m.vocab_size
    d_kv = m.n_kv_heads * m.head_dim
    return 2 * V * d + d + L * (2 * d * d + 2 * d * d_kv + 3 * d * F + 2 * d)


def dry_run(args):
    """Resolved configuration and the analytic trainable-parameter count (works for 8B in seconds)."""
    margs = model_args_from(args)
    resolve_lr(args, int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    from Models.moa import count_trainable_params
    n = int(count_trainable_params(margs))
    base = base_param_count(margs)
    print("model:", json.dumps(margs.to_dict(), default=list))
    print("training:", json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in MODEL_FLAGS}))
    print(json.dumps({"trainable_params": n, "base_params": base, "percent_of_base": round(100.0 * n / base, 4),
                      "routing": margs.routing, "lr": args.lr, "eff_batch_size": args.eff_batch_size}))


def check_paths(args):
    for flag in ("data_path", "val_data_path"):
        path = getattr(args, flag)
        if flag == "data_path" and not path:
            raise UserError("--data_path is required")
        if path and not os.path.isfile(path):
            raise UserError("--%s: %s is not a file" % (flag, path))
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError("--output_dir: %s exists and is not a directory" % args.output_dir)


def write_adapter(model, out_dir):
    """`<output_dir>/adapter/` via the project's adapter writer (reference key names + adapter_params.json)."""
    from Models.adapter_io import save_adapter
    save_adapter(model, out_dir)


def run(args):
    """Build the model and data, then train with the engine; returns 0 or raises UserError."""
    from engine.frontend import run_in_output_dir
    from Utils import distributed as dist
    resolve_lr(args, dist.world_size())
    margs = model_args_from(args)
    return run_in_output_dir(args.output_dir, args.resume, lambda resume_path: train(args, margs, resume_path))


def train(args, margs, resume_path):
    from Dataset import load_records
    from Dataset.finetune_dataset import EvalData, FinetuneData, split_records
    from Dataset.prompts import ChatPrompt
    from engine.frontend import train_config
    from engine.schedule import EpochSchedule
    from engine.trainer import Trainer
    from Models.llama_adapter import LLaMA_adapter
    from Models.variants import variant
    from Utils import distributed as dist
    from Utils.runtime import seed_everything
    rank, world = dist.rank(), dist.world_size()

    # ---- data (truncation is counted and reported; order from data_seed, independent of --seed)
    records = load_records(args.data_path)
    if args.val_data_path:
        val_records = load_records(args.val_data_path)
    else:
        records, val_records = split_records(records, args.val_split, args.data_seed)

    # ---- model: same initial adapters on every rank (seed is not rank dependent) + a broadcast to be sure
    seed_everything(args.seed)
    model = LLaMA_adapter.from_pretrained(args.llama_path, **{k: getattr(args, k) for k in MODEL_FLAGS})
    model.train()
    named = model.trainable_parameters()
    if not named:
        raise UserError("the adapter flags select no trainable parameters (check --lora_layers, --prompt_layers, "
                        "--p_adapter_layers)")
    dist.broadcast_params([p for _, p in named])
    chat = ChatPrompt(args.chat_template_kwargs) if args.prompt_template == "chat" else None
    # Instance MoA, UniPEFT, Top-K and AdaMoLE route on padded positions too: pad to max_seq_len as the reference.
    pad_to = margs.max_seq_len if variant(margs.routing).padding_sensitive else None
    train_data = FinetuneData.from_records(records, model.tokenizer, margs.max_seq_len, args.batch_size,
                                           args.data_seed, rank, world, chat=chat, pad_to=pad_to)
    val_data = None
    if val_records:
        val_examples = FinetuneData.from_records(val_records, model.tokenizer, margs.max_seq_len, 1, chat=chat)
        val_data = EvalData(val_examples.examples, args.batch_size, rank, world, val_examples.n_truncated, pad_to)
    steps_per_epoch = len(train_data) // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError("--data_path: %d training examples give no optimizer step per epoch (global batch %d × "
                        "accum_iter %d)" % (len(train_data.examples), args.batch_size * world, args.accum_iter))

    config = dict(vars(args), model=margs.to_dict())
    identity = {"adapter setting %s" % k: v for k, v in margs.adapter_params().items()}
    cfg = train_config(args, EpochSchedule(args.lr, args.min_lr, args.warmup_epochs, args.epochs),
                       RESUME_MUST_MATCH, config, betas=(0.9, 0.95), identity=identity,
                       extra={"adapter_params": margs.adapter_params()})
    out_dir = os.path.join(args.output_dir, "adapter")
    trainer = Trainer(model, train_data, cfg, val_data=val_data, export=lambda m: write_adapter(m, out_dir))
    header = ["trainable params: %d | world size %d | eff batch %d | lr %.3g | %d optimizer steps per epoch"
              % (model.num_trainable_params(), world, args.eff_batch_size, args.lr, steps_per_epoch),
              "data: %d train examples (%d truncated to max_seq_len %d), %d validation examples (%d truncated)"
              % (len(train_data.examples), train_data.n_truncated, margs.max_seq_len,
                 len(val_data) if val_data else 0, val_data.n_truncated if val_data else 0)]
    state = trainer.fit(resume_path, header=header, start_fields=dict(
        n_train=len(train_data.examples), n_truncated=train_data.n_truncated, n_val=len(val_data) if val_data else 0,
        n_val_truncated=val_data.n_truncated if val_data else 0))
    if dist.is_main_process():
        print("adapters (%s) written to %s" % ("best, step %d" % state.best_step if state.best_step >= 0
                                               else "last", out_dir), flush=True)
    return 0


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        dry_run(args)
        return 0
    check_paths(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
