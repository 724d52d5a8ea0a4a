"""The files MoEfication's stages hand to each other, and the split stage that starts the chain.

A run lives in one work directory:

    split/split.json   + split/layer_000.npy …    labels [d_ff] int64 per layer            (stage `split`)
    features/features.json + features/layer_000/rank_000/…   feature stores (features.py)  (stage `features`)
    gate/gate.json     + gate/layer_000.npz …     router w1 [E, d], w2 [E, E] per layer    (stage `gate`)
    converted/         the MoE checkpoint: params.json + consolidated.00.pth + moefication.json (stage `convert`)
    eval/              results.json + moefication.png                                   (stage `evaluate`)

Each stage's JSON records the model it came from: the shapes and a fingerprint of every dense FFN (a short
sha256 of W1, W3, W2), so a split, feature set or gate made from another model is refused with one line naming the
file. Files are written to a temporary name and renamed; the JSON is written last, so a stage whose JSON exists
is complete.
"""
import json
import os

import numpy as np

from Models.moefication.hooks import layer_fingerprint
from Models.moefication.split import METHODS, METRICS, check_labels, check_num_experts, split_neurons
from Utils.errors import UserError

STAGES = ("split", "features", "gate", "converted", "eval")
TEMPLATES = ("gate", "up")
_NEXT = {"split": "split", "features": "features", "gate": "gate", "converted": "convert", "eval": "evaluate"}


def stage_dir(work_dir, stage):
    return os.path.join(work_dir, stage)


def stage_json(work_dir, stage):
    name = "params.json" if stage == "converted" else "%s.json" % stage
    return os.path.join(stage_dir(work_dir, stage), name)


def write_atomic(path, write, binary=True):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True), binary=False)


def save_npy(path, arr):
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(arr), allow_pickle=False))


def read_json(path, stage=None):
    """A stage's JSON, or one line saying it is missing (and which command makes it) or unreadable."""
    if not os.path.isfile(path):
        hint = " (run `moefy.py %s` first)" % _NEXT[stage] if stage else ""
        raise UserError("%s: missing%s" % (path, hint))
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError("%s: unreadable (%s)" % (path, str(e).splitlines()[0]))
    if not isinstance(obj, dict):
        raise UserError("%s: expected a JSON object" % path)
    return obj


def layer_file(work_dir, stage, layer, ext):
    return os.path.join(stage_dir(work_dir, stage), "layer_%03d.%s" % (int(layer), ext))


# ------------------------------------------------------------------------------------------------ the dense model
def as_array(v):
    """A checkpoint entry (numpy array or lazily read HF tensor) as float32 numpy."""
    return np.asarray(v.load() if hasattr(v, "load") else v, dtype=np.float32)


def ffn_weights(state, layer):
    """(w1 [F, d], w3 [F, d] or None, w2 [d, F]) of one dense layer of a checkpoint state (our names)."""
    p = "layers.%d.feed_forward." % layer
    if p + "w1.weight" not in state:
        raise UserError("layer %d: no dense FFN (%sw1.weight) in the checkpoint; MoEfication needs a dense model"
                        % (layer, p))
    w3 = state.get(p + "w3.weight")
    return as_array(state[p + "w1.weight"]), None if w3 is None else as_array(w3), as_array(state[p + "w2.weight"])


def model_record(args, fingerprints):
    """What a stage file says about its model: shapes, FFN kind and per-layer fingerprints."""
    return {"dim": args.dim, "n_layers": args.n_layers, "d_ff": args.ffn_hidden_dim, "hidden_act": args.hidden_act,
            "ffn_gated": bool(args.ffn_gated), "fingerprints": {str(k): v for k, v in sorted(fingerprints.items())}}


def check_model(meta, path, args, fingerprints):
    """Refuse a stage file made from another model (one line naming the file and the first difference)."""
    rec = meta.get("model", {})
    for key in ("dim", "n_layers", "d_ff", "hidden_act", "ffn_gated"):
        want = getattr(args, "ffn_hidden_dim" if key == "d_ff" else key)
        if rec.get(key) != want:
            raise UserError("%s: made from a model with %s=%r, this model has %r" % (path, key, rec.get(key), want))
    for layer, fp in sorted(fingerprints.items()):
        saved = rec.get("fingerprints", {}).get(str(layer))
        if saved is not None and saved != fp:
            raise UserError("%s: made from other weights (layer %d's FFN fingerprint %s, this model's %s)"
                            % (path, layer, saved, fp))


def state_fingerprints(state, layers):
    return {i: layer_fingerprint(*ffn_weights(state, i)) for i in layers}


def labels_digest(labels):
    """Short sha256 of a split's labels (layer order): a gate trained on one split is refused with another."""
    import hashlib
    h = hashlib.sha256()
    for i in sorted(labels):
        h.update(("%d:" % i).encode())
        h.update(np.ascontiguousarray(labels[i], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def resolve_layers(spec, n_layers, what="--layers"):
    """'all' / None → every layer; '0,2,5' or [0, 2] → those (checked against n_layers)."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    items = spec if isinstance(spec, (list, tuple)) else [s for s in str(spec).split(",") if s.strip()]
    try:
        layers = sorted({int(s) for s in items})
    except ValueError:
        raise UserError("%s: %r is not 'all' or a comma list of layer ids" % (what, spec))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise UserError("%s: %r names no layer or layer %s, the model has %d layers"
                        % (what, spec, bad[0] if bad else "-", n_layers))
    return layers


# ------------------------------------------------------------------------------------------------ split stage
def split_model(args, state, work_dir, num_experts, method="random", template="gate", metric="l2", seed=0,
                layers=None, coactivation=None, rank=0, world=1, gather=None, log=print, **kw):
    """Split each layer's neurons into E equal groups and save the labels (rank 0 writes; ranks share the layers).

    `coactivation(layer)` gives the graph split its matrix or accumulator; `gather(obj)` is the collective that
    returns every rank's obj (Utils.distributed.gather_objects) when world > 1.
    """
    if method not in METHODS:
        raise UserError("--method: expected one of %s, got %r" % ("/".join(METHODS), method))
    if template not in TEMPLATES:
        raise UserError("--template: expected gate or up, got %r" % (template,))
    if template == "up" and not args.ffn_gated:
        raise UserError("--template up: this model's FFN is not gated (no W3/up projection); use --template gate")
    if metric not in METRICS:
        raise UserError("--metric: expected l2 or cos, got %r" % (metric,))
    d_ff = args.ffn_hidden_dim
    check_num_experts(d_ff, num_experts, "--num_experts")
    layers = resolve_layers(layers, args.n_layers)
    mine, fps = {}, {}
    for j, i in enumerate(layers):
        w1, w3, w2 = ffn_weights(state, i)
        fps[i] = layer_fingerprint(w1, w3, w2)
        if j % world != rank:
            continue
        co = coactivation(i) if method == "graph" else None
        mine[i] = split_neurons(method, num_experts, template=w1 if template == "gate" else w3, seed=seed + i,
                                metric=metric, coactivation=co, **kw)
        log("split: layer %d -> %d experts of %d neurons (%s)" % (i, num_experts, d_ff // num_experts, method))
    labels = {}
    for part in (gather(mine) if world > 1 else [mine]):
        labels.update(part)
    if rank == 0:
        for i in layers:
            save_npy(layer_file(work_dir, "split", i, "npy"), labels[i])
        write_json(stage_json(work_dir, "split"), {
            "format": "moefication-split", "version": 1, "method": method, "template": template, "metric": metric,
            "seed": seed, "num_experts": num_experts, "expert_size": d_ff // num_experts, "layers": layers,
            "labels_sha": labels_digest(labels), "model": model_record(args, fps)})
    return labels


def load_split(work_dir, args=None, fingerprints=None):
    """(split.json dict, {layer: labels}) checked against the model when args/fingerprints are given."""
    path = stage_json(work_dir, "split")
    meta = read_json(path, "split")
    if meta.get("format") != "moefication-split":
        raise UserError("%s: not a MoEfication split file" % path)
    if args is not None:
        check_model(meta, path, args, fingerprints or {})
        check_num_experts(args.ffn_hidden_dim, meta["num_experts"], "%s: num_experts" % path)
    labels = {}
    for i in meta["layers"]:
        f = layer_file(work_dir, "split", i, "npy")
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError("%s: missing or unreadable split labels (%s)" % (f, str(e).splitlines()[0]))
        labels[i] = check_labels(arr, meta["num_experts"], meta["model"]["d_ff"], what=f)
    return meta, labels
