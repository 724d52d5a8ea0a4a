"""Shared pieces of the Jittor benchmarks in bench/: flags, a random-weight model, FLOP and byte counts, machine
probes (matmul peak, copy bandwidth, peak RSS), a JIT-compile counter, the training step, and the PyTorch peer.

Output convention (every script): one JSON object per measurement per line on stdout, everything else on stderr
(`setup_output()` moves fd 1 to stderr so Jittor's or a library's prints cannot corrupt the JSON stream).
Sizes in MB are 2**20 bytes, GB/s and GFLOP/s are 10**9, times are seconds of time.perf_counter().

Model FLOPs (the "flops_formula" field; d = dim, L = n_layers, d_kv = n_kv_heads·head_dim, F = ffn_hidden_dim,
V = vocab_size, T = seq_len, B = batch):
  N_base    = L·(2d² + 2d·d_kv + 3d·F)            weights of the frozen block matmuls (embedding lookup: 0 FLOPs)
  N_head    = V·d                                  the output projection
  N_adapter = Σ numel of the trainable 2-D weights except the prompt tables (LoRA A/B, type routers, Γ, MoLoRA
              routers, parallel adapters): each is applied once per token
  A_tok     = 4·T·d·L + 4·R·d·L_prompt             attention FLOPs per token and forward: QKᵀ and PV over
              the full T×T matrix (Models/llama.py computes it whole, masked positions included), plus the prompt
              attention over R = expert_num·prompt_len prompt slots in the L_prompt prompt layers
  P_kv      = 4·R·d·d_kv·L_prompt                  per forward (not per token): prompt rows through frozen wk, wv
  train  FLOPs/token = 4·N_base + 6·N_adapter + 3·A_tok + 4·N_head·(T−1)/T + 2·P_kv/(B·T)
         forward 2N for every matmul; backward 2N for the input gradients of every matmul (frozen ones
         included: the gradient must flow through them to reach earlier adapters; an upper bound, as layer 0's
         q/k/v input gradient is not needed) + 2N for weight gradients of the trainable weights only; attention
         backward = 2× its forward; the head only on the T−1 supervised positions of each sequence (labels =
         tokens, shifted). sparse_moa runs adapters on routed tokens only: N_adapter is then an upper bound.
  prefill FLOPs/token (prompt length P, logits of the last position only, as generate() does)
         = 2·N_base + 2·N_adapter + 4·P·d·L + 4·R·d·L_prompt + (2·N_head + P_kv/B)/P
  decode FLOPs/token at cache length S = 2·N_base + 2·N_adapter + 2·N_head + 4·S·d·L + 4·R·d·L_prompt + P_kv/B
Decode memory-bandwidth bound: a decode step reads every parameter once (fp32 here) except the embedding table,
of which it reads B rows: bytes = Σ param bytes − embedding bytes + B·d·4; bound tokens/s = B·bw / bytes, with bw
the best measured copy bandwidth (read + write bytes counted). The KV-cache reads (2·L·B·S·d_kv·4 bytes) are
reported beside it.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from engine.flags import add_adapter_flags  # noqa: E402  (argparse only: no Jittor at import time)
from Utils import cli  # noqa: E402
from Models.model_args import ROUTINGS, THRESHOLD_GRADS, ModelArgs, format_layers  # noqa: E402
from Utils.errors import UserError  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(BENCH_DIR, "peer_torch.py")

# The standard benchmark shape (a small LLaMA-3 with the real 128k vocabulary).
STANDARD_SHAPE = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=256,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
SHAPE_TYPES = dict(dim=int, n_layers=int, n_heads=int, n_kv_heads=int, vocab_size=int, multiple_of=int,
                   ffn_dim_multiplier=float, norm_eps=float, rope_theta=float)
SHAPE_HELP = dict(dim="model width", n_layers="transformer blocks", n_heads="attention heads",
                  n_kv_heads="key/value heads (GQA)", vocab_size="vocabulary size",
                  multiple_of="FFN hidden size is rounded up to a multiple of this",
                  ffn_dim_multiplier="FFN hidden-size multiplier", norm_eps="RMSNorm epsilon", rope_theta="RoPE base")

ALL = "all"  # layer-flag shorthand for every layer ("0-<n_layers>")
QKVOD = "Q,K,V,O,FFN_DOWN"
PRESETS = {
    "lora": dict(routing="soft_moe", lora_layers=ALL, lora_targets=QKVOD, lora_rank=8),
    "moa": dict(routing="soft_moa", lora_layers=ALL, lora_targets=QKVOD, lora_rank=8, prompt_layers=ALL,
                prompt_len=10, p_adapter_layers=ALL, p_adapter_size=16, swi_x=4),
}
PRESETS["sparse_moa"] = dict(PRESETS["moa"], routing="sparse_moa")   # the moa adapters, learned threshold Γ
LAYER_FLAGS = ("lora_layers", "prompt_layers", "p_adapter_layers")
ADAPTER_HELP = {
    "routing": "adapter variant: %s" % " | ".join(ROUTINGS),
    "lora_layers": "LoRA layers as half-open ranges ('0-8,24-32'), '0-0' = none, 'all' = every layer",
    "lora_targets": "comma list of Q,K,V,O,FFN_UP,FFN_GATE,FFN_DOWN",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha (update scaled by alpha/r)",
    "expert_num": "experts per LoRA / prompt / parallel adapter (MoLoRA, HydraLoRA, Top-K, AdaMoLE)",
    "hydra_moe": "HydraLoRA: one shared A, expert_num B matrices (true/false)",
    "prompt_layers": "prompt-tuning layers (same syntax as --lora_layers)",
    "prompt_len": "prompt slots per layer",
    "p_adapter_layers": "parallel-adapter layers (same syntax as --lora_layers)",
    "p_adapter_size": "parallel-adapter bottleneck width",
    "p_adapter_hydra": "parallel adapter with a shared down projection (true/false)",
    "swi_x": "type router: 0 = Linear, s > 0 = SwiGLU with hidden s·n_types",
    "max_threshold": "sparse_moa: Γ_max of the threshold Γ = Γ_max·σ(Wx+b)",
    "const_threshold": "sparse_moa: constant Γ = Γ_max (true/false)",
    "threshold_grad": "sparse_moa threshold gradient: %s" % " | ".join(THRESHOLD_GRADS),
    "top_k": "topk_moe: experts per token",
    "lb_loss_coeff": "topk_moe / adamole: load-balance loss coefficient",
    "noisy_router": "topk_moe / adamole: noisy router (true/false)",
}
ADAPTER_FLAGS = tuple(ADAPTER_HELP)
MB = 2.0 ** 20


# ------------------------------------------------------------------------------------------------ output
_json_out = None


def setup_output():
    """From here on stdout carries only emit()'s JSON lines; anything else written to fd 1 goes to stderr."""
    global _json_out
    if _json_out is None:
        sys.stdout.flush()
        _json_out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr


def emit(record):
    out = _json_out if _json_out is not None else sys.stdout
    out.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
    out.flush()


def _json_default(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError("not JSON serialisable: %r" % (o,))


def log(*parts):
    print("[bench]", *parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ flags
class Parser(cli.Parser):  # parse errors → UserError → one line, exit 2 (via cli_main)
    def __init__(self, description, **kw):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def bounded(kind, name, minimum=1, strict=False):
    """argparse type: a `kind` value >= minimum (> minimum when strict); anything else is a one-line UserError."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise UserError("--%s: %r is not %s" % (name, s, "an integer" if kind is int else "a number"))
        if not (v > minimum if strict else v >= minimum):
            raise UserError("--%s must be %s %s, got %s" % (name, ">" if strict else ">=", minimum, s))
        return v
    return parse


def add_model_flags(p, renames=None):
    """Shape flags (default: the standard shape), adapter flags named as Math.py's, --preset, --seed.

    `renames` {adapter flag: new name} resolves a clash with a workload flag (generate.py's --prompt_len)."""
    renames = dict(renames or {})
    p.set_defaults(_adapter_dests={k: renames.get(k, k) for k in ADAPTER_FLAGS})
    g = p.add_argument_group("model shape (default: the standard benchmark shape; explicit flags override "
                             "--params_json)")
    g.add_argument("--params_json", help="a Meta params.json to take the shape from (unknown keys are an error)")
    for name, kind in SHAPE_TYPES.items():
        check = bounded(int, name, 1) if kind is int else bounded(float, name, 0, strict=True)
        g.add_argument("--" + name, type=check, default=None,
                       help="%s (standard: %s)" % (SHAPE_HELP[name], STANDARD_SHAPE[name]))
    g.add_argument("--max_seq_len", type=bounded(int, "max_seq_len"), default=None,
                   help="ModelArgs.max_seq_len (RoPE table, KV-cache length); default: the workload's length")
    g = p.add_argument_group("adapters (Math.py's flags and types; value: explicit flag, else --preset, else "
                             "Math.py's default)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="lora: %s; moa: %s ('all' = every layer); sparse_moa: moa's with routing=sparse_moa"
                   % (_preset_text("lora"), _preset_text("moa")))
    math_actions = {a.dest: a for a in _adapter_parser()._actions}
    for name in ADAPTER_FLAGS:
        a = math_actions[name]
        kind = str if name in LAYER_FLAGS else a.type  # layer flags also accept 'all'
        if cli.is_bool_action(a):
            cli.add_bool(g, name, None, "%s (Math.py default: %s)" % (ADAPTER_HELP[name], a.default))
        elif name in renames:
            g.add_argument("--" + renames[name], dest=renames[name], type=kind, default=None,
                           help="%s; Math.py's --%s (default: %s)" % (ADAPTER_HELP[name], name, a.default))
        else:
            g.add_argument(*a.option_strings, dest=name, type=kind, default=None,
                           help="%s (Math.py default: %s)" % (ADAPTER_HELP[name], a.default))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and random tokens (default 0)")
    return p


def _adapter_parser():
    """The adapter flags exactly as Math.py declares them (engine/flags.py), for their types and defaults."""
    p = cli.Parser()
    add_adapter_flags(p)
    return p


def _preset_text(name):
    return ", ".join("%s=%s" % kv for kv in PRESETS[name].items())


def adapter_values(ns):
    """{adapter flag: value}: explicit flag, else the preset's value, else Math.py's default; 'all' expanded later."""
    defaults = {a.dest: a.default for a in _adapter_parser()._actions}
    preset = PRESETS.get(getattr(ns, "preset", None) or "", {})
    dests = getattr(ns, "_adapter_dests", {})
    out = {}
    for name in ADAPTER_FLAGS:
        v = getattr(ns, dests.get(name, name), None)
        out[name] = v if v is not None else preset.get(name, defaults[name])
    return out


def model_args(ns, max_seq_len, **force):
    """ModelArgs from the parsed flags (no Jittor needed). `force` overrides adapter values (e.g. routing)."""
    shape_over = {k: getattr(ns, k) for k in SHAPE_TYPES if getattr(ns, k, None) is not None}
    adapters = adapter_values(ns)
    adapters.update(force)
    if getattr(ns, "params_json", None):
        n_layers = shape_over.get("n_layers")
        if n_layers is None:
            try:
                with open(ns.params_json) as f:
                    n_layers = int(json.load(f).get("n_layers", 32))
            except (OSError, ValueError, AttributeError, TypeError) as e:
                raise UserError("--params_json: cannot read %s (%s)" % (ns.params_json, e))
    else:
        n_layers = shape_over.get("n_layers", STANDARD_SHAPE["n_layers"])
    for k in LAYER_FLAGS:
        if str(adapters[k]).strip().lower() == ALL:
            adapters[k] = "0-%d" % n_layers
    over = dict(shape_over, **adapters)
    over["max_seq_len"] = getattr(ns, "max_seq_len", None) or max_seq_len
    if getattr(ns, "params_json", None):
        return ModelArgs.from_params_json(ns.params_json, **over)
    return ModelArgs.create(STANDARD_SHAPE, over, source="flags")


def require_adapters(m):
    if not (m.lora_layers or m.prompt_layers or m.p_adapter_layers):
        raise UserError("the adapter flags select no trainable parameters: use --preset lora / moa, or set "
                        "--lora_layers, --prompt_layers or --p_adapter_layers")


def shape_record(m):
    return dict(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, vocab_size=m.vocab_size,
                multiple_of=m.multiple_of, ffn_dim_multiplier=m.ffn_dim_multiplier, ffn_hidden_dim=m.ffn_hidden_dim,
                norm_eps=m.norm_eps, rope_theta=m.rope_theta)


def add_train_workload(p, steps=5, warmup=2, scope=""):
    """--batch, --seq_len, --steps, --warmup of the training benchmarks; returns the group for more flags."""
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=bounded(int, "batch"), default=4, help="sequences per step (default 4)")
    g.add_argument("--seq_len", type=bounded(int, "seq_len", 2), default=256,
                   help="tokens per sequence (default 256)")
    g.add_argument("--steps", type=bounded(int, "steps"), default=steps,
                   help="timed steps%s (default %d)" % (scope, steps))
    g.add_argument("--warmup", type=bounded(int, "warmup", 0), default=warmup,
                   help="untimed steps before the timed ones%s (default %d; steps 1 and 2 compile kernels)"
                        % (scope, warmup))
    return g


def add_rounds_flag(p):
    p.add_argument("--rounds", type=bounded(int, "rounds"), default=1,
                   help="with --peer: measure ours then the peer this many times in turn and print a "
                        "ratio_summary record (median of the per-round ratios); a shared VM's speed drifts over "
                        "minutes, so one pair can mislead (default 1)")
    return p


def ratio_summary(what, ratios):
    """{"bench": "ratio_summary", what, rounds, ratios, median, min, max} over the per-round ratios."""
    return {"bench": "ratio_summary", "what": what, "rounds": len(ratios), "ratios": ratios,
            "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def add_machine_flags(p):
    g = p.add_argument_group("machine probes (run after the measurement, so they do not raise its peak RSS)")
    g.add_argument("--peak_size", type=bounded(int, "peak_size", 16), default=2048,
                   help="side of the square fp32 matmul timed for the peak (default 2048)")
    g.add_argument("--peak_reps", type=bounded(int, "peak_reps"), default=5,
                   help="timed repetitions of the matmul and of the copy, after 2 warm-ups (default 5)")
    g.add_argument("--bw_mb", type=bounded(int, "bw_mb", 1), default=256,
                   help="size of the array copied for the bandwidth, MB (default 256)")
    cli.add_bool(g, "no_machine", False, "skip the probes (the derived fractions are then null)")
    return p


def add_compile_flag(p):
    cli.add_bool(p, "count_compiles", True,
                 "count JIT kernels through Jittor's log capture (true/false, default true); it adds a "
                 "small per-op logging check while on")
    return p


# ------------------------------------------------------------------------------------------------ model
def jittor():
    from Utils.runtime import import_jittor
    return import_jittor()


def baseline_rss_mb():
    """VmRSS once Jittor and the model code are imported, before any model exists (the peer's
    rss_before_model_mb is measured the same way, after torch/transformers/peft are imported)."""
    import importlib
    jittor()
    for name in ("engine_finetune", "Models.llama_adapter"):
        importlib.import_module(name)
    return rss_mb()


def build_model(margs, seed):
    """A random-weight LLaMA_adapter (no checkpoint): seeded, built from ModelArgs, weights materialised."""
    jt = jittor()
    from Models.llama_adapter import LLaMA_adapter
    from Utils.runtime import seed_everything
    seed_everything(seed)
    t0 = time.perf_counter()
    model = LLaMA_adapter(margs)
    jt.sync_all()  # Jittor draws random values when the op runs: materialise now so the seed fixes them
    log("built %s model (%d trainable params) in %.1fs" % (margs.routing, model.num_trainable_params(),
                                                         time.perf_counter() - t0))
    return model


def free_model(model):
    jt = jittor()
    model.llama.free_caches()
    del model
    jt.sync_all()
    jt.gc()


def run_record(margs, model, seed):
    """Fields shared by every record of ours."""
    jt = jittor()
    from Utils.runtime import device_name, onednn_status
    return dict(impl="jittor", **shape_record(margs), routing=margs.routing,
                adapter_config=margs.adapter_params(), trainable_params=model.num_trainable_params(),
                seed=seed, dtype=margs.dtype, device=device_name(), onednn=onednn_status(),
                jittor_version=jt.__version__, cpu_count=os.cpu_count(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"))


# ------------------------------------------------------------------------------------------------ FLOPs / bytes
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

FLOPS_FORMULA = {
    "train": "4*N_base + 6*N_adapter + 3*A_tok + 4*N_head*(T-1)/T + 2*P_kv/(B*T); N_base=L*(2d^2+2d*d_kv+3d*F), "
             "N_head=V*d, N_adapter=sum of trainable 2-D weights except prompt tables, "
             "A_tok=4*T*d*L+4*R*d*L_prompt (full TxT attention), P_kv=4*R*d*d_kv*L_prompt per forward",
    "prefill": "2*N_base + 2*N_adapter + 4*P*d*L + 4*R*d*L_prompt + (2*N_head + P_kv/B)/P (last-position logits)",
    "decode": "2*N_base + 2*N_adapter + 2*N_head + 4*S*d*L + 4*R*d*L_prompt + P_kv/B at cache length S",
}


def matmul_counts(margs, model):
    """Weights per token of the FLOP formulas (see the module docstring)."""
    d, L, F, V = margs.dim, margs.n_layers, margs.ffn_hidden_dim, margs.vocab_size
    d_kv = margs.n_kv_heads * margs.head_dim
    n_adapter, prompt_rows = 0, []
    for name, p in model.trainable_parameters():
        if name.endswith("prompt.weight"):
            prompt_rows.append(int(p.shape[0]))
        elif len(p.shape) == 2:
            n_adapter += int(p.shape[0]) * int(p.shape[1])
    return dict(n_base=L * (2 * d * d + 2 * d * d_kv + 3 * d * F), n_head=V * d, n_adapter=n_adapter,
                prompt_attn=sum(4 * r * d for r in prompt_rows), p_kv=sum(4 * r * d * d_kv for r in prompt_rows),
                d=d, L=L, d_kv=d_kv)


def train_flops_per_token(c, batch, seq_len):
    T = seq_len
    a_tok = 4 * T * c["d"] * c["L"] + c["prompt_attn"]
    return (4 * c["n_base"] + 6 * c["n_adapter"] + 3 * a_tok + 4 * c["n_head"] * (T - 1) / T
            + 2 * c["p_kv"] / (batch * T))


def prefill_flops_per_token(c, batch, prompt_len):
    P = prompt_len
    return (2 * c["n_base"] + 2 * c["n_adapter"] + 4 * P * c["d"] * c["L"] + c["prompt_attn"]
            + (2 * c["n_head"] + c["p_kv"] / batch) / P)


def decode_flops_per_token(c, batch, cache_len):
    return (2 * c["n_base"] + 2 * c["n_adapter"] + 2 * c["n_head"] + 4 * cache_len * c["d"] * c["L"]
            + c["prompt_attn"] + c["p_kv"] / batch)


def decode_weight_bytes(margs, model, batch):
    """Bytes of parameters one decode step reads: all but the embedding table, plus B embedding rows."""
    total = emb = 0
    for name, p in model.named_parameters():
        b = int(_numel(p.shape)) * DTYPE_BYTES.get(str(p.dtype), 4)
        total += b
        if name.endswith("tok_embeddings.weight"):
            emb = b
    return total - emb + batch * margs.dim * DTYPE_BYTES.get(margs.dtype, 4)


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ------------------------------------------------------------------------------------------------ machine probes
def rss_mb():
    """Current VmRSS (MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Process-lifetime peak RSS (ru_maxrss is in KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_reps(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, reps, warmup):
    """Median wall seconds of `reps` calls of fn after `warmup` untimed ones."""
    return statistics.median(_time_reps(fn, reps, warmup))


def matmul_peak(n=2048, reps=5):
    """fp32 [n,n]·[n,n]ᵀ through nn.matmul_transpose (nn.Linear's path, oneDNN on CPU): best and median GFLOP/s."""
    jt = jittor()
    a, b = jt.rand(n, n), jt.rand(n, n)
    jt.sync([a, b])
    times = _time_reps(lambda: jt.nn.matmul_transpose(a, b).sync(), reps)
    flops = 2.0 * n ** 3
    return dict(matmul_size=n, matmul_peak_gflops=flops / min(times) / 1e9,
                matmul_median_gflops=flops / statistics.median(times) / 1e9)


def copy_bandwidth(mb=256, reps=5):
    """GB/s of a large fp32 array copy, read + write bytes counted: Jittor (a·1, an elementwise kernel) and numpy
    (np.copyto). `copy_bandwidth_gbs` is the best of both (the optimistic bandwidth a bound should use)."""
    import numpy as np
    jt = jittor()
    n = int(mb * MB) // 4
    a = jt.rand(n)
    a.sync()
    jt_times = _time_reps(lambda: (a * 1.0).sync(), reps)
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    y = np.empty_like(x)
    np_times = _time_reps(lambda: np.copyto(y, x), reps)
    moved = 2.0 * n * 4
    jt_bw, np_bw = moved / min(jt_times) / 1e9, moved / min(np_times) / 1e9
    return dict(copy_mb=mb, jittor_copy_gbs=jt_bw, numpy_copy_gbs=np_bw, copy_bandwidth_gbs=max(jt_bw, np_bw))


def machine_probes(ns):
    """Matmul peak and copy bandwidth, or all-null fields with --no_machine."""
    if ns.no_machine:
        return dict(matmul_size=None, matmul_peak_gflops=None, matmul_median_gflops=None, copy_mb=None,
                    jittor_copy_gbs=None, numpy_copy_gbs=None, copy_bandwidth_gbs=None)
    log("machine probes: %d² matmul, %d MB copy" % (ns.peak_size, ns.bw_mb))
    out = matmul_peak(ns.peak_size, ns.peak_reps)
    out.update(copy_bandwidth(ns.bw_mb, ns.peak_reps))
    jittor().gc()
    return out


def ratio(a, b):
    return None if a is None or not b else a / b


# ------------------------------------------------------------------------------------------------ compile counter
class CompileCounter:
    """New JIT kernels of this process, read from Jittor's log capture.

    Every kernel a process uses for the first time passes jit_compiler.cc's `compile()` ("Compile op", LOGvv),
    whether its .so is built or found in the disk cache; a real g++ build also logs cache_compile.cc's
    "Cache key of ... not found/changed". `take()` returns (kernels, builds) since the previous call.
    Jittor exposes no counter, so this raises those two files' verbosity (log_vprefix) and captures the logs
    (log_silent keeps them off stderr).
    """

    PREFIX = "jit_compiler.cc=10,cache_compile.cc=10"

    def __init__(self, enabled=True):
        self.enabled = enabled
        if enabled:
            from jittor_utils import LOG
            jt = jittor()
            self._log, self._old = LOG, jt.flags.log_vprefix
            jt.flags.log_vprefix = self.PREFIX
            LOG.log_capture_start()
            LOG.log_capture_read()  # drop anything captured before

    def take(self):
        if not self.enabled:
            return None, None
        kernels = builds = 0
        for rec in self._log.log_capture_read():
            name, msg = rec.get("name", ""), rec.get("msg", "")
            if name == "jit_compiler.cc" and msg.startswith("Compile op"):
                kernels += 1
            elif name == "cache_compile.cc" and msg.startswith("Cache key of"):
                builds += 1
        return kernels, builds

    def close(self):
        if self.enabled:
            self._log.log_capture_stop()
            self._log.log_capture_read()
            jittor().flags.log_vprefix = self._old
            self.enabled = False


def sum_or_none(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


# ------------------------------------------------------------------------------------------------ training step
WEIGHT_DECAY = 0.02  # the peer's AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)


def random_tokens(vocab_size, batch, seq_len, seed):
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq_len)).astype(np.int32)


class _OneBatch:
    """A data object of one micro-batch per epoch (the engine asks len() for its step count)."""

    def __len__(self):
        return 1


def train_steps(model, tokens, n_steps, lr, weight_decay, counter):
    """`n_steps` full training steps on one fixed batch through the project's engine (engine.trainer.Trainer's
    optimizer_step, accum_iter 1, one process): forward → jt.grad over the trainable weights → sync → AdamW step.

    Labels = tokens (every position supervised). Returns per-step lists: seconds, losses, (kernels, builds).
    """
    jt = jittor()
    from engine.schedule import StepSchedule
    from engine.trainer import Trainer, TrainConfig
    cfg = TrainConfig(output_dir=os.devnull, lr=lr, schedule=StepSchedule(lr, n_steps, kind="constant"),
                      weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)
    trainer = Trainer(model, _OneBatch(), cfg, print_fn=log)
    batch = {"tokens": tokens, "labels": tokens}
    model.train()
    times, losses, compiles = [], [], []
    counter.take()
    for i in range(n_steps):
        t0 = time.perf_counter()
        value = trainer.optimizer_step([batch], lr)["loss"]
        times.append(time.perf_counter() - t0)
        losses.append(value)
        compiles.append(counter.take())
        log("step %d/%d %.3fs loss %.4f new kernels %s" % (i + 1, n_steps, times[-1], value, compiles[-1][0]))
    del trainer
    jt.sync_all()
    jt.gc()
    return times, losses, compiles


def step_stats(times, compiles, warmup):
    """Timing summary of train_steps(): median of the steps after `warmup`, step 1 / 2 and recompile signals."""
    timed = times[warmup:]
    med = statistics.median(timed)
    later = times[2:]
    return dict(sec_per_step=med, sec_per_step_mean=statistics.fmean(timed), sec_per_step_min=min(timed),
                step_times=times, step1_s=times[0], step2_s=times[1] if len(times) > 1 else None,
                max_after_step2_over_median=(max(later) / med) if later else None,
                later_steps_slower=(max(later) > 1.5 * med) if later else None,
                new_kernels_per_step=[k for k, _ in compiles], builds_per_step=[b for _, b in compiles],
                new_kernels_after_step2=sum_or_none(k for k, _ in compiles[2:]) if len(compiles) > 2 else 0,
                builds_after_step2=sum_or_none(b for _, b in compiles[2:]) if len(compiles) > 2 else 0)


# ------------------------------------------------------------------------------------------------ subprocesses
# Linux carries a process's RSS high-water mark into a child it forks and execs (ru_maxrss of the child starts at
# the parent's peak). A tiny launcher process in between gives the measured process a clean ru_maxrss.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def run_json_subprocess(cmd, what):
    """Run `cmd` (stderr passes through), return its stdout JSON lines as dicts; failure → UserError.

    Started through a small launcher so the child's peak_rss_mb does not inherit this process's peak."""
    log("running %s: %s" % (what, " ".join(cmd)))
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER] + cmd, stdout=subprocess.PIPE, stderr=None, cwd=ROOT,
                          text=True)
    if proc.returncode != 0:
        raise UserError("%s exited with status %d (its error is above)" % (what, proc.returncode))
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise UserError("%s printed a non-JSON line on stdout: %r" % (what, line[:200]))
    if not records:
        raise UserError("%s printed no JSON record" % what)
    return records


def run_peer(args_list):
    """Run bench/peer_torch.py with `args_list`; returns its parsed JSON lines."""
    return run_json_subprocess([sys.executable, PEER] + [str(a) for a in args_list], "peer_torch.py")


def peer_shape_args(m):
    out = ["--dim", m.dim, "--n_layers", m.n_layers, "--n_heads", m.n_heads, "--n_kv_heads", m.n_kv_heads,
           "--vocab_size", m.vocab_size, "--multiple_of", m.multiple_of, "--norm_eps", m.norm_eps,
           "--rope_theta", m.rope_theta]
    if m.ffn_dim_multiplier is not None:
        out += ["--ffn_dim_multiplier", m.ffn_dim_multiplier]
    return out


def peer_train_args(m, mode, batch, seq_len, steps, warmup, seed):
    """The peer's plain-LoRA run with our LoRA rank, alpha, targets and layers."""
    if not m.lora_layers:
        raise UserError("--peer compares against plain LoRA: set --lora_layers (or --preset lora / moa)")
    return ["--mode", mode] + peer_shape_args(m) + [
        "--lora_rank", m.lora_rank, "--lora_alpha", m.lora_alpha, "--lora_targets", ",".join(m.lora_targets),
        "--lora_layers", format_layers(m.lora_layers), "--batch", batch, "--seq_len", seq_len, "--steps", steps,
        "--warmup", warmup, "--seed", seed]


def ratio_record(what, ours, peer):
    """ratio = ours / peer (throughput: > 1 means we are faster; memory: > 1 means we use more)."""
    return {"bench": "ratio", "what": what, "ours": ours, "peer": peer, "ratio": ratio(ours, peer)}
