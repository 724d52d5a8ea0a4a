"""The upcycled checkpoint, tensor by tensor: read a dense LLaMA lazily (Meta `.pth` or HF safetensors), describe every
tensor of the MoE model as a lazy function of the dense ones, and write them as sharded safetensors under our names
(params.json with its "moe" section beside them, the layout `from_pretrained` reads). Imports no Jittor.

What each MoE layer gets (`Models/upcycling.py` says which layers and why):
* `experts.w1/w3` [E·F, d]: E copies of the dense gate/up weights stacked along rows (`Models/moe/experts.py`'s
  layout, the same as `Experts.from_dense` builds); `experts.w2` [E·F, d]: E copies of the dense down weight,
  transposed. With noise_std σ each copy gets + σ·std(W)·N(0, 1), drawn from its own seeded stream (seed, layer,
  projection, expert), so the result does not depend on the order tensors are written in.
* residual MoE: `shared.w1/w3/w2` = the dense FFN exactly; the routed copies' `w2` are zeros.
* the router: freshly initialised as the MoE core's modules would be (Linear: U(±1/√fan_in) for weight and bias;
  gmm centroids N(0, 1), temperature 0), seeded per layer.

Memory: a stacked expert tensor is written one copy at a time (`LazyTensor.from_chunks`) and the dense tensor it
copies is kept in a one-slot cache, so the peak is about one dense tensor, a noisy copy and an encoded block — never
the model, never a whole stacked tensor (bench/upcycle_memory.py measures it). `Experts.from_dense` is not used here
because it builds the stacked tensor in memory as a Jittor array; tests check both give the same layout.
"""
import glob
import json
import os
import shutil
import sys

import numpy as np

from Models.checkpoints import (_shards, hf_entries, hf_state, load_meta_checkpoint, tokenizer_dir_files,
                                write_dir_atomically)
from Models.hf_config import family_of
from Models.model_args import ModelArgs
from Models.param_count import param_shapes
from Utils.checkpoint_io import LazyTensor, write_safetensors
from Utils.errors import UserError

PROJ_IDS = {"w1": 1, "w3": 3, "w2": 2}
DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------------ reading
def read_dense(ckpt_dir):
    """(ModelArgs, {our name: LazyTensor}, params.json dict or None) of a dense LLaMA directory, nothing read yet.

    Meta/ours: params.json + consolidated.*.pth (or our names in safetensors); HF: config.json of a LlamaForCausalLM
    + safetensors. Anything else — another family, an MoE checkpoint, no weights — is a one-line error."""
    if not os.path.isdir(ckpt_dir):
        raise UserError("%s: checkpoint directory not found" % ckpt_dir)
    meta, hf = os.path.join(ckpt_dir, "params.json"), os.path.join(ckpt_dir, "config.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            try:
                params = json.load(f)
            except ValueError as e:
                raise UserError("%s: not valid JSON (%s)" % (meta, str(e).splitlines()[0]))
        args = ModelArgs.from_params_json(meta)
        if args.moe is not None:
            raise UserError("%s: the checkpoint is already a mixture of experts (layers %s); upcycle a dense LLaMA"
                            % (meta, list(args.moe_layer_ids())))
        _check_llama(args, meta)
        if glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")) or not glob.glob(
                os.path.join(ckpt_dir, "*.safetensors")):
            state = load_meta_checkpoint(ckpt_dir, lazy=True)
        else:
            state = hf_entries(ckpt_dir)
        return _fix_vocab(args, state, meta), state, params
    if os.path.isfile(hf):
        try:
            with open(hf) as f:
                family = family_of(json.load(f), hf)
        except ValueError as e:
            raise UserError("%s: not valid JSON (%s)" % (hf, str(e).splitlines()[0]))
        if family != "llama":
            raise UserError("%s: model_type %r is not a dense LLaMA (upcycling reads LlamaForCausalLM or Meta LLaMA "
                            "checkpoints)" % (hf, family))
        args = ModelArgs.from_hf_config(hf)
        _check_llama(args, hf)
        return args, hf_state(ckpt_dir, args, "llama"), None
    raise UserError("%s: neither params.json (Meta LLaMA) nor config.json (Hugging Face LLaMA) found" % ckpt_dir)


def _check_llama(args, source):
    if not args.ffn_gated or args.hidden_act != "silu" or args.qk_norm:
        raise UserError("%s: not a LLaMA (SwiGLU FFN, no q/k norm): ffn_gated=%s hidden_act=%r qk_norm=%s"
                        % (source, args.ffn_gated, args.hidden_act, args.qk_norm))


def _fix_vocab(args, state, source):
    """Meta's LLaMA-2 params.json says vocab_size -1 (the tokenizer decides): take it from the embedding."""
    emb = state.get("tok_embeddings.weight")
    if args.vocab_size <= 0 and emb is not None:
        import dataclasses
        return dataclasses.replace(args, vocab_size=int(emb.shape[0]))
    return args


def check_dense_state(state, args, source):
    """Every tensor the dense model needs, with its shape; nothing else."""
    want = param_shapes(args)
    for what, names in (("missing tensor", [k for k in want if k not in state]),
                        ("unexpected tensor", [k for k in state if k not in want])):
        if names:
            raise UserError("%s: %s %r%s" % (source, what, names[0],
                                             " (and %d more)" % (len(names) - 1) if len(names) > 1 else ""))
    for k, shape in want.items():
        if tuple(state[k].shape) != tuple(shape):
            raise UserError("%s: tensor %r has shape %s, params say %s" % (source, k, tuple(state[k].shape), shape))


def source_dtype(state):
    """The dense checkpoint's floating dtype (of its embedding), the default of the output."""
    dt = getattr(state.get("tok_embeddings.weight"), "dtype", None)
    return dt if dt in DTYPES else "float32"


# ------------------------------------------------------------------------------------------------ the MoE tensors
class _DenseSlot:
    """The last dense FFN weight read (as the stacked layout wants it: w2 transposed), and its std."""

    def __init__(self, state):
        self.state, self.key, self.value, self.std = state, None, None, None

    def get(self, name, transpose):
        if self.key != (name, transpose):
            self.value = self.std = None      # drop the old one before reading the next
            v = self.state[name]
            v = np.asarray(v.load() if isinstance(v, LazyTensor) else v, dtype=np.float32)
            self.value = np.ascontiguousarray(v.T) if transpose else v
            self.key = (name, transpose)
        return self.value

    def scale(self, name, transpose):
        self.get(name, transpose)
        if self.std is None:   # in row blocks: no float64 copy of a large weight
            v, n, total, squares = self.value, self.value.size, 0.0, 0.0
            for i in range(0, v.shape[0], 1024):
                block = v[i:i + 1024].astype(np.float64)
                total, squares = total + block.sum(), squares + np.square(block).sum()
            mean = total / n
            self.std = float(np.sqrt(max(squares / n - mean * mean, 0.0)))
        return self.std


def _uniform(rng, shape, fan_in):
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def router_init(cfg, d, E, rng):
    """{name under feed_forward.router: array} of a fresh router, initialised as Models/moe/routers.py does."""
    h = cfg.router_hidden
    if cfg.router == "linear":
        out = {"gate.weight": _uniform(rng, (E, d), d)}
        if cfg.router_bias:
            out["gate.bias"] = _uniform(rng, (E,), d)
    elif cfg.router == "mlp":
        out = {"w1.weight": _uniform(rng, (h, d), d)}
        if cfg.router_bias:
            out["w1.bias"] = _uniform(rng, (h,), d)
        out["w2.weight"] = _uniform(rng, (E, h), h)
    else:
        out = {"proj.weight": _uniform(rng, (h, d), d), "centroids": rng.standard_normal((E, h)).astype(np.float32),
               "tau": np.zeros((1,), np.float32)}
    return out


def upcycled_state(dense, args, noise_std=0.0, seed=0, residual=False):
    """{our name: array | LazyTensor} of the MoE model `args` (in param_shapes order) from the dense state."""
    slot = _DenseSlot(dense)
    ids = set(args.moe_layer_ids())
    routers, out = {}, {}
    for name, shape in param_shapes(args).items():
        parts = name.split(".")
        if parts[0] != "layers" or int(parts[1]) not in ids or parts[2] != "feed_forward":
            out[name] = dense[name]
            continue
        layer, kind, proj = int(parts[1]), parts[3], parts[4]
        E = args.moe.experts_at(layer, args.n_layers)
        src = "layers.%d.feed_forward.%s.weight" % (layer, proj)
        if kind == "router":
            if layer not in routers:
                routers[layer] = router_init(args.moe, args.dim, E, np.random.default_rng([seed, layer, 0]))
            value = routers[layer].pop(".".join(parts[4:]))
            if value.shape != tuple(shape):
                raise AssertionError("router init %s has shape %s, the model %s" % (name, value.shape, shape))
            out[name] = value
        elif kind == "shared":
            out[name] = _dense_copy(slot, src, proj == "w2", shape)
        elif kind == "experts":
            zero = residual and proj == "w2"
            chunks = [_expert_copy(slot, src, proj == "w2", zero, noise_std, (seed, layer, PROJ_IDS[proj], e))
                      for e in range(E)]
            out[name] = LazyTensor.from_chunks(shape, chunks)
        else:
            raise AssertionError("no rule to upcycle %s" % name)
    left = {i: sorted(r) for i, r in routers.items() if r}
    if left:
        raise AssertionError("router init made tensors the model does not have: %s" % left)
    return out


def _dense_copy(slot, src, transpose, shape):
    return LazyTensor(shape, lambda: slot.get(src, transpose))


def _expert_copy(slot, src, transpose, zero, noise_std, stream):
    def copy():
        base = slot.get(src, transpose)
        if zero:
            return np.zeros_like(base)
        if noise_std <= 0:
            return base
        rng = np.random.default_rng(list(stream))
        noisy = rng.standard_normal(base.shape, dtype=np.float32)
        noisy *= np.float32(noise_std * slot.scale(src, transpose))   # in place: one array besides the dense one
        noisy += base
        return noisy
    return copy


# ------------------------------------------------------------------------------------------------ writing
def write_checkpoint(out_dir, params, state, dtype="float32", max_shard_bytes=5 * 10**9, files=(), extra_json=None,
                     progress=True):
    """params.json + model[-i-of-n].safetensors (+ index) + `files` (tokenizer) + `extra_json` ({name: obj}),
    written into a temporary directory and swapped in for out_dir; tensors stream one block at a time."""
    if dtype not in DTYPES:
        raise UserError("--dtype: %r is not one of %s" % (dtype, ", ".join(DTYPES)))
    itemsize = 4 if dtype == "float32" else 2
    shards = _shards(state, itemsize, max_shard_bytes)
    total = sum(int(np.prod(t.shape)) for t in state.values()) * itemsize
    bar = _progress(total, progress)

    def write(tmp):
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f, indent=2)
        weight_map = {}
        for n, names in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else \
                "model-%05d-of-%05d.safetensors" % (n + 1, len(shards))
            write_safetensors(os.path.join(tmp, fname), {k: state[k] for k in names}, dtype=dtype,
                              progress=bar.update if bar else None)
            weight_map.update(dict.fromkeys(names, fname))
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        for path in files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        for name, obj in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
    try:
        write_dir_atomically(out_dir, write)
    finally:
        if bar:
            bar.close()
    return {"bytes": total, "shards": len(shards)}


def _progress(total, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="upcycle", file=sys.stderr,
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ the whole job
def convert(ckpt_dir, spec, out_dir, dtype="auto", max_shard_bytes=5 * 10**9, progress=True):
    """Upcycle the dense checkpoint in ckpt_dir as `spec` (Models.upcycling.UpcycleSpec) says and write it to
    out_dir; returns (ModelArgs of the MoE model, the closed-form counts). dtype "auto" keeps the source's."""
    from Models.upcycling import report, upcycled_args
    dense_args, dense, params = read_dense(ckpt_dir)
    check_dense_state(dense, dense_args, ckpt_dir)
    args = upcycled_args(dense_args, spec)
    form = report(dense_args, args)
    state = upcycled_state(dense, args, spec.noise_std, spec.seed, spec.residual_moe)
    dtype = source_dtype(dense) if dtype == "auto" else dtype
    if params is not None:   # Meta/ours: the source's own keys (and defaults) + the MoE section
        out_params = dict(params, vocab_size=args.vocab_size, moe=args.moe.to_dict())
    else:
        out_params = args.base_params()
    meta = {"source": os.path.abspath(ckpt_dir), "upcycle_config": spec.to_dict(), "config_file": spec.source,
            "dtype": dtype, "moe_layers": form["layers"], "experts_per_layer": form["experts"],
            "parameters": {k: form[k] for k in ("dense", "total", "active")}}
    written = write_checkpoint(out_dir, out_params, state, dtype, max_shard_bytes, tokenizer_dir_files(ckpt_dir),
                               {"upcycle.json": meta}, progress)
    form = dict(form, **written, dtype=dtype)
    return args, form
