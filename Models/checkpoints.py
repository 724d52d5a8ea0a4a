"""Checkpoint layouts of our one Transformer: Meta's / our own `params.json` + `consolidated.*.pth`, and the Hugging
Face families LLaMA, Mixtral, Qwen2-MoE and Qwen3 (`config.json` + safetensors) in both directions; the strict
loader, `save_pretrained`, `export_hf` and the CLI `python -m Models.checkpoints export`.

Our own layout may also hold its tensors in safetensors shards beside `params.json` (`model.safetensors`, or
`model-*-of-*.safetensors` + `model.safetensors.index.json`, our names; `upcycle.py` writes it tensor by tensor).
File formats are `Utils/checkpoint_io.py`; config fields `Models/hf_config.py`; tensor names and RoPE / expert
layouts `Models/hf_layout.py`. Loading an HF directory reads one tensor at a time straight into the model, so no
second copy of the weights is held; an export writes one safetensors shard at a time (`model.safetensors`, or
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` above `max_shard_bytes`).

What each family cannot express (an export lists every such field in one error line):

* every family: `ffn_gated=False` / `moe.gated=False` (HF FFNs are gated); dense and expert activations that differ.
* llama, qwen3: any MoE layer; llama: `qk_norm`; qwen3: `qk_norm=False`.
* mixtral: a dense model; MoE not in every layer; `experts_per_layer` of different counts; `expert_sizes` of
  different widths; shared experts; router `mlp`/`gmm` or `router_bias`; scoring `topk_softmax`;
  `norm_topk_prob=False`; capacity (`capacity_factor`, `expert_capacity`); `score_scale` != 1; `attn_bias`; `qk_norm`.
* qwen2_moe: a dense model; `head_dim` != dim/n_heads; `qk_norm`; per-layer counts / per-expert widths as for
  mixtral; router kind or bias; scoring; capacity; `score_scale`; shared experts without `shared_gate`.

Exact rewrites instead of refusals: `attn_bias` on llama/qwen3 (HF's attention_bias also biases o_proj: written as
zeros), a bias-free Qwen2-MoE (zero q/k/v biases), no shared expert on Qwen2-MoE (a width-1 zero shared expert),
any Qwen2-MoE placement (`decoder_sparse_step` / `mlp_only_layers`). Dropped with a note, because they only act in
training: `noisy_gating` (its noise projection), `router_dropout`, `sample_topk`, `aux_seq/cv2/mi/z`, a
non-"mixtral" `aux_switch_form`, and `jitter` on Qwen2-MoE. Adapters are never part of an export (adapter files are
`Models/adapter_io.py`).
"""
import glob
import json
import os
import shutil
import sys

import numpy as np

from Models.hf_config import FAMILIES, family_of, hf_config_for
from Models.hf_layout import from_hf, permute_rows, to_hf
from Models.model_args import ModelArgs
from Models.param_count import param_shapes
from Utils.checkpoint_io import LazyTensor, read_safetensors, read_torch_pth, write_safetensors, write_torch_pth
from Utils.errors import UserError, cli_main

_permute_rows = permute_rows   # the name older code used
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")
# Meta's model-parallel layers (llama3 model.py): column-parallel weights split the output dim (0), row-parallel
# weights the input dim (1); VocabParallelEmbedding splits the vocabulary (0); norms are replicated.
_MP_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0, "wo": 1, "w2": 1}


# ------------------------------------------------------------------------------------------------ Meta / ours
def load_meta_checkpoint(ckpt_dir, lazy=False):
    """Meta `consolidated.*.pth` shards → {Meta name: float32 array} (shards merged as fairscale split them). Our
    own checkpoints (MoE included) are one shard with our parameter names. lazy=True gives {name: LazyTensor}: each
    tensor (its model-parallel parts, then merged) is read from the files only when loaded."""
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not paths:
        raise UserError("%s: no consolidated.*.pth checkpoint in this directory" % ckpt_dir)
    shards = [read_torch_pth(p, lazy=lazy) for p in paths]
    for p, sd in zip(paths, shards):
        if not isinstance(sd, dict) or set(sd) != set(shards[0]):
            raise UserError("%s: holds different tensor names than %s" % (p, paths[0]))
    if lazy:
        return {name: _lazy_merged(name, [sd[name] for sd in shards]) for name in shards[0]}
    if len(shards) == 1:   # entry by entry: a cast copy replaces its original at once, never two dicts of copies
        sd = shards[0]
        return {k: np.asarray(sd.pop(k), dtype=np.float32) for k in list(sd)}
    out = {}
    for name in shards[0]:
        parts = [np.asarray(sd[name], dtype=np.float32) for sd in shards]
        axis = _MP_AXIS.get(name.split(".")[-2])
        out[name] = parts[0] if axis is None or parts[0].ndim < 2 else np.concatenate(parts, axis=axis)
    return out


def _lazy_merged(name, parts):
    """One LazyTensor (float32 on load) for a tensor stored as model-parallel `parts` (LazyTensors or arrays)."""
    lazy = [p if isinstance(p, LazyTensor) else LazyTensor(np.shape(p), lambda p=p: p) for p in parts]
    axis = _MP_AXIS.get(name.split(".")[-2])
    if len(lazy) == 1 or axis is None or len(lazy[0].shape) < 2:
        return lazy[0].then(lambda a: np.asarray(a, dtype=np.float32))
    shape = list(lazy[0].shape)
    shape[axis] = sum(p.shape[axis] for p in lazy)
    return LazyTensor(shape, lambda: np.concatenate([np.asarray(p.load(), np.float32) for p in lazy], axis=axis),
                      lazy[0].dtype)


# ------------------------------------------------------------------------------------------------ HF families
def default_family(args):
    """The HF family whose names a state uses when none is given: llama / qwen3 for dense models, mixtral for MoE in
    every layer without shared experts, else qwen2_moe."""
    ids = args.moe_layer_ids()
    if not ids:
        return "qwen3" if args.qk_norm else "llama"
    return "mixtral" if len(ids) == args.n_layers and not args.moe.shared_experts else "qwen2_moe"


def _fetch_from(state):
    last = {}   # the last LazyTensor read: its experts are sliced out one after another

    def fetch(name, rows):
        v = state[name]
        if isinstance(v, LazyTensor):
            if name not in last:
                last.clear()
                last[name] = v.load()
            v = last[name]
        return np.asarray(v if rows is None else v[rows[0]:rows[1]], dtype=np.float32)
    return fetch


def hf_from_meta(state, args, family=None):
    """{our name: array} (any subset) → {HF name: array} of `family` (default: `default_family`), q/k rows permuted
    to HF's rotate-half layout, stacked experts split per expert."""
    family = family or default_family(args)
    shapes = {k: np.shape(v) for k, v in state.items()}
    return {k: v.load() for k, v in to_hf(shapes, _fetch_from(state), args, family).items()}


def meta_from_hf(state, args, source="checkpoint", family=None):
    """The inverse of hf_from_meta for a whole model; an unknown, missing or mis-shaped HF tensor is an error."""
    entries = {k: LazyTensor(np.shape(v), lambda v=v: np.asarray(v)) for k, v in state.items()}
    return {k: v.load() for k, v in from_hf(entries, args, family or default_family(args), source).items()}


def hf_entries(ckpt_dir):
    """{HF name: LazyTensor} over `model.safetensors` or the shards its index names (nothing read yet)."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError("%s: expected a JSON object with a 'weight_map' (%s)" % (index, str(e).splitlines()[0]))
        paths = [os.path.join(ckpt_dir, p) for p in files]
    else:
        paths = sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors")))
    if not paths:
        raise UserError("%s: no model.safetensors or model-*-of-*.safetensors in this directory" % ckpt_dir)
    entries = {}
    for p in paths:
        for k, v in read_safetensors(p, lazy=True).items():
            if k in entries:
                raise UserError("%s: tensor %r is stored twice (also in another shard)" % (p, k))
            entries[k] = v
    return entries


def hf_state(ckpt_dir, args, family=None):
    """{our name: LazyTensor} of an HF directory (family from its config.json unless given)."""
    if family is None:
        path = os.path.join(ckpt_dir, "config.json")
        with open(path) as f:
            family = family_of(json.load(f), path)
    return from_hf(hf_entries(ckpt_dir), args, family, ckpt_dir)


def load_hf_checkpoint(ckpt_dir, args=None):
    """HF `model.safetensors` (or its shards) → {our name: float32 array}; args default to the dir's config.json."""
    args = args or ModelArgs.from_hf_config(os.path.join(ckpt_dir, "config.json"))
    return {k: np.asarray(v.load(), dtype=np.float32) for k, v in hf_state(ckpt_dir, args).items()}


def read_checkpoint(ckpt_dir, **overrides):
    """(ModelArgs, {our name: array | LazyTensor}) of a Meta/our (`params.json` + `consolidated.*.pth`, or our names
    in `*.safetensors` shards) or HF (`config.json`) directory."""
    if not os.path.isdir(ckpt_dir):
        raise UserError("%s: checkpoint directory not found" % ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, "params.json")):
        args = ModelArgs.from_params_json(os.path.join(ckpt_dir, "params.json"), **overrides)
        if not glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")) and \
                glob.glob(os.path.join(ckpt_dir, "*.safetensors")):
            return args, hf_entries(ckpt_dir)   # our names in (sharded) safetensors, as upcycle.py writes them
        return args, load_meta_checkpoint(ckpt_dir)
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        args = ModelArgs.from_hf_config(os.path.join(ckpt_dir, "config.json"), **overrides)
        return args, hf_state(ckpt_dir, args)
    raise UserError("%s: neither params.json (Meta) nor config.json (Hugging Face) found" % ckpt_dir)


# ------------------------------------------------------------------------------------------------ strict loading
def strict_load(module, state, source, keys=None, allow_missing=None, consume=False):
    """Copy `state` into `module`'s parameters, refusing any missing/unexpected name or shape mismatch.

    keys: None (every state_dict entry), a predicate on names, or a collection of names to load.
    allow_missing: predicate naming module entries that may be absent from `state` (e.g. adapter parameters).
    Values (arrays, jt.Vars or LazyTensors, read here one at a time) are cast to each parameter's own dtype (Jittor's
    load_state_dict would adopt the checkpoint's). consume=True drops each entry from `state` once loaded, so the
    numpy copy shrinks while the model fills.
    """
    from Utils.runtime import import_jittor
    jt = import_jittor()
    params = module.state_dict()
    if keys is not None:
        wanted = keys if callable(keys) else set(keys).__contains__
        params = {k: v for k, v in params.items() if wanted(k)}
    missing = [k for k in params if k not in state and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in state if k not in params]
    for what, names in (("missing tensor", missing), ("unexpected tensor", unexpected)):
        if names:
            more = " (and %d more)" % (len(names) - 1) if len(names) > 1 else ""
            raise UserError("%s: %s %r%s" % (source, what, names[0], more))
    bad = [k for k in state if tuple(params[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        more = " (%d tensors mismatch)" % len(bad) if len(bad) > 1 else ""
        raise UserError("%s: tensor %r has shape %s but the model expects %s%s"
                        % (source, k, tuple(state[k].shape), tuple(params[k].shape), more))
    names = sorted(state)
    for k in names:
        value = state.pop(k) if consume else state[k]
        value = value.load() if isinstance(value, LazyTensor) else value
        p = params[k]
        v = value if isinstance(value, jt.Var) else jt.array(np.asarray(value))
        p.update(v.cast(p.dtype) if v.dtype != p.dtype else v)
        del value, v
    return names


# ------------------------------------------------------------------------------------------------ writing
def write_dir_atomically(out_dir, write):
    """write(tmp_dir), then swap it in for out_dir: a crash leaves either the old directory or the new one."""
    out_dir = os.path.abspath(out_dir)
    tmp, old = "%s.tmp%d" % (out_dir, os.getpid()), "%s.old%d" % (out_dir, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        result = write(tmp)
        if os.path.exists(out_dir):
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return result


def tokenizer_dir_files(tokenizer):
    """The files of a tokenizer (or a directory holding one) worth copying beside a checkpoint."""
    if tokenizer is None:
        return []
    if isinstance(tokenizer, str):
        return [os.path.join(tokenizer, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, n))]
    if getattr(tokenizer, "dir", None):                      # HFTokenizer: tokenizer.json and its siblings
        return tokenizer_dir_files(tokenizer.dir)
    return [tokenizer.model_path] if getattr(tokenizer, "model_path", None) else []


def _copy_tokenizer(files, out):
    for f in files:
        name = "tokenizer.model" if f.endswith(".model") else os.path.basename(f)
        shutil.copyfile(f, os.path.join(out, name))


def _base_state(obj):
    """(args, {our name: shape}, fetch, tokenizer) of a LLaMA_adapter / Transformer (adapters left out)."""
    module = getattr(obj, "llama", obj)
    from Models.llama_adapter import is_adapter_param
    params = {k: v for k, v in module.state_dict().items() if not is_adapter_param(k)}

    def fetch(name, rows):
        v = params[name] if rows is None else params[name][rows[0]:rows[1]]
        return v.float32().numpy()
    return module.args, {k: tuple(v.shape) for k, v in params.items()}, fetch, getattr(obj, "tokenizer", None)


def save_pretrained(model, out_dir):
    """Our checkpoint of `model`'s base: params.json (with its "moe" section) + consolidated.00.pth under our
    names + the tokenizer files, written to a temporary directory and swapped in. `from_pretrained` reads it."""
    args, shapes, fetch, tokenizer = _base_state(model)
    files = tokenizer_dir_files(tokenizer)

    def write(tmp):
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(args.base_params(), f, indent=2)
        state = {k: fetch(k, None) for k in shapes}
        write_torch_pth(os.path.join(tmp, "consolidated.00.pth"), state,
                        dtype=None if args.dtype == "float32" else args.dtype)
        _copy_tokenizer(files, tmp)
    return write_dir_atomically(out_dir, write)


def export_hf(model_or_state, out_dir, family, args=None, dtype="float32", max_shard_bytes=5 * 10**9,
              tokenizer=None):
    """Write `family`'s config.json + safetensors (sharded above max_shard_bytes) that transformers loads, from a
    model (LLaMA_adapter / Transformer) or a {our name: array | LazyTensor} state with its `args`. Returns the notes
    on dropped training-only settings; a configuration the family cannot express is one UserError line."""
    if isinstance(model_or_state, dict):
        if args is None:
            raise UserError("export_hf: a state dict needs its ModelArgs (args=...)")
        state = {k[len("llama."):] if k.startswith("llama.") else k: v for k, v in model_or_state.items()}
        shapes, fetch = {k: tuple(np.shape(v)) for k, v in state.items()}, _fetch_from(state)
    else:
        args, shapes, fetch, own_tok = _base_state(model_or_state)
        tokenizer = tokenizer or own_tok
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError("--dtype: %r is not float32, bfloat16 or float16" % dtype)
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else None
    cfg, notes = hf_config_for(args, family, getattr(tok, "bos_id", None), getattr(tok, "eos_id", None))
    cfg["torch_dtype"] = dtype
    expected = param_shapes(args)
    for k in sorted(set(expected) | set(shapes)):
        if k not in shapes or k not in expected:
            raise UserError("export_hf: %s tensor %r" % ("the state lacks" if k not in shapes else "unexpected", k))
    tensors = to_hf(shapes, fetch, args, family)
    shards = _shards(tensors, 2 if dtype != "float32" else 4, max_shard_bytes)
    files = tokenizer_dir_files(tokenizer)

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        weight_map = {}
        for n, names in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                "model-%05d-of-%05d.safetensors" % (n + 1, len(shards))
            write_safetensors(os.path.join(tmp, fname), {k: tensors[k].load() for k in names}, dtype=dtype)
            weight_map.update(dict.fromkeys(names, fname))
        if len(shards) > 1:
            total = sum(int(np.prod(t.shape)) for t in tensors.values()) * (2 if dtype != "float32" else 4)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        _copy_tokenizer(files, tmp)
    write_dir_atomically(out_dir, write)
    return notes


def _shards(tensors, itemsize, max_bytes):
    """Consecutive groups of tensor names of at most max_bytes each (a bigger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for k, t in tensors.items():
        n = int(np.prod(t.shape)) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


# ------------------------------------------------------------------------------------------------ CLI
def build_parser():
    from Utils.cli import Parser
    p = Parser(prog="python -m Models.checkpoints", description="Convert checkpoints of our Transformer.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a Hugging Face checkpoint (config.json + safetensors)")
    e.add_argument("--ckpt_dir", required=True, help="our/Meta (params.json) or HF (config.json) checkpoint")
    e.add_argument("--out_dir", required=True)
    e.add_argument("--family", required=True, choices=sorted(FAMILIES))
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    e.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard, in 10^9 bytes")
    return p


@cli_main
def main(argv=None):
    opts = build_parser().parse_args(argv)
    args, state = read_checkpoint(opts.ckpt_dir)   # torch-free and Jittor-free: numpy or lazy tensors only
    notes = export_hf(state, opts.out_dir, opts.family, args=args, dtype=opts.dtype,
                      max_shard_bytes=int(opts.max_shard_gb * 10**9), tokenizer=opts.ckpt_dir)
    for note in notes:
        print("note: %s" % note, file=sys.stderr)
    print(os.path.abspath(opts.out_dir))


if __name__ == "__main__":
    main()
