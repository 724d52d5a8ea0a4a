"""Fine-tune MoA / MoE-LoRA adapters on a frozen LLaMA-3 (the reference's `main_finetune.py`, SPEC §5).

    python Math.py --llama_path CKPT --data_path train.json --output_dir out [--dry_run true]
    mpirun --allow-run-as-root --oversubscribe -np 2 python Math.py ...      (data parallel)

Flags keep the reference's names and defaults (SPEC §5.1); booleans are strict (D3): `--flag` alone or
`--flag true|false` (Utils/cli.py). Writes to `output_dir`: `log.txt` (JSON lines), tensorboard scalars,
`checkpoint-last.pkl` / `checkpoint-best.pkl` (adapters + optimizer + data position, never the base; D11) and, at
the end, `adapter/` with the best adapters (adapter.pth/pkl + adapter_params.json).
"""
import json
import os
import sys

from Utils.cli import Parser, add_bool
from Utils.errors import UserError, cli_main

MODEL_FLAGS = ("routing", "w_bias", "lora_layers", "lora_rank", "lora_targets", "lora_alpha", "expert_num",
               "hydra_moe", "prompt_layers", "prompt_len", "p_adapter_layers", "p_adapter_size", "p_adapter_hydra",
               "swi_x", "max_threshold", "const_threshold", "threshold_grad", "top_k", "lb_loss_coeff",
               "noisy_router", "max_seq_len", "max_batch_size")
# Changing these between a checkpoint and its resumption would break "continues exactly".
RESUME_MUST_MATCH = ("batch_size", "accum_iter", "world_size", "data_seed", "seed", "max_seq_len", "data_path",
                     "val_data_path", "val_split", "epochs", "warmup_epochs", "lr", "min_lr", "weight_decay")
# SPEC §5.1: sparse_moe, instance and UniPEFT scripts default to 40 warm-up epochs.
LONG_WARMUP_ROUTINGS = ("topk_moe", "adamole", "instance_moa", "unipeft")


def build_parser():
    p = Parser(description="MoA fine-tuning (Jittor)")
    a = p.add_argument
    # data and run
    a("--llama_path", default="/path/to/llama", help="Meta (params.json) or HF checkpoint directory")
    a("--data_path", default="", help="training records (JSON array or JSONL)")
    a("--val_data_path", default="", help="validation records; if empty, --val_split of the training file")
    a("--val_split", type=float, default=0.0, help="fraction of the training records held out for validation")
    a("--output_dir", default="./output")
    a("--seed", type=int, default=0, help="adapter initialisation (same on every rank)")
    a("--data_seed", type=int, default=0, help="data order (D7)")
    a("--batch_size", type=int, default=64, help="per rank")
    a("--accum_iter", type=int, default=1)
    a("--epochs", type=int, default=400)
    a("--warmup_epochs", type=float, default=None, help="default 1 (40 for topk_moe, adamole, instance, unipeft)")
    a("--lr", type=float, default=None, help="absolute lr; default blr * eff_batch / 256")
    a("--blr", type=float, default=1e-3)
    a("--min_lr", type=float, default=0.0)
    a("--weight_decay", type=float, default=0.05)
    a("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = no cap)")
    a("--val_interval", type=int, default=0, help="validate every N optimizer steps (0 = at epoch ends)")
    a("--save_interval", type=int, default=100, help="checkpoint every N optimizer steps (and every epoch end)")
    a("--early_stop_patience", type=int, default=0, help="validations without improvement before stopping (0=off)")
    a("--log_interval", type=int, default=10, help="optimizer steps between log lines")
    a("--resume", default="", help="a checkpoint file/dir, or 'auto' = output_dir's checkpoint-last.pkl if any")
    add_bool(p, "dry_run", False, "print the resolved config and param count")
    add_bool(p, "progress", True, "tqdm progress bar on rank 0")
    # model / adapters (SPEC §5.1 names)
    a("--routing", default="soft_moa")
    a("--max_seq_len", type=int, default=512)
    a("--max_batch_size", type=int, default=32)
    add_bool(p, "w_bias", False)
    a("--lora_layers", default="0-0")
    a("--lora_rank", type=int, default=16)
    a("--lora_targets", default="Q,V")
    a("--lora_alpha", type=float, default=8)
    a("--expert_num", type=int, default=1)
    add_bool(p, "hydra_moe", False)
    a("--prompt_layers", default="0-0")
    a("--prompt_len", type=int, default=10)
    a("--p_adapter_layers", default="0-0")
    a("--p_adapter_size", type=int, default=16)
    add_bool(p, "p_adapter_hydra", False)
    a("--swi_x", type=int, default=0)
    a("--max_threshold", type=float, default=0.5)
    add_bool(p, "const_threshold", False)
    a("--threshold_grad", default="none", help="sparse_moa threshold gradient: none | ste | shifted (D1)")
    a("--top_k", type=int, default=1)
    a("--lb_loss_coeff", type=float, default=0.001)
    add_bool(p, "noisy_router", False)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "accum_iter", "epochs", "log_interval"):
        if getattr(args, name) < 1:
            raise UserError("--%s must be >= 1, got %d" % (name, getattr(args, name)))
    for name in ("max_steps", "val_interval", "save_interval", "early_stop_patience"):
        if getattr(args, name) < 0:
            raise UserError("--%s must be >= 0, got %d" % (name, getattr(args, name)))
    if not 0.0 <= args.val_split < 1.0:
        raise UserError("--val_split must be in [0, 1), got %g" % args.val_split)
    if args.warmup_epochs is None:
        args.warmup_epochs = 40.0 if args.routing in LONG_WARMUP_ROUTINGS else 1.0
    if args.warmup_epochs < 0:
        raise UserError("--warmup_epochs must be >= 0")
    return args


def resolve_lr(args, world):
    """SPEC §5.2 step 4: eff_batch = batch_size · accum_iter · world_size; lr = blr · eff_batch / 256 unless given."""
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


def check_resume_compatible(ckpt, args, margs, path):
    config = ckpt.get("config", {})
    for key in RESUME_MUST_MATCH:
        if key in config and config[key] != getattr(args, key):
            raise UserError("--resume: %s was made with --%s %r but this run has %r (exact resumption needs the "
                            "same value)" % (path, key, config[key], getattr(args, key)))
    saved = ckpt.get("adapter_params", {})
    for key, value in margs.adapter_params().items():
        if key in saved and saved[key] != value:
            raise UserError("--resume: %s has adapter setting %s=%r but this run has %r" % (path, key, saved[key],
                                                                                         value))


def write_adapter(model, out_dir):
    """`<output_dir>/adapter/` via the project's adapter writer (reference key names + adapter_params.json)."""
    from Models.adapter_io import save_adapter
    save_adapter(model, out_dir)


def run(args):
    """Build everything, then loop over epochs; returns 0 or raises UserError (non-finite loss included)."""
    from Utils import distributed as dist
    from Utils.runtime import import_jittor, seed_everything
    from Utils.train_checkpoint import LAST, OutputDirLock, resolve_resume
    jt = import_jittor()
    resolve_lr(args, dist.world_size())
    margs = model_args_from(args)
    main_proc = dist.is_main_process()
    lock, err = OutputDirLock(args.output_dir), None
    if main_proc:
        try:
            lock.acquire()
        except UserError as e:
            err = e
    if not dist.main_decides(err is None):
        if err is not None:
            raise err
        sys.exit(2)  # rank 0 reports the reason
    try:
        resume_path = resolve_resume(args.resume, args.output_dir)
        if resume_path is None and os.path.isfile(os.path.join(args.output_dir, LAST)):
            raise UserError("--output_dir %s already holds %s: pass --resume auto to continue it, or choose "
                            "another --output_dir" % (args.output_dir, LAST))
        return train(args, margs, resume_path, jt, dist, seed_everything)
    finally:
        lock.release()


def train(args, margs, resume_path, jt, dist, seed_everything):
    import numpy as np
    from Dataset import load_records
    from Dataset.finetune_dataset import EvalData, FinetuneData, split_records
    from Models.llama_adapter import LLaMA_adapter
    from Utils.metric_logger import TrainReporter
    from Utils.train_checkpoint import (BEST, LAST, capture_rng, load_train_checkpoint, restore_rng,
                                        save_train_checkpoint)
    from engine_finetune import AdamW, NonFiniteLoss, TrainState, evaluate, param_groups, train_one_epoch

    rank, world, main_proc = dist.rank(), dist.world_size(), dist.is_main_process()
    ckpt = load_train_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        check_resume_compatible(ckpt, args, margs, resume_path)

    # ---- data (D5: truncation is counted and reported; D7: order from data_seed)
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
    train_data = FinetuneData.from_records(records, model.tokenizer, margs.max_seq_len, args.batch_size,
                                           args.data_seed, rank, world)
    val_data = None
    if val_records:
        val_examples = FinetuneData.from_records(val_records, model.tokenizer, margs.max_seq_len, 1)
        val_data = EvalData(val_examples.examples, args.batch_size, rank, world, val_examples.n_truncated)
    steps_per_epoch = len(train_data) // args.accum_iter
    if steps_per_epoch == 0:
        raise UserError("--data_path: %d training examples give no optimizer step per epoch (global batch %d × "
                        "accum_iter %d)" % (len(train_data.examples), args.batch_size * world, args.accum_iter))
    optimizer = AdamW(param_groups(named, args.weight_decay), args.lr, betas=(0.9, 0.95), eps=1e-8)

    # ---- resume
    state, best_adapters = TrainState(), None
    if ckpt is not None:
        state = TrainState(**ckpt["state"])
        state.stopped = ""
        load_adapters(named, ckpt["adapters"], resume_path, jt, np)
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng(ckpt["rng"])
        if state.best_step >= 0:
            best_path = os.path.join(os.path.dirname(os.path.abspath(resume_path)), BEST)
            best = load_train_checkpoint(best_path)
            if best["state"]["step"] != state.best_step:
                raise UserError("--resume: %s is from step %d, expected the best step %d"
                                % (best_path, best["state"]["step"], state.best_step))
            best_adapters = best["adapters"]

    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    rep = TrainReporter(args.output_dir, main_proc, total_steps, start_step=state.step,
                        keep_lines=ckpt["log_lines"] if ckpt is not None else None, progress=args.progress)
    config = dict(vars(args), model=margs.to_dict())
    if main_proc:
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1, default=list)
    rep.print("config: %s" % json.dumps(config, default=list))
    rep.print("trainable params: %d | world size %d | eff batch %d | lr %.3g | %d optimizer steps per epoch"
              % (model.num_trainable_params(), world, args.eff_batch_size, args.lr, steps_per_epoch))
    rep.print("data: %d train examples (%d truncated to max_seq_len %d), %d validation examples (%d truncated)"
              % (len(train_data.examples), train_data.n_truncated, margs.max_seq_len,
                 len(val_data) if val_data else 0, val_data.n_truncated if val_data else 0))
    rep.log("event", event="resume" if ckpt is not None else "start", step=state.step,
            n_train=len(train_data.examples), n_truncated=train_data.n_truncated,
            n_val=len(val_data) if val_data else 0, n_val_truncated=val_data.n_truncated if val_data else 0,
            world_size=world, lr=args.lr)

    def adapters_numpy():
        return {n: p.numpy().astype(np.float32) for n, p in named}   # on every rank (a Jittor sync)

    def save(name, adapters=None):
        payload = {"adapters": adapters if adapters is not None else adapters_numpy(),
                   "optimizer": optimizer.state_dict(), "state": state.to_dict(), "rng": capture_rng(),
                   "config": config, "adapter_params": margs.adapter_params(), "log_lines": rep.lines}
        if main_proc:
            save_train_checkpoint(os.path.join(args.output_dir, name), payload)

    def validate():
        nonlocal best_adapters
        val = evaluate(model, val_data)
        state.last_val_step = state.step
        if val < state.best_val:
            state.best_val, state.best_step, state.bad_vals = val, state.step, 0
            best_adapters = adapters_numpy()
            save(BEST, best_adapters)
        else:
            state.bad_vals += 1
        rep.log("val", step=state.step, val_loss=val, best_val_loss=state.best_val, best_step=state.best_step)
        rep.scalar("val_loss", val, state.step)
        rep.print("step %d: val_loss %.4f (best %.4f at step %d)" % (state.step, val, state.best_val,
                                                                      state.best_step))
        if args.early_stop_patience and state.bad_vals >= args.early_stop_patience:
            state.stopped = "early stop at step %d: val_loss did not improve for %d validations" % (
                state.step, state.bad_vals)
            return True
        return False

    def on_step(state_, rec):
        rep.advance(loss="%.4f" % rec["loss"], lr="%.2e" % rec["lr"])
        rep.scalar("c_train_loss", rec["loss"], state.step)
        rep.scalar("lr", rec["lr"], state.step)
        if state.step % args.log_interval == 0:
            rep.log("train", step=state.step, epoch=round(rec["epoch"], 6), loss=rec["loss"],
                    ce_loss=rec["ce_loss"], lr=rec["lr"])
        stop = False
        if val_data is not None and args.val_interval and state.step % args.val_interval == 0:
            stop = validate()
        if args.max_steps and state.step >= args.max_steps:
            state.stopped = state.stopped or "reached --max_steps %d" % args.max_steps
            stop = True
        if not stop and args.save_interval and state.step % args.save_interval == 0:
            save(LAST)
        return stop

    # ---- the loop
    finished = bool(args.max_steps and state.step >= args.max_steps) or \
        bool(args.early_stop_patience and state.bad_vals >= args.early_stop_patience)
    try:
        for epoch in range(state.epoch, args.epochs):
            if finished:
                break
            finished = train_one_epoch(model, train_data, optimizer, epoch, state, args, on_step, rep.print)
            if finished:
                break
            rep.log("epoch", epoch=epoch, step=state.step,
                    train_loss=state.epoch_loss_sum / max(state.epoch_loss_count, 1))
            state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
            if val_data is not None and not args.val_interval:
                finished = validate()
            save(LAST)
    except NonFiniteLoss as e:
        rep.log("event", event="non_finite_loss", step=e.step)
        rep.close()
        raise UserError(str(e))
    if val_data is not None and state.last_val_step != state.step and not state.stopped.startswith("early"):
        validate()
    save(LAST)
    if state.stopped:
        rep.print(state.stopped)

    # ---- final adapters: the best validated ones, else the last
    if best_adapters is not None:
        load_adapters(named, best_adapters, "best adapters", jt, np)
    jt.sync_all()
    out_dir = os.path.join(args.output_dir, "adapter")
    if main_proc:
        write_adapter(model, out_dir)
    rep.log("event", event="done", step=state.step, best_step=state.best_step,
            best_val_loss=state.best_val if state.best_step >= 0 else None, stopped=state.stopped)
    rep.print("adapters (%s) written to %s" % ("best, step %d" % state.best_step if best_adapters is not None
                                               else "last", out_dir))
    rep.close()
    dist.barrier()
    return 0


def load_adapters(named, arrays, source, jt, np):
    from Models.adapter_io import current_names
    arrays = current_names(arrays)  # checkpoints from before the Top-K / AdaMoLE modules moved up to lora_X
    names = {n for n, _ in named}
    extra, missing = sorted(set(arrays) - names), sorted(names - set(arrays))
    if extra or missing:
        raise UserError("%s: adapter names do not match the model (%s %s)" % (
            source, "unexpected" if extra else "missing", (extra or missing)[0]))
    for n, p in named:
        if tuple(arrays[n].shape) != tuple(p.shape):
            raise UserError("%s: %s has shape %s, the model has %s" % (source, n, arrays[n].shape, tuple(p.shape)))
        p.update(jt.array(arrays[n].astype(np.float32)))
    jt.sync([p for _, p in named])


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
