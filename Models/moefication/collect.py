"""The `features` stage: run the dense model over a token stream and store, per layer, the FFN inputs and the
per-neuron activations (padding excluded) in resumable shards, each rank its own share.

`collect_features(model, batches, work_dir, ...)` takes this rank's batches ({"tokens" [B, T], "token_mask" [B, T]}
numpy dicts, the caller's sharding: under mpirun rank r gets rows r, r+W, …) and writes
`features/layer_XXX/rank_RRR/` stores (features.py) with a per-rank token budget (max_tokens split over ranks).
`features/features.json` says what was collected (model fingerprints, activation, layers, world size, budget,
source); a run with other settings on an existing directory is refused unless `overwrite`.

Resume: each store keeps its complete shards after a kill and drops the replayed rows it already holds. Batches
whose tokens every layer already has are not run through the model at all (their rows are fed as placeholders,
which the stores drop by count), so a resumed run only computes what is missing.
"""
import os
import shutil

import numpy as np

from Models.moefication.features import FeatureReader, FeatureWriter, layer_dir
from Models.moefication.hooks import ACTIVATIONS, FFNCapture, model_fingerprints
from Models.moefication.stages import check_model, model_record, read_json, stage_dir, stage_json, write_json
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()

FORMAT = "moefication-feature-set"
IDENTITY = ("format", "activation", "layers", "world_size", "max_tokens", "shard_rows", "dtype", "source", "model")


def _budget(max_tokens, rank, world):
    if max_tokens is None:
        return None
    return max_tokens // world + (1 if rank < max_tokens % world else 0)


def _no_op(*_):
    return None


def collect_features(model, batches, work_dir, layers, activation="product", max_tokens=None, shard_rows=4096,
                     dtype="float16", source=None, rank=0, world=1, overwrite=False, progress=True, total=None,
                     barrier=_no_op, gather=None):
    """Write this rank's feature stores; returns {layer: rows stored by this rank}. Collective under mpirun
    (`barrier()` and `gather(obj)` from Utils.distributed)."""
    from tqdm import tqdm
    transformer = getattr(model, "llama", model)
    args = transformer.args
    if activation not in ACTIVATIONS:
        raise UserError("--activation: expected one of %s, got %r" % ("/".join(ACTIVATIONS), activation))
    if max_tokens is not None and max_tokens < 1:
        raise UserError("--max_tokens: expected a positive number, got %r" % (max_tokens,))
    fps = model_fingerprints(transformer, layers)
    meta = {"format": FORMAT, "version": 1, "activation": activation, "layers": list(layers), "world_size": world,
            "max_tokens": max_tokens, "shard_rows": shard_rows, "dtype": dtype, "source": source,
            "model": model_record(args, fps)}
    path = stage_json(work_dir, "features")
    if overwrite:
        barrier()
        if rank == 0:
            shutil.rmtree(stage_dir(work_dir, "features"), ignore_errors=True)
        barrier()
    elif os.path.isfile(path):  # every rank reads it, so every rank stops on the same line
        old = read_json(path, "features")
        for key in IDENTITY:
            if old.get(key) != meta[key]:
                raise UserError("%s: holds features with %s=%r, this run asks for %r (use --overwrite or another "
                                "--work_dir)" % (path, key, old.get(key), meta[key]))
        if old.get("complete"):
            return {i: None for i in layers}
    barrier()
    if rank == 0:
        write_json(path, dict(meta, complete=False))
    barrier()

    budget = _budget(max_tokens, rank, world)
    root = stage_dir(work_dir, "features")
    d, d_ff = args.dim, args.ffn_hidden_dim
    writers = {i: FeatureWriter(layer_dir(root, i, rank), d, d_ff, shard_rows=shard_rows, max_tokens=budget,
                                x_dtype=dtype, h_dtype=dtype) for i in layers}
    first = writers[layers[0]]
    bar = tqdm(total=budget or total, initial=min(first.rows, budget or first.rows), disable=not (progress and rank == 0),
               unit="tok" if budget else "batch", desc="features", dynamic_ncols=True)
    placeholder = {"x": np.zeros((1, d), np.float32), "h": np.zeros((1, d_ff), np.float32)}
    with jt.no_grad():
        for batch in batches:
            if all(w.full for w in writers.values()):
                break
            mask = np.asarray(batch["token_mask"], dtype=bool)
            n = int(mask.sum())
            before = first.rows
            if all(w.skip_remaining >= n for w in writers.values()):
                # Already on disk for every layer: no forward, the stores drop these rows by count.
                for w in writers.values():
                    w.add(np.broadcast_to(placeholder["x"], (n, d)), np.broadcast_to(placeholder["h"], (n, d_ff)))
            else:
                with FFNCapture(transformer, layers, activation) as cap:
                    transformer.hidden_states(jt.array(np.asarray(batch["tokens"], dtype=np.int32)))
                    got = cap.pop()
                for i, w in writers.items():
                    x, h = got[i][0]
                    w.add(x, h, mask)
                jt.sync_all()
            bar.update(first.rows - before if budget else 1)
    bar.close()
    for w in writers.values():
        w.close()
    rows = {i: w.rows for i, w in writers.items()}
    parts = gather(rows) if (gather is not None and world > 1) else [rows]
    barrier()
    if rank == 0:
        write_json(path, dict(meta, complete=True, rows={str(i): [p[i] for p in parts] for i in layers}))
    barrier()
    return rows


def load_feature_meta(work_dir, args=None, fingerprints=None):
    """features.json (complete), checked against the model when given."""
    path = stage_json(work_dir, "features")
    meta = read_json(path, "features")
    if meta.get("format") != FORMAT:
        raise UserError("%s: not a MoEfication feature set" % path)
    if not meta.get("complete"):
        raise UserError("%s: the features run did not finish (run `moefy.py features` again to resume)" % path)
    if args is not None:
        check_model(meta, path, args, fingerprints or {})
    return meta


def load_features(work_dir, layer, max_rows=None, meta=None):
    """(x [n, d], h [n, d_ff]) float32 of one layer, ranks in order (their shares concatenated)."""
    meta = meta or load_feature_meta(work_dir)
    if layer not in meta["layers"]:
        raise UserError("%s: has no features of layer %d (layers %s)" % (stage_json(work_dir, "features"), layer,
                                                                          meta["layers"]))
    root = stage_dir(work_dir, "features")
    xs, hs, n = [], [], 0
    for r in range(meta["world_size"]):
        if max_rows is not None and n >= max_rows:
            break
        path = layer_dir(root, layer, r)
        if not os.path.isdir(path):
            raise UserError("%s: missing feature store (features.json lists %d ranks)" % (path, meta["world_size"]))
        x, h = FeatureReader(path).load(None if max_rows is None else max_rows - n)
        xs.append(x)
        hs.append(h)
        n += x.shape[0]
    return np.concatenate(xs).astype(np.float32), np.concatenate(hs).astype(np.float32)


def iter_layer_activations(work_dir, layer, meta=None):
    """h shards of one layer one at a time (float32), for streaming consumers such as the co-activation graph."""
    meta = meta or load_feature_meta(work_dir)
    root = stage_dir(work_dir, "features")
    for r in range(meta["world_size"]):
        reader = FeatureReader(layer_dir(root, layer, r))
        for i in range(len(reader)):
            yield np.asarray(reader.shard(i, mmap=True)[1], dtype=np.float32)
