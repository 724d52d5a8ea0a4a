"""Command-line flags shared by the front ends: the training-loop flags every trainer takes, and the adapter flags
(the reference's names, defaults and string forms) that Math.py, inference and the benchmarks take."""
from Utils.cli import add_bool
from Utils.errors import UserError

# ModelArgs fields set from the adapter flags (the reference's main_finetune.py names).
ADAPTER_FLAGS = ("routing", "w_bias", "lora_layers", "lora_rank", "lora_targets", "lora_alpha", "expert_num",
                 "hydra_moe", "prompt_layers", "prompt_len", "p_adapter_layers", "p_adapter_size", "p_adapter_hydra",
                 "swi_x", "max_threshold", "const_threshold", "threshold_grad", "router_input", "top_k",
                 "lb_loss_coeff", "noisy_router")


def add_adapter_flags(p):
    """The reference's adapter flags with its defaults (booleans: `--flag` or `--flag true|false`)."""
    a = p.add_argument
    a("--routing", default="soft_moa", help="soft_moa | sparse_moa | instance_moa | unipeft | soft_moe | topk_moe | "
                                            "adamole (docs/moa.md)")
    add_bool(p, "w_bias", False)
    a("--lora_layers", default="0-0", help="half-open layer ranges, e.g. 0-32 or 0-8,24-32")
    a("--lora_rank", type=int, default=16)
    a("--lora_targets", default="Q,V", help="comma list of Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN")
    a("--lora_alpha", type=float, default=8)
    a("--expert_num", type=int, default=1)
    add_bool(p, "hydra_moe", False)
    a("--prompt_layers", default="0-0")
    a("--prompt_len", type=int, default=10)
    a("--p_adapter_layers", default="0-0")
    a("--p_adapter_size", type=int, default=16)
    add_bool(p, "p_adapter_hydra", False)
    a("--swi_x", type=int, default=0, help="SwiGLU type router hidden size factor (0 = linear router)")
    a("--max_threshold", type=float, default=0.5)
    add_bool(p, "const_threshold", False)
    a("--threshold_grad", default="none", help="sparse_moa threshold gradient: none | ste | shifted")
    a("--router_input", default="residual", choices=("residual", "normed"),
      help="what the type router and threshold read: the block input (residual: the reference LLaMA3_* code) or "
           "its attention_norm output (normed: MoA_Transformers' Qwen3/LLaMA files); kept in adapter_params.json")
    a("--top_k", type=int, default=1)
    a("--lb_loss_coeff", type=float, default=0.001)
    add_bool(p, "noisy_router", False)


def add_training_flags(p, batch_size=8, epochs=1, lr=None, weight_decay=0.0, save_interval=100, log_interval=10):
    """The loop's flags (engine/trainer.py): data order, batch, accumulation, optimiser, checkpoints, validation."""
    a = p.add_argument
    a("--output_dir", default="./output")
    a("--seed", type=int, default=0, help="initialisation and per-step noise (same on every rank)")
    a("--data_seed", type=int, default=0, help="data order (independent of --seed)")
    a("--batch_size", type=int, default=batch_size, help="per rank")
    a("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    a("--epochs", type=int, default=epochs)
    a("--lr", type=float, default=lr)
    a("--min_lr", type=float, default=0.0)
    a("--weight_decay", type=float, default=weight_decay)
    a("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no cap)")
    a("--val_interval", type=int, default=0, help="validate every N optimizer steps (0 = at epoch ends)")
    a("--save_interval", type=int, default=save_interval, help="checkpoint every N optimizer steps (and every "
                                                             "epoch end; 0 = epoch ends only)")
    a("--early_stop_patience", type=int, default=0, help="validations without improvement before stopping (0=off)")
    a("--log_interval", type=int, default=log_interval, help="optimizer steps between log lines")
    a("--resume", default="", help="a checkpoint file/dir, or 'auto' = output_dir's checkpoint-last.pkl if any")
    add_bool(p, "progress", True, "tqdm progress bar on rank 0")


def check_training_flags(args):
    for name in ("batch_size", "accum_iter", "epochs", "log_interval"):
        if getattr(args, name) < 1:
            raise UserError("--%s must be >= 1, got %d" % (name, getattr(args, name)))
    for name in ("max_steps", "val_interval", "save_interval", "early_stop_patience"):
        if getattr(args, name) < 0:
            raise UserError("--%s must be >= 0, got %d" % (name, getattr(args, name)))
    if args.lr is not None and not args.lr >= 0:
        raise UserError("--lr must be >= 0, got %g" % args.lr)
    if not 0.0 <= getattr(args, "val_split", 0.0) < 1.0:   # every front end that holds out a validation part
        raise UserError("--val_split must be in [0, 1), got %g" % args.val_split)


def add_generation_flags(p, temperature=0.1):
    """How inference.py generates answers to test-set records and reads them off (Dataset/test_runner.py), with its
    defaults; `moefy.py evaluate --math_sets` takes the same flags with `temperature` 0 (greedy)."""
    a = p.add_argument
    a("--max_gen_len", type=int, default=128)
    a("--min_gen_len", type=int, default=30, help="room kept for the answer when truncating an input")
    a("--max_batch_size", type=int, default=32)
    a("--temperature", type=float, default=temperature, help="0 = greedy")
    a("--top_p", type=float, default=0.75)
    a("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0 = off)")
    a("--repetition_penalty", type=float, default=1.0,
      help="Hugging Face's repetition penalty on prompt and generated tokens (1.0 = off)")
    a("--aqua_rule", choices=("first", "answer_is"), default="first",
      help="AQuA letter extraction: first capital A-E (reference) or the letter after 'answer is' (D9)")
    a("--prompt_template", choices=("alpaca", "chat", "completion"), default="alpaca",
      help="alpaca (the reference's), chat (the tokenizer's chat template, as Math.py --prompt_template chat), "
           "completion (code sets only: the bare task text, for a base model)")
    a("--chat_template_kwargs", default="", help="JSON object of chat template variables, e.g. "
                                                  "'{\"enable_thinking\": false}' (as given to Math.py)")


def check_generation_flags(args):
    """The flags of add_generation_flags; parses --chat_template_kwargs in place."""
    for name in ("max_gen_len", "max_batch_size"):
        if getattr(args, name) < 1:
            raise UserError("--%s must be >= 1, got %d" % (name, getattr(args, name)))
    if args.min_gen_len < 0:
        raise UserError("--min_gen_len must be >= 0, got %d" % args.min_gen_len)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.top_k < 0 or args.repetition_penalty <= 0:
        raise UserError("--top_k must be >= 0 and --repetition_penalty > 0")
    from Dataset.prompts import parse_template_kwargs
    if isinstance(args.chat_template_kwargs, str):
        args.chat_template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    if args.chat_template_kwargs and args.prompt_template != "chat":
        raise UserError("--chat_template_kwargs needs --prompt_template chat")
