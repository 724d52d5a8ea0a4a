"""The five stages of `moefy.py` over one work directory, given the flags and two factories from the entry point:
`data(path, tokenizer, seq_len, batch_size, mode, rank, world, cache_dir, progress)` → an object whose `batches()`
yields (batch, n_targets) for this rank (Dataset.pretrain_data), and `make_optimizer(named, lr)` (engine.optim's
AdamW) — Models/ imports neither Dataset/ nor engine/. With --math_sets a third object, `math_eval`, adds
accuracy to the evaluate stage: `math_eval.evaluate(model, out_dir)` → {set: accuracy, ..., "mean": …} on every
rank (writing each set's predictions to <out_dir>/<set>.jsonl) and `math_eval.describe()` → what was run
(Dataset/test_runner.py:AccuracyEval: inference.py's generation, answer extraction and scorer).

Every rank runs every stage; the work is shared where it is large (features by rows, split and gate by layers,
evaluation by rows) and only rank 0 writes files (features: each rank its own stores).
"""
import json
import os
import time

from Models.moefication import stages
from Utils import distributed as dist
from Utils.errors import UserError


class Context:
    def __init__(self, data, make_optimizer, math_eval=None):
        self.data, self.make_optimizer, self.math_eval = data, make_optimizer, math_eval
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0

    def log(self, *args):
        if self.main:
            print(*args, flush=True)


def _read_state(model_dir):
    from Models.checkpoints import read_checkpoint
    return read_checkpoint(model_dir)


def _load_model(path, tokenizer):
    from Models.llama_adapter import LLaMA_adapter
    return LLaMA_adapter.from_pretrained(path, tokenizer_path=tokenizer, trainable="none")


def _limit(batches, max_rows):
    rows = 0
    for batch, n in batches:
        if max_rows and rows >= max_rows:
            return
        yield batch, n
        rows += len(batch["tokens"])


def _coactivation_source(o, ctx):
    from Models.moefication.coactivation import CoactivationAccumulator
    from Models.moefication.collect import iter_layer_activations, load_feature_meta
    meta = load_feature_meta(o.work_dir)

    def build(layer):
        if layer not in meta["layers"]:
            raise UserError("%s: no features of layer %d for the graph split"
                            % (stages.stage_json(o.work_dir, "features"), layer))
        acc = CoactivationAccumulator(meta["model"]["d_ff"], o.graph_kernel, max_tokens=o.graph_tokens)
        for h in iter_layer_activations(o.work_dir, layer, meta):
            acc.update(h)
            if acc.full:
                break
        return acc
    return build


def run_split(o, ctx):
    args, state = _read_state(o.model)
    if o.method == "graph":  # the features must come from this model
        from Models.moefication.collect import load_feature_meta
        load_feature_meta(o.work_dir, args, stages.state_fingerprints(state, stages.resolve_layers(o.layers,
                                                                                                 args.n_layers)))
    co = _coactivation_source(o, ctx) if o.method == "graph" else None
    t0 = time.time()
    stages.split_model(args, state, o.work_dir, o.num_experts, o.method, o.template, o.metric, o.seed, o.layers,
                       coactivation=co, rank=ctx.rank, world=ctx.world, gather=dist.gather_objects, log=ctx.log)
    dist.barrier()
    ctx.log("split: %s (%.1fs)" % (stages.stage_json(o.work_dir, "split"), time.time() - t0))


def _activation(o):
    if o.activation != "auto":
        return o.activation
    template = o.template
    path = stages.stage_json(o.work_dir, "split")
    if os.path.isfile(path):
        template = stages.read_json(path, "split").get("template", template)
    return "gate" if template == "gate" else "product"


def run_features(o, ctx):
    from Models.moefication.collect import collect_features
    model = _load_model(o.model, o.tokenizer)
    layers = stages.resolve_layers(o.layers, model.args.n_layers)
    data = ctx.data(o.data, model.tokenizer, o.seq_len, o.batch_size, o.mode, ctx.rank, ctx.world,
                    os.path.join(o.work_dir, "token_cache"), o.progress and ctx.main)
    source = {"data": os.path.abspath(o.data), "seq_len": o.seq_len, "batch_size": o.batch_size, "mode": o.mode}
    t0 = time.time()
    rows = collect_features(model, (b for b, _ in data.batches()), o.work_dir, layers, _activation(o),
                            o.max_tokens, o.shard_rows, o.dtype, source, ctx.rank, ctx.world, o.overwrite,
                            o.progress, total=getattr(data, "n_batches", lambda: None)(), barrier=dist.barrier,
                            gather=dist.gather_objects)
    ctx.log("features: layers %s, %s rows on rank 0 -> %s (%.1fs)" % (
        layers, rows[layers[0]], stages.stage_dir(o.work_dir, "features"), time.time() - t0))


def run_gate(o, ctx):
    from Models.moefication.gate import run_gate as train_all
    args, state = _read_state(o.model)
    t0 = time.time()
    train_all(args, state, o.work_dir, o.num_selects, lambda named, lr: ctx.make_optimizer(named, lr, o.weight_decay),
              o.criterion, o.loss, o.l2_threshold, o.epochs, o.gate_batch_size, o.lr, o.val_fraction, o.gate_tokens,
              o.seed, ctx.rank, ctx.world, dist.gather_objects, ctx.log, progress=o.progress and ctx.main)
    dist.barrier()
    ctx.log("gate: %s (%.1fs)" % (stages.stage_json(o.work_dir, "gate"), time.time() - t0))


def run_convert(o, ctx):
    from Models.moefication.convert import convert
    args, state = _read_state(o.model)
    out = o.out_dir or stages.stage_dir(o.work_dir, "converted")
    if ctx.main:  # num_selects None: the k the gates were trained for
        convert(args, state, o.work_dir, out, o.model, o.num_selects, o.weighting, o.score_scale, o.use_gate,
                log=ctx.log)
    dist.barrier()
    if not os.path.isfile(os.path.join(out, "params.json")):   # every rank stops on the same line
        raise UserError("%s: the converted checkpoint was not written" % out)


def _accuracy_line(acc):
    return ", ".join("%s %.3f" % kv for kv in acc.items())


def run_evaluate(o, ctx):
    from Models.moefication.convert import read_info
    from Models.moefication.evaluate import accuracy_table, mean_loss, summary_table, sweep
    converted = o.converted or stages.stage_dir(o.work_dir, "converted")
    info = read_info(converted)
    fractions = _floats(o.fractions, "--fractions")
    methods = [m.strip() for m in o.methods.split(",") if m.strip()]
    math_eval = ctx.math_eval
    predictions = os.path.join(stages.stage_dir(o.work_dir, "eval"), "predictions")
    if math_eval and ctx.main and os.path.isdir(predictions):
        import shutil
        shutil.rmtree(predictions)                   # no file of an earlier run stays beside this run's
    dense = _load_model(o.model, o.tokenizer)
    cache = os.path.join(o.work_dir, "token_cache")
    data = ctx.data(o.data, dense.tokenizer, o.seq_len, o.batch_size, o.mode, ctx.rank, ctx.world, cache,
                    o.progress and ctx.main)

    def batches():
        return _limit(data.batches(), o.max_eval_rows // max(ctx.world, 1) if o.max_eval_rows else 0)
    t0 = time.time()
    dense_loss, tokens = mean_loss(dense, batches(), dist.all_reduce_sum)
    ctx.log("evaluate: dense model: loss %.4f (%d tokens)" % (dense_loss, tokens))
    dense_result = {"loss": dense_loss, "ppl": _exp(dense_loss), "tokens": tokens}
    per_run = None
    if math_eval:
        dense_result["math"] = math_eval.evaluate(dense, os.path.join(predictions, "dense"))
        ctx.log("evaluate: dense model: accuracy %s" % _accuracy_line(dense_result["math"]))

        def per_run(method, k):   # inside the sweep's selection: the converted model routes with `method`, top-k
            return {"math": math_eval.evaluate(moe, os.path.join(predictions, "%s_k%d" % (method, k)))}
    del dense
    moe = _load_model(converted, o.tokenizer)
    rows = sweep(moe, batches, info, dense_loss, methods, fractions, dist.all_reduce_sum, o.seed, ctx.log,
                 progress=o.progress and ctx.main, per_run=per_run)
    result = {"dense": dense_result, "rows": rows,
              "retained": summary_table(rows), "converted": os.path.abspath(converted),
              "gate": (info.get("gate") or {}).get("metrics"), "activations": _activation_stats(o.work_dir),
              "seconds": time.time() - t0}
    if math_eval:
        result["accuracy"] = accuracy_table(rows)
        result["math"] = dict(math_eval.describe(), predictions=os.path.abspath(predictions))
    if ctx.main:
        out = stages.stage_dir(o.work_dir, "eval")
        stages.write_json(os.path.join(out, "results.json"), result)
        from Utils.moefy_plot import plot_moefication
        plot_moefication({os.path.basename(os.path.abspath(o.model)): result}, os.path.join(out, "moefication.png"))
        ctx.log("evaluate: %s, %s" % (os.path.join(out, "results.json"), os.path.join(out, "moefication.png")))
    dist.barrier()
    return result


def _activation_stats(work_dir, rows=4096):
    """{layer: activation_stats} from the first feature rows, when this work_dir holds features."""
    from Models.moefication.collect import load_feature_meta, load_features
    from Models.moefication.evaluate import activation_stats
    if not os.path.isfile(stages.stage_json(work_dir, "features")):
        return None
    meta = load_feature_meta(work_dir)
    return {"activation": meta["activation"],
            "layers": {str(i): activation_stats(load_features(work_dir, i, rows, meta)[1]) for i in meta["layers"]}}


def run_all(o, ctx):
    """split → features → gate → convert → evaluate (features first for the graph split)."""
    import argparse
    order = ["features", "split"] if o.method == "graph" else ["split", "features"]
    for stage in order + ["gate"]:
        globals()["run_" + stage](o, ctx)
    run_convert(argparse.Namespace(**dict(vars(o), num_selects=None)), ctx)   # the gates' own k
    return run_evaluate(argparse.Namespace(**dict(vars(o), data=o.eval_data)), ctx)


def _floats(text, what):
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError("%s: %r is not a comma list of numbers" % (what, text))


def _exp(v):
    import math
    return math.exp(min(v, 50.0))


def load_results(work_dir):
    path = os.path.join(stages.stage_dir(work_dir, "eval"), "results.json")
    with open(path) as f:
        return json.load(f)
