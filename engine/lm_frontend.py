"""What the two language-model front ends, `pretrain.py` and `sft.py`, share: the model flags (a preset, a params.json
or a checkpoint), the tokenizer that decides the vocabulary, precision and what trains; building the model from
scratch (`Models.init.init_weights`) or from a checkpoint; the dry run with closed-form parameter counts; data
wrappers that count tokens and time; and the final `<output_dir>/model/` (`Models.checkpoints.save_pretrained`) with
`train_summary.json` beside it.

Model configuration files (`--model_config`, and the presets in configs/) hold `ModelArgs` keys (Meta's params.json
names plus the architecture switches and the "moe" section, Models/model_args.py and Models/moe/config.py); keys
starting with "_" are comments. `vocab_size` is optional: the tokenizer's size is used when it is absent, and a
value smaller than the tokenizer's is an error (a larger one keeps unused rows, e.g. a vocabulary padded to 64).
"""
import json
import math
import os
import time

from Utils.cli import add_bool
from Utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
PRESETS = ("wyf3", "minimind", "minimind2", "mixtral_tiny")
DEFAULT_TOKENIZER = os.path.join(ROOT, "data", "minimind_tokenizer")
TRAINABLE_CHOICES = ("all", "moe", "router")
DTYPES = ("float32", "bfloat16")
BF16_ON_CPU = ("--dtype bfloat16 runs on CUDA only: Jittor's CPU matmul in bf16 is ~280x slower than fp32 and keeps "
               "its reductions in bf16 (~49% max error measured), so CPU training is fp32")
# Flags whose change between a checkpoint and its resumption would break "continues exactly".
MODEL_IDENTITY = ("init_from", "tokenizer", "max_seq_len", "trainable", "dtype", "init_std")


def add_model_flags(p, scratch=True):
    """Where the model comes from, its tokenizer, precision and what trains (+ the optimiser extras and --dry_run)."""
    a = p.add_argument
    if scratch:
        a("--preset", default=None, choices=PRESETS, help="a model configuration of configs/ (from scratch)")
        a("--model_config", default=None, help="a params.json of ModelArgs keys with its 'moe' section (from "
                                              "scratch); keys starting with '_' are comments")
    a("--init_from", default=None, help="a checkpoint directory that LLaMA_adapter.from_pretrained reads (ours, "
                                        "Meta, or HF LLaMA/Mixtral/Qwen2-MoE/Qwen3), MoE or dense")
    a("--tokenizer", default=None, help="a directory or file with tokenizer.json or tokenizer.model (default: the "
                                        "--init_from checkpoint's own, else data/minimind_tokenizer)")
    a("--max_seq_len", type=int, default=None, help="tokens per row (default: the model configuration's)")
    a("--trainable", default="all", choices=TRAINABLE_CHOICES,
      help="all parameters, the MoE layers (routers + experts), or the routers only (default all)")
    a("--dtype", default="float32", choices=DTYPES,
      help="bfloat16 (CUDA only) stores the frozen weights in bf16; trainable weights are fp32 master weights")
    a("--init_std", type=float, default=0.02, help="from scratch: N(0, std) weights, std/sqrt(2*n_layers) on the "
                                                   "residual projections (Models/init.py)")
    a("--clip_grad", type=float, default=1.0, help="max global gradient norm (0 = off)")
    a("--warmup_steps", type=int, default=None, help="linear warm-up steps (default: 2%% of the optimizer steps)")
    a("--lr_schedule", default="cosine", choices=("cosine", "constant", "linear"),
      help="after the warm-up, down to --min_lr (default cosine)")
    add_bool(p, "dry_run", False, "print the resolved configuration and the parameter counts, then exit")


def check_model_flags(args, scratch=True):
    sources = [f for f in (("preset", "model_config") if scratch else ()) + ("init_from",) if getattr(args, f)]
    if len(sources) > 1:
        raise UserError("give one of --%s, not both --%s and --%s" % (
            " / --".join(("preset", "model_config", "init_from") if scratch else ("init_from",)),
            sources[0], sources[1]))
    if not sources:
        raise UserError("--preset, --model_config or --init_from is required" if scratch else
                        "--init_from is required (the pretrained model to fine-tune)")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise UserError("--max_seq_len must be >= 2, got %d" % args.max_seq_len)
    if not args.init_std > 0:
        raise UserError("--init_std must be > 0, got %g" % args.init_std)
    if args.clip_grad < 0:
        raise UserError("--clip_grad must be >= 0, got %g" % args.clip_grad)
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError("--warmup_steps must be >= 0, got %d" % args.warmup_steps)
    for flag in ("model_config", "init_from"):
        path = getattr(args, flag, None)
        if path and not os.path.exists(path):
            raise UserError("--%s: %s not found" % (flag, path))
    if getattr(args, "init_from", None) and not os.path.isdir(args.init_from):
        raise UserError("--init_from: %s is not a directory" % args.init_from)


def check_dtype(dtype):
    """bf16 only where Jittor computes it correctly and fast."""
    if dtype == "bfloat16":
        from Utils.runtime import device_name
        if device_name() != "cuda":
            raise UserError(BF16_ON_CPU)


# ------------------------------------------------------------------------------------------------ configuration
def read_model_config(path):
    """The ModelArgs keys of a JSON configuration file ("_" keys dropped); unreadable files are one-line errors."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise UserError("%s: cannot read (%s)" % (path, e.strerror))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError("%s: not valid JSON (%s)" % (path, str(e).splitlines()[0]))
    if not isinstance(cfg, dict):
        raise UserError("%s: expected a JSON object of model settings" % path)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def config_path(args):
    return os.path.join(CONFIG_DIR, args.preset + ".json") if getattr(args, "preset", None) else args.model_config


def tokenizer_source(args):
    if args.tokenizer:
        return args.tokenizer
    if args.init_from:
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(args.init_from, name)):
                return args.init_from
        raise UserError("--init_from %s holds no tokenizer.json or tokenizer.model: pass --tokenizer" % args.init_from)
    return DEFAULT_TOKENIZER


def load_lm_tokenizer(args):
    """The tokenizer of --tokenizer (or its default); it must know where a text ends."""
    from Models.tokenizer import load_tokenizer
    path = tokenizer_source(args)
    tok = load_tokenizer(path)
    if getattr(tok, "eos_id", -1) < 0:
        raise UserError("%s: the tokenizer has no eos token (documents and answers must end with one)" % path)
    return tok, path


def fit_vocab(params, tokenizer, source, tok_path):
    """vocab_size from the tokenizer when the configuration has none; a smaller one is an error."""
    n = int(tokenizer.n_words)
    v = params.get("vocab_size")
    if v is None:
        return dict(params, vocab_size=n)
    if not isinstance(v, int) or isinstance(v, bool) or v < n:
        raise UserError("%s: vocab_size %r does not fit the tokenizer %s (%d ids): leave vocab_size out to use "
                        "the tokenizer's size" % (source, v, tok_path, n))
    return params


def resolve_model_args(args, tokenizer, tok_path):
    """ModelArgs of the run (no weights read): from the preset/config file + the tokenizer, or the checkpoint."""
    from Models.model_args import ModelArgs
    over = {"dtype": args.dtype}
    if args.max_seq_len is not None:
        over["max_seq_len"] = args.max_seq_len
    if args.init_from:
        meta, hf = (os.path.join(args.init_from, n) for n in ("params.json", "config.json"))
        if os.path.isfile(meta):
            margs, source = ModelArgs.from_params_json(meta, **over), meta
        elif os.path.isfile(hf):
            margs, source = ModelArgs.from_hf_config(hf, **over), hf
        else:
            raise UserError("--init_from %s holds neither params.json nor config.json" % args.init_from)
        fit_vocab({"vocab_size": margs.vocab_size}, tokenizer, source, tok_path)
        return margs, source
    path = config_path(args)
    params = read_model_config(path)
    unknown = sorted(set(params) - set(ModelArgs.field_names()))
    if unknown:
        raise UserError("%s: unknown key %r (known: %s)" % (path, unknown[0], ", ".join(ModelArgs.base_field_names())))
    params = fit_vocab(params, tokenizer, path, tok_path)
    if args.max_seq_len is None and "max_seq_len" not in params:
        over["max_seq_len"] = 512
    return ModelArgs.create(params, over, source=path), path


def param_counts(margs):
    """{"total", "active"} base parameters by the closed form (Models/param_count.py)."""
    from Models.param_count import count_params
    c = count_params(margs)
    return {"total": int(c["total"]), "active": int(c["active"])}


def dry_run(args, margs, source, tok_path, tokens_per_step):
    """Print the resolved model and training configuration and one JSON line of counts (no weights, no data)."""
    from Utils import distributed as dist
    counts = param_counts(margs)
    print("model (%s): %s" % (source, json.dumps(margs.base_params())))
    print("training: %s" % json.dumps({k: v for k, v in sorted(vars(args).items())}, default=str))
    print(json.dumps({"total_params": counts["total"], "active_params": counts["active"],
                      "active_fraction": round(counts["active"] / counts["total"], 4),
                      "moe_layers": list(margs.moe_layer_ids()), "vocab_size": margs.vocab_size,
                      "tokenizer": tok_path, "world_size": dist.world_size(),
                      "tokens_per_optimizer_step": tokens_per_step}))


# ------------------------------------------------------------------------------------------------ the model
def build_model(args, margs):
    """LLaMA_adapter with `--trainable` parameters in fp32: re-initialised from scratch (same on every rank) or read
    from --init_from."""
    from Models.llama_adapter import LLaMA_adapter
    from Utils import distributed as dist
    from Utils.runtime import seed_everything
    seed_everything(args.seed)
    if args.init_from:
        over = {"dtype": args.dtype}
        if args.max_seq_len is not None:
            over["max_seq_len"] = args.max_seq_len
        model = LLaMA_adapter.from_pretrained(args.init_from, tokenizer_path=tokenizer_source(args),
                                              trainable=args.trainable, **over)
    else:
        from Models.init import init_weights
        from Models.tokenizer import load_tokenizer
        model = LLaMA_adapter(margs, load_tokenizer(tokenizer_source(args)), trainable=args.trainable)
        init_weights(model, args.init_std)
        model.set_trainable(args.trainable)   # casts the frozen part to --dtype after the re-draw
    model.train()
    dist.broadcast_params([p for _, p in model.trainable_parameters()])
    return model


def export_model(model, out_dir):
    """`out_dir` = our checkpoint (params.json with "moe", consolidated.00.pth, tokenizer files), swapped in
    atomically; `LLaMA_adapter.from_pretrained(out_dir)` reads it."""
    from Models.checkpoints import save_pretrained
    save_pretrained(model, out_dir)


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ the training run
def check_data_flags(args):
    """--val_data_path and --val_split exclude each other; --data_path (and the validation file) must exist."""
    if args.val_split and args.val_data_path:
        raise UserError("give --val_data_path or --val_split, not both")
    if not args.data_path:
        raise UserError("--data_path is required")
    for flag in ("data_path", "val_data_path"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise UserError("--%s: %s is not a file" % (flag, path))


def run_training(args, tokenizer, tok_path, margs, source, load_data, resume_must_match, batch_text):
    """Read the data (`load_data(rank, world)` → (training data, validation data or None, summary lines)) before the
    output directory is touched, then train under the output-dir lock (engine/frontend.run_in_output_dir)."""
    from engine.frontend import run_in_output_dir
    from Utils import distributed as dist
    loaded = load_data(dist.rank(), dist.world_size())
    return run_in_output_dir(args.output_dir, args.resume, lambda resume_path: train(
        args, tok_path, margs, source, loaded, resume_path, resume_must_match, batch_text))


def train(args, tok_path, margs, source, loaded, resume_path, resume_must_match, batch_text):
    """The LM front ends' run on the engine's Trainer: warm-up (default 2% of the steps) + --lr_schedule, AdamW betas
    0.9/0.95, token-weighted loss, the best (else last) weights exported to output_dir/model/, train_summary.json.
    batch_text: what one row of the global batch is, for the log header (e.g. "%d x %d tokens")."""
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
    model = build_model(args, margs)
    counts = param_counts(margs)
    timed, timed_val = TimedData(data), (TimedEval(val) if val is not None else None)
    config = dict(vars(args), model=margs.base_params(), model_source=source, tokenizer_path=tok_path,
                  params=counts)
    cfg = train_config(args, schedule, resume_must_match, config, betas=(0.9, 0.95), clip_grad=args.clip_grad,
                       token_weighted=True)
    out_dir = os.path.join(args.output_dir, "model")
    trainer = Trainer(model, timed, cfg, val_data=timed_val, export=lambda m: export_model(m, out_dir))
    header = ["model: %s from %s, %d parameters (%d active per token), %d trainable (--trainable %s), MoE layers %s"
              % ("MoE" if margs.moe is not None else "dense", source, counts["total"], counts["active"],
                 model.num_trainable_params(), args.trainable, list(margs.moe_layer_ids()) or "none"),
              "optimizer: %d steps (%d per epoch), global batch %s, lr %.3g -> %.3g, warm-up %d, world size %d"
              % (total, steps_per_epoch, batch_text % (args.batch_size * world * args.accum_iter, margs.max_seq_len),
                 args.lr, args.min_lr, args.warmup_steps, world)] + ["data: " + line for line in lines]
    t0 = time.perf_counter()
    state = trainer.fit(resume_path, header=header, start_fields=dict(total_params=counts["total"],
                                                                      active_params=counts["active"]))
    speed = throughput(timed, timed_val, time.perf_counter() - t0)
    if main:
        summary = dict(params=counts, trainable_params=model.num_trainable_params(), steps=state.step,
                       best_step=state.best_step, best_val_loss=state.best_val if state.best_step >= 0 else None,
                       world_size=world, **speed)
        write_json_atomic(os.path.join(args.output_dir, "train_summary.json"), summary)
        print("model (%s weights) written to %s; %d tokens in %.1fs (%.0f tokens/s, steady state %s)"
              % ("best, step %d" % state.best_step if state.best_step >= 0 else "last", out_dir, speed["tokens"],
                 speed["seconds"], speed["tokens_per_s"], speed["steady_tokens_per_s"]), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ data wrappers
class TimedData:
    """Wraps a training data object (the data protocol): counts the real tokens this rank is served and when, so the
    front end can report steady-state tokens/s (the first `skip` micro-batches, which compile kernels, excluded)."""

    def __init__(self, data, skip=3):
        self.data, self.skip = data, skip
        self.tokens = self.steady_tokens = 0
        self.served = 0
        self.t_steady = None
        self.t_last = None

    def __len__(self):
        return len(self.data)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self, epoch, start=0):
        for i, batch in self.data.batches(epoch, start):
            now = time.perf_counter()
            n = int(batch["token_mask"].sum())
            self.served += 1
            self.tokens += n
            if self.served == self.skip + 1:
                self.t_steady = now
            elif self.served > self.skip + 1:
                self.steady_tokens += n
            self.t_last = now
            yield i, batch


class TimedEval:
    """Wraps validation data: when each validation ran, to leave it out of the training throughput."""

    def __init__(self, data):
        self.data, self.windows = data, []

    def __len__(self):
        return len(self.data)

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self):
        t0 = time.perf_counter()
        try:
            yield from self.data.batches()   # wall time between yields is the model's forward: validation too
        finally:
            self.windows.append((t0, time.perf_counter()))


def throughput(timed, timed_val, seconds):
    """Tokens/s summed over ranks: over the whole fit(), and in steady state (after the first micro-batches, which
    compile kernels, with the validations in between left out)."""
    from Utils import distributed as dist
    steady_s = 0.0
    if timed.t_steady is not None:
        steady_s = timed.t_last - timed.t_steady
        for a, b in (timed_val.windows if timed_val is not None else ()):
            steady_s -= max(0.0, min(b, timed.t_last) - max(a, timed.t_steady))
    tokens, steady = dist.all_reduce_sum([timed.tokens, timed.steady_tokens])
    steady_s = dist.all_reduce_sum([steady_s])[0] / dist.world_size()
    return {"tokens": int(tokens), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
            "steady_tokens_per_s": round(steady / steady_s, 2) if steady and steady_s > 0 else None}
