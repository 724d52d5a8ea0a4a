"""MoEfication of a dense LLaMA-family model (seed 004): split each FFN's neurons into experts, learn routers from the
model's own activations, convert, and evaluate the sparse model — one tool, stage by stage or all at once.

    python moefy.py split    --model DIR --work_dir W --num_experts 16 [--method random|contiguous|kmeans|graph]
    python moefy.py features --model DIR --work_dir W --data corpus.jsonl [--max_tokens 200000]   (mpirun: by rank)
    python moefy.py gate     --model DIR --work_dir W --num_selects 4 [--criterion l2_norm] [--loss bce_topk]
    python moefy.py convert  --model DIR --work_dir W [--weighting none|softmax] [--score_scale S]
    python moefy.py evaluate --model DIR --work_dir W --data validation.jsonl [--math_sets gsm8k,AddSub]
    python moefy.py all      (every flag above: the five stages in order)
    python moefy.py demo     (the README's demo: tiny SwiGLU and ReLU models trained on real text, MoEfied)

The stages hand files to each other inside --work_dir (Models/moefication/stages.py); a missing or mismatched
stage output is a one-line error naming the file. The graph split needs activations: with --method graph, `all`
collects features before splitting (features do not depend on the split).
"""
import os
import sys

from engine.flags import add_generation_flags, check_generation_flags
from Utils.cli import Parser, add_bool
from Utils.distributed import launcher_rank
from Utils.errors import UserError, cli_main

STAGE_ORDER = ("split", "features", "gate", "convert", "evaluate")


def _add_common(p):
    p.add_argument("--model", required=True, help="dense checkpoint: Meta/ours (params.json) or HF (config.json)")
    p.add_argument("--work_dir", required=True, help="where the stages keep their files")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/dir (default: the checkpoint's own)")
    p.add_argument("--seed", type=int, default=0)
    add_bool(p, "progress", True, "progress bars (rank 0)")


def _add_split(p):
    p.add_argument("--num_experts", type=int, default=16, help="E: groups per layer (must divide d_ff)")
    p.add_argument("--method", default="random", choices=("random", "contiguous", "kmeans", "graph"))
    p.add_argument("--template", default="gate", choices=("gate", "up"), help="rows the k-means / centroids use")
    p.add_argument("--metric", default="l2", choices=("l2", "cos"), help="k-means metric")
    p.add_argument("--layers", default="all", help="'all' or a comma list of layer ids to convert")
    p.add_argument("--graph_kernel", default="positive", choices=("plain", "positive", "l1", "l2"))
    p.add_argument("--graph_tokens", type=int, default=200000, help="tokens of activations for the graph")


def _add_data(p, what):
    p.add_argument("--data", required=True, help="%s: jsonl of {\"text\": ...} or a .txt of paragraphs" % what)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mode", default="packed", choices=("packed", "padded"), help="rows: packed blocks or documents")


def _add_features(p, standalone=True):
    if standalone:
        p.add_argument("--layers", default="all", help="'all' or a comma list of layer ids")
        p.add_argument("--template", default="gate", choices=("gate", "up"),
                       help="with --activation auto and no split yet: the template the split will use")
    p.add_argument("--max_tokens", type=int, default=200000, help="feature budget (all ranks together)")
    p.add_argument("--activation", default="auto", choices=("auto", "gate", "product"),
                   help="stored activation: act(W1 x) or act(W1 x)*(W3 x); auto = as the seed, from the template")
    p.add_argument("--shard_rows", type=int, default=4096)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    add_bool(p, "overwrite", False, "discard features of an earlier run in this work_dir")


def _add_gate(p):
    p.add_argument("--num_selects", type=int, default=4, help="k: experts per token the routers learn to pick")
    p.add_argument("--criterion", default="l2_norm", choices=("plain", "positive", "l1_norm", "l2_norm"))
    p.add_argument("--l2_threshold", type=float, default=None, help="the seed's 1e-3: h^2 below it counts 0")
    p.add_argument("--loss", default="bce_topk", choices=("bce_topk", "bce_soft", "bce_raw", "bce_softmax", "kl"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--gate_batch_size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--gate_tokens", type=int, default=None, help="use at most this many feature rows per layer")


def _add_convert(p, with_k=True):
    if with_k:
        p.add_argument("--num_selects", type=int, default=None, help="top-k of the converted model (default: the "
                       "gates' k)")
    p.add_argument("--out_dir", default=None, help="converted checkpoint (default <work_dir>/converted)")
    p.add_argument("--weighting", default="none", choices=("none", "softmax"))
    p.add_argument("--score_scale", type=float, default=None, help="default 1 (none) or E/k (softmax)")
    add_bool(p, "use_gate", True, "routers from the gate stage (false: their centroid initialisation)")


def _add_evaluate(p, with_data=True):
    if with_data:
        _add_data(p, "held-out text")
    p.add_argument("--converted", default=None, help="converted checkpoint (default <work_dir>/converted)")
    p.add_argument("--fractions", default="0.125,0.25,0.5,1", help="k/E values")
    p.add_argument("--methods", default="ground_truth,router,similarity,random")
    p.add_argument("--max_eval_rows", type=int, default=0, help="evaluate at most this many rows (0 = all)")
    p.add_argument("--math_sets", default="", help="also accuracy on these test sets (instruction models): a comma "
                   "list of sets shipped in data/ (gsm8k, AddSub, ..., boolq, ...; 'math' = the six math sets) or "
                   "paths as inference.py --data_path takes them")
    p.add_argument("--math_examples", type=int, default=50, help="with --math_sets: the first N records of every set")
    add_generation_flags(p, temperature=0.0)   # inference.py's flags and defaults, but greedy


def build_parser():
    p = Parser(prog="moefy.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name, adders in (("split", [_add_split]), ("features", [lambda q: _add_data(q, "text to run"), _add_features]),
                         ("gate", [_add_gate]), ("convert", [_add_convert]), ("evaluate", [_add_evaluate])):
        q = sub.add_parser(name)
        _add_common(q)
        for add in adders:
            add(q)
    q = sub.add_parser("all")
    _add_common(q)
    for add in (_add_split, lambda q: _add_data(q, "text for the features"), lambda q: _add_features(q, False),
                _add_gate,
                lambda q: _add_convert(q, with_k=False), lambda q: _add_evaluate(q, with_data=False)):
        add(q)
    q.add_argument("--eval_data", required=True, help="held-out text for evaluate")
    d = sub.add_parser("demo")
    d.add_argument("rest", nargs="*", help="flags of moefy_demo.py (see its --help)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        import moefy_demo
        return moefy_demo.main(argv[1:])
    return _main(argv)


def eval_data(path, tokenizer, seq_len, batch_size, mode, rank, world, cache_dir, progress):
    """This rank's rows of a text file, nothing dropped (Dataset.pretrain_data)."""
    from Dataset.pretrain_data import pretrain_eval_data
    return pretrain_eval_data(path, tokenizer, seq_len, batch_size, mode, rank=rank, world_size=world,
                              cache_dir=cache_dir, progress=progress)


def make_optimizer(named, lr, weight_decay=0.0):
    """The engine's AdamW for the routers (Adam when weight_decay is 0, as the seed)."""
    from engine.optim import AdamW, param_groups
    return AdamW(param_groups(named, weight_decay), lr, betas=(0.9, 0.999), eps=1e-8)


def math_eval(o):
    """None without --math_sets; else what the evaluate stage calls for accuracy (Dataset/test_runner.py's
    AccuracyEval: `evaluate(model, out_dir)` → {set: accuracy, ..., "mean"}, with inference.py's generation, answer
    extraction and scorer, each set's predictions in <out_dir>/<set>.jsonl). Bad flags or sets fail here, before any
    stage runs."""
    if o.math_examples < 1:
        raise UserError("--math_examples must be >= 1 (the first N records of every set), got %d" % o.math_examples)
    check_generation_flags(o)
    if not o.math_sets:
        return None
    if o.prompt_template == "completion":
        raise UserError("--prompt_template completion is for code sets only; --math_sets needs alpaca or chat")
    import argparse
    from Dataset.test_runner import AccuracyEval, resolve_named_sets
    sets = resolve_named_sets(o.math_sets, "--math_sets")
    a = argparse.Namespace(**dict(vars(o), max_examples=o.math_examples, dump_type_weight=False,
                                  dump_token_weight=0, time_gen=False))
    try:
        return AccuracyEval(a, sets, progress=o.progress)
    except UserError as e:
        raise UserError("--math_sets: %s" % e)


@cli_main
def _main(argv):
    opts = build_parser().parse_args(argv)
    try:
        evaluate_math = math_eval(opts) if opts.stage in ("evaluate", "all") else None
    except UserError:
        if launcher_rank() != 0:
            sys.exit(2)        # every rank read the same flags; rank 0 prints the line once
        raise
    from Models.moefication import pipeline
    ctx = pipeline.Context(eval_data, make_optimizer, evaluate_math)
    if opts.stage == "all":
        pipeline.run_all(opts, ctx)
    else:
        getattr(pipeline, "run_" + opts.stage)(opts, ctx)


if __name__ == "__main__":
    main()
