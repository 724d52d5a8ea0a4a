"""Weight layouts of the HF families (LLaMA, Mixtral, Qwen2-MoE, Qwen3) against our parameters, both directions.

`layout(args, family)` says, for each of our base parameters (`Models.param_count.param_shapes`), which HF tensors
hold it and how: as is; with its rows permuted between HF's rotate-half RoPE and our interleaved pairs (q/k
weights and biases per head, the per-head q_norm/k_norm weights with the same permutation inside one head —
the norm's mean square does not care about order, its weight does); or as a row block of a stacked expert matrix
(`experts.{e}.w1/w3` → rows of `experts.w1/w3`, `experts.{e}.w2` [d, F_e] transposed → rows of `experts.w2`).
Everything is lazy (`LazyTensor`): a loader reads one HF file tensor at a time, an exporter slices one expert at a
time, so neither holds a second copy of the model.
"""
import numpy as np

from Models.param_count import layer_widths, param_shapes
from Utils.checkpoint_io import LazyTensor
from Utils.errors import UserError

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_DENSE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT = {"mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"}, "qwen2_moe": _DENSE}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}


def permute_rows(w, n_heads, inverse=False):
    """Meta interleaved-pair rows → HF rotate-half rows within each of n_heads heads (transformers' convert script
    `permute`: view(heads, hd/2, 2, cols).transpose(1, 2)); inverse=True goes back. 1-D tensors (biases, norm
    weights) are permuted as one column."""
    w = np.asarray(w)
    flat = w.ndim == 1
    m = w.reshape(-1, 1) if flat else w
    rows, cols = m.shape
    split = (n_heads, 2, rows // n_heads // 2, cols) if inverse else (n_heads, rows // n_heads // 2, 2, cols)
    out = m.reshape(split).transpose(0, 2, 1, 3).reshape(rows, cols)
    return out.reshape(-1) if flat else out


def layout(args, family):
    """{our name: [(hf name, hf shape, op, arg)]}; op "same" | "perm" (arg: heads) | "rows" / "rows_t" (arg: the
    row range of our stacked matrix that the HF tensor fills, as is / transposed)."""
    out = {}
    for name, shape in param_shapes(args).items():
        parts = _parts(name, shape, args, family)
        if parts is None:
            raise UserError("%s has no counterpart in a %s checkpoint" % (name, family))
        out[name] = parts
    return out


def _parts(name, shape, args, family):
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], shape, "same", None)]
    _, i, module, rest = name.split(".", 3)
    p = "model.layers.%s." % i
    if module in ("attention_norm", "ffn_norm"):
        return [(p + ("input_layernorm" if module == "attention_norm" else "post_attention_layernorm") + ".weight",
                 shape, "same", None)]
    if module == "attention":
        proj, kind = rest.split(".")
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads, "q_norm": 1, "k_norm": 1}.get(proj)
        hf = p + "self_attn." + _ATTN.get(proj, proj) + "." + kind
        return [(hf, shape, "perm" if heads else "same", heads)]
    moe = layer_widths(args, int(i))                     # (expert widths, shared width) or None
    if moe is None:                                      # dense FFN: feed_forward.w1.weight
        return [(p + "mlp.%s.weight" % _DENSE[rest.split(".")[0]], shape, "same", None)]
    if family not in _MOE_PREFIX:
        return None
    m = p + _MOE_PREFIX[family] + "."
    d = args.dim
    if rest == "router.gate.weight":
        return [(m + "gate.weight", shape, "same", None)]
    if rest.startswith("experts."):
        w = rest.split(".")[1]
        offs = np.concatenate([[0], np.cumsum(moe[0])])
        names = _EXPERT[family]
        return [(m + "experts.%d.%s.weight" % (e, names[w]), (d, b - a) if w == "w2" else (b - a, d),
                 "rows_t" if w == "w2" else "rows", (int(a), int(b))) for e, (a, b) in enumerate(zip(offs, offs[1:]))]
    if family == "qwen2_moe" and rest.startswith("shared."):
        if rest == "shared.gate.weight":
            return [(m + "shared_expert_gate.weight", shape, "same", None)]
        w = rest.split(".")[1]
        rows = shape[0]
        return [(m + "shared_expert.%s.weight" % _DENSE[w], (d, rows) if w == "w2" else (rows, d),
                 "rows_t" if w == "w2" else "rows", (0, rows))]
    return None


def zero_tensors(args, family):
    """{hf name: shape} that a family's file holds but our model has not, all zeros: o_proj biases (HF's
    attention_bias also biases o_proj), Qwen2-MoE q/k/v biases of a bias-free model, a zero shared expert."""
    out = {}
    d, hd = args.dim, args.head_dim
    for i in range(args.n_layers):
        p = "model.layers.%d." % i
        if family in ("llama", "qwen3") and args.attn_bias:
            out[p + "self_attn.o_proj.bias"] = (d,)
        if family == "qwen2_moe" and not args.attn_bias:
            out.update({p + "self_attn.q_proj.bias": (args.n_heads * hd,),
                        p + "self_attn.k_proj.bias": (args.n_kv_heads * hd,),
                        p + "self_attn.v_proj.bias": (args.n_kv_heads * hd,)})
        moe = layer_widths(args, i)
        if family == "qwen2_moe" and moe is not None and not moe[1]:
            m = p + "mlp."
            out.update({m + "shared_expert.gate_proj.weight": (1, d), m + "shared_expert.up_proj.weight": (1, d),
                        m + "shared_expert.down_proj.weight": (d, 1), m + "shared_expert_gate.weight": (1, d)})
    return out


# ------------------------------------------------------------------------------------------------ ours → HF
def to_hf(shapes, fetch, args, family):
    """{hf name: LazyTensor} for our tensors `shapes` ({name: shape}; a subset is fine), fetch(name, rows) giving
    our tensor (rows: a (begin, end) row range or None) as numpy; plus the family's zero tensors when the whole
    model is given."""
    lay = layout(args, family)
    out = {}
    for name in shapes:
        if name not in lay:
            raise UserError("%s has no counterpart in a %s checkpoint" % (name, family))
        for hf, hf_shape, op, arg in lay[name]:
            out[hf] = LazyTensor(hf_shape, _exporter(fetch, name, op, arg))
    if set(shapes) >= set(lay):
        zeros = zero_tensors(args, family)
        out.update({k: LazyTensor(s, lambda s=s: np.zeros(s, np.float32)) for k, s in zeros.items()})
    return out


def _exporter(fetch, name, op, arg):
    if op == "same":
        return lambda: fetch(name, None)
    if op == "perm":
        return lambda: permute_rows(fetch(name, None), arg)
    if op == "rows":
        return lambda: fetch(name, arg)
    return lambda: np.ascontiguousarray(fetch(name, arg).T)


# ------------------------------------------------------------------------------------------------ HF → ours
def from_hf(entries, args, family, source):
    """{our name: LazyTensor} from an HF file's {name: LazyTensor}; every tensor must be used (a tied lm_head and
    stored RoPE tables are ignored), none missing, every shape right, the zero tensors really zero."""
    entries = _unfuse(dict(entries), args, family)
    lay = layout(args, family)
    expected = {hf: shape for parts in lay.values() for hf, shape, _, _ in parts}
    zeros = zero_tensors(args, family)

    def ignored(k):
        return k.endswith("rotary_emb.inv_freq") or (k == "lm_head.weight" and args.tie_word_embeddings)
    unexpected = [k for k in entries if k not in expected and k not in zeros and not ignored(k)]
    if unexpected:
        raise UserError("%s: unexpected tensor %r (not a weight of this %s config%s)" % (
            source, unexpected[0], family, "; %d more" % (len(unexpected) - 1) if len(unexpected) > 1 else ""))
    missing = [k for k in expected if k not in entries]
    if missing:
        more = " (and %d more)" % (len(missing) - 1) if len(missing) > 1 else ""
        raise UserError("%s: missing tensor %r%s for this %s config" % (source, missing[0], more, family))
    for k, shape in list(expected.items()) + [(k, s) for k, s in zeros.items() if k in entries]:
        if tuple(entries[k].shape) != tuple(shape):
            raise UserError("%s: tensor %r has shape %s, expected %s" % (source, k, tuple(entries[k].shape),
                                                                         tuple(shape)))
    for k in zeros:
        if k in entries and np.any(entries[k].load() != 0):
            raise UserError("%s: tensor %r is not zero: our %s model has no such parameter" % (source, k, family))
    return {name: _importer(entries, parts, shape) for (name, parts), shape
            in zip(lay.items(), param_shapes(args).values())}


def _importer(entries, parts, shape):
    hf, _, op, arg = parts[0]
    if op == "same":
        return entries[hf].then(lambda w: w, shape)
    if op == "perm":
        return entries[hf].then(lambda w: permute_rows(w, arg, inverse=True), shape)

    def stack():
        out = np.empty(shape, np.float32)
        for name, _, kind, (a, b) in parts:
            w = entries[name].load()
            out[a:b] = w.T if kind == "rows_t" else w
        return out
    return LazyTensor(shape, stack)


def _unfuse(entries, args, family):
    """transformers 5 can save experts fused (`mlp.experts.gate_up_proj` [E, 2F, d], `mlp.experts.down_proj`
    [E, d, F], Mixtral's router as `mlp.gate`): give them the per-expert names the layout uses."""
    if family not in _MOE_PREFIX:
        return entries
    names = _EXPERT[family]
    for i in args.moe_layer_ids():
        p = "model.layers.%d.mlp." % i
        m = "model.layers.%d.%s." % (i, _MOE_PREFIX[family])
        if family == "mixtral" and p + "gate.weight" in entries:
            entries[m + "gate.weight"] = entries.pop(p + "gate.weight")
        gu, down = entries.pop(p + "experts.gate_up_proj", None), entries.pop(p + "experts.down_proj", None)
        for fused, items in ((gu, ("w1", "w3")), (down, ("w2",))):
            if fused is None:
                continue
            E, rows, cols = fused.shape
            for e in range(E):
                for j, w in enumerate(items):
                    n = rows // len(items)
                    sl = (lambda x, e=e, j=j, n=n: x[e, j * n:(j + 1) * n])
                    entries[m + "experts.%d.%s.weight" % (e, names[w])] = fused.then(sl, (n, cols))
    return entries
