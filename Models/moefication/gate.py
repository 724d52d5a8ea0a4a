"""The `gate` stage: one router per layer learns, from the dense model's own activations, which expert groups
matter for a token (MOE_SPEC §4(a).3, llama-moe's "MLP gate" and thunlp's MLP selection).

The router is the MoE core's `MLPRouter` itself — z = W2·tanh(W1 x), W1 [E, d] and W2 [E, E] without biases — so
`convert` copies its two weights into the converted checkpoint unchanged. Initialisation: W1 = the L2-normalised
centroid of each expert's normalised template rows, W2 = the identity (so z_e starts as tanh of x's agreement with
group e's direction). Targets come from the stored activations h through a criterion (criteria.py):

    loss "bce_topk"     binary top-k targets, BCE with logits               (llama-moe HEAD, the default)
    loss "bce_soft"     s / max s over the training tokens, clipped to [0, 1], BCE  (thunlp)
    loss "bce_raw"      the raw scores s as BCE targets                     (the seed's default)
    loss "bce_softmax"  softmax(s) as BCE targets                           (the seed's --use_softmax)
    loss "kl"           KL(softmax(s) ‖ softmax(z)), batch mean             (llama-moe HEAD)

A seeded split keeps `val_fraction` of the tokens for validation; after every epoch the router's top-k recall on
them is measured and the best epoch's weights are kept (the seed keeps the best validation accuracy). Metrics per
layer: recall@k and coverage (the share of the true activation mass the router's top-k captures, thunlp's
metric) for the trained router and, at step 0, for the centroid initialisation and for a random one.

The optimizer is handed in (`make_optimizer(named_params, lr)`, the engine's AdamW from the entry point: Models/
never imports engine/).
"""
import math

import numpy as np

from Models.moe.routers import MLPRouter
from Models.moefication.criteria import CRITERIA, coverage, expert_scores, recall_at_k, topk_indices, topk_targets
from Models.moefication.split import expert_centroids
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()

LOSSES = ("bce_topk", "bce_soft", "bce_raw", "bce_softmax", "kl")
SPLIT_KEYS = ("method", "template", "metric", "seed", "num_experts", "labels_sha")  # what ties a gate to its split


def _softmax_np(s):
    z = s - s.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def targets_for(loss, scores, k, scale=None):
    """Float32 targets [N, E] of a loss from criterion scores; `scale` is bce_soft's divisor (from training rows)."""
    if loss == "bce_topk":
        return topk_targets(scores, k)
    if loss == "bce_soft":
        return np.clip(scores / scale, 0.0, 1.0).astype(np.float32)
    if loss == "bce_raw":
        return scores.astype(np.float32)
    if loss in ("bce_softmax", "kl"):
        return _softmax_np(scores).astype(np.float32)
    raise UserError("--loss: expected one of %s, got %r" % ("/".join(LOSSES), loss))


def loss_value(loss, z, t):
    """Scalar loss of router logits z [n, E] against targets t [n, E] (both fp32 Vars)."""
    if loss == "kl":
        logq = z - z.max(1, keepdims=True)
        logq = logq - jt.log(jt.exp(logq).sum(1, keepdims=True))
        logt = jt.log(jt.maximum(t, 1e-30))  # a normal floor: fast-math log of a denormal (JITTOR_NOTES)
        return (t * (logt - logq)).sum() / z.shape[0]
    # BCE with logits, stable form: max(z, 0) − z·t + log(1 + exp(−|z|)); the log argument is in [1, 2].
    return (jt.maximum(z, 0.0) - z * t + jt.log(1.0 + jt.exp(-jt.abs(z)))).mean()


def centroid_init(template, labels, num_experts):
    """W1 init [E, d]: each expert's centroid of L2-normalised template rows, itself L2-normalised."""
    c = expert_centroids(template, labels, num_experts)
    n = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.where(n > 0, n, 1.0)).astype(np.float32)


def router_logits(router, x, batch=8192):
    """Router logits [N, E] (numpy) of rows x [N, d], in batches, no gradient."""
    out = []
    with jt.no_grad():
        for s in range(0, x.shape[0], batch):
            z = router(jt.array(np.ascontiguousarray(x[s:s + batch], dtype=np.float32)))
            out.append(z.numpy())
    return np.concatenate(out) if out else np.zeros((0, router.n_experts), np.float32)


def _metrics(z, scores, mass, k):
    chosen = topk_indices(z, k)
    return {"recall": recall_at_k(scores, z, k), "coverage": coverage(mass, chosen)}


def train_gate(x, h, labels, num_experts, k, template, make_optimizer, criterion="l2_norm", loss="bce_topk",
               l2_threshold=None, epochs=20, batch_size=1024, lr=0.01, val_fraction=0.05, seed=0, init="centroid",
               log=None, progress=None):
    """Train one layer's router on features x [N, d], activations h [N, d_ff] and split labels; init "centroid"
    (normalised centroids, identity) or "random" (the Linear default, for comparison).

    `progress` names a progress bar over the epochs (None: no bar).
    Returns (weights {"w1": [E, d], "w2": [E, E]} float32 of the best epoch, metrics dict)."""
    if criterion not in CRITERIA:
        raise UserError("--criterion: expected one of %s, got %r" % ("/".join(CRITERIA), criterion))
    if loss not in LOSSES:
        raise UserError("--loss: expected one of %s, got %r" % ("/".join(LOSSES), loss))
    if not 0.0 < val_fraction < 1.0:
        raise UserError("--val_fraction: expected a number in (0, 1), got %r" % (val_fraction,))
    if not 1 <= k <= num_experts:
        raise UserError("--num_selects: expected 1..%d (the number of experts), got %r" % (num_experts, k))
    N, d = x.shape
    n_val = max(1, int(round(N * val_fraction)))
    if N - n_val < 1:
        raise UserError("features: %d tokens are too few to hold out %d for validation" % (N, n_val))
    scores = expert_scores(h, labels, num_experts, criterion, l2_threshold=l2_threshold)
    # Coverage needs a non-negative mass; the signed "plain" criterion is judged by its positive part (thunlp's).
    mass = scores if criterion != "plain" else expert_scores(h, labels, num_experts, "positive")
    order = np.random.default_rng(seed).permutation(N)
    val, train = order[:n_val], order[n_val:]
    scale = max(float(np.abs(scores[train]).max()), 1e-30) if loss == "bce_soft" else None
    targets = targets_for(loss, scores, k, scale)

    jt.set_global_seed(seed)
    random_router = MLPRouter(d, num_experts, num_experts, act="tanh", bias=False)
    centroid_router = MLPRouter(d, num_experts, num_experts, act="tanh", bias=False)
    centroid_router.w1.weight.update(jt.array(centroid_init(template, labels, num_experts)))
    centroid_router.w2.weight.update(jt.array(np.eye(num_experts, dtype=np.float32)))
    metrics = {"train_tokens": int(train.size), "val_tokens": int(n_val), "criterion": criterion, "loss": loss,
               "init": init}
    for name, r in (("random_init", random_router), ("centroid_init", centroid_router)):
        m = _metrics(router_logits(r, x[val]), scores[val], mass[val], k)
        metrics.update({"%s_recall" % name: m["recall"], "%s_coverage" % name: m["coverage"]})
    if init not in ("centroid", "random"):
        raise UserError("--init: expected centroid or random, got %r" % (init,))
    router = centroid_router if init == "centroid" else random_router
    named = [("w1.weight", router.w1.weight), ("w2.weight", router.w2.weight)]
    opt = make_optimizer(named, lr)
    best = {"recall": metrics["%s_init_recall" % init], "epoch": 0,
            "weights": {"w1": router.w1.weight.numpy().copy(), "w2": router.w2.weight.numpy().copy()}}
    rng = np.random.default_rng(seed + 1)
    steps = max(1, math.ceil(train.size / batch_size))
    history = []
    from tqdm import tqdm
    bar = tqdm(range(1, epochs + 1), desc=progress, disable=progress is None, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        perm = train[rng.permutation(train.size)]
        total = 0.0
        for s in range(steps):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            if idx.size == 0:
                continue
            z = router(jt.array(np.ascontiguousarray(x[idx], dtype=np.float32)))
            value = loss_value(loss, z, jt.array(targets[idx]))
            grads = jt.grad(value, [p for _, p in named])
            opt.step({n: g for (n, _), g in zip(named, grads)})
            total += value.item()
        recall = recall_at_k(scores[val], router_logits(router, x[val]), k)
        history.append({"epoch": epoch, "train_loss": total / steps, "val_recall": recall})
        bar.set_postfix(loss="%.4f" % (total / steps), recall="%.3f" % recall)
        if log is not None:
            log("epoch %d: loss %.4f, val recall@%d %.3f" % (epoch, total / steps, k, recall))
        if recall > best["recall"]:
            best = {"recall": recall, "epoch": epoch,
                    "weights": {"w1": router.w1.weight.numpy().copy(), "w2": router.w2.weight.numpy().copy()}}
    bar.close()
    router.w1.weight.update(jt.array(best["weights"]["w1"]))
    router.w2.weight.update(jt.array(best["weights"]["w2"]))
    m = _metrics(router_logits(router, x[val]), scores[val], mass[val], k)
    metrics.update({"val_recall": m["recall"], "val_coverage": m["coverage"], "best_epoch": best["epoch"],
                    "history": history,
                    # what an oracle top-k would cover: the ceiling of the coverage metric
                    "oracle_coverage": coverage(mass[val], topk_indices(scores[val], k))})
    jt.sync_all()
    jt.gc()
    return {k_: v.astype(np.float32) for k_, v in best["weights"].items()}, metrics


def run_gate(args, state, work_dir, num_selects, make_optimizer, criterion="l2_norm", loss="bce_topk",
             l2_threshold=None, epochs=20, batch_size=1024, lr=0.01, val_fraction=0.05, max_tokens=None, seed=0,
             rank=0, world=1, gather=None, log=print, progress=False):
    """Train the routers of every split layer on its features (ranks share the layers; rank 0 writes
    gate/layer_XXX.npz and gate/gate.json). Returns {layer: metrics}."""
    from Models.moefication.collect import load_feature_meta, load_features
    from Models.moefication.stages import (ffn_weights, layer_file, load_split, stage_json, state_fingerprints,
                                           write_atomic, write_json)
    split_meta, labels = load_split(work_dir)
    layers = split_meta["layers"]
    fps = state_fingerprints(state, layers)
    load_split(work_dir, args, fps)                   # refuses a split of another model
    fmeta = load_feature_meta(work_dir, args, fps)     # refuses features of another model
    missing = [i for i in layers if i not in fmeta["layers"]]
    if missing:
        raise UserError("%s: no features of layer %d, which the split has (collect them with --layers)"
                        % (stage_json(work_dir, "features"), missing[0]))
    E = split_meta["num_experts"]
    mine = {}
    for j, i in enumerate(layers):
        if j % world != rank:
            continue
        x, h = load_features(work_dir, i, max_tokens, fmeta)
        w1, w3, _ = ffn_weights(state, i)
        template = w1 if split_meta["template"] == "gate" else w3
        weights, metrics = train_gate(x, h, labels[i], E, num_selects, template, make_optimizer, criterion, loss,
                                      l2_threshold, epochs, batch_size, lr, val_fraction, seed + i,
                                      progress="gate layer %d" % i if progress else None)
        log("gate: layer %d: recall@%d %.3f (centroid init %.3f, random init %.3f), coverage %.3f of %.3f (oracle)"
            % (i, num_selects, metrics["val_recall"], metrics["centroid_init_recall"],
               metrics["random_init_recall"], metrics["val_coverage"], metrics["oracle_coverage"]))
        mine[i] = (weights, metrics)
    results = {}
    for part in (gather(mine) if world > 1 else [mine]):
        results.update(part)
    if rank == 0:
        for i in layers:
            w = results[i][0]
            write_atomic(layer_file(work_dir, "gate", i, "npz"), lambda f, w=w: np.savez(f, w1=w["w1"], w2=w["w2"]))
        write_json(stage_json(work_dir, "gate"), {
            "format": "moefication-gate", "version": 1, "num_experts": E, "num_selects": num_selects,
            "criterion": criterion, "loss": loss, "l2_threshold": l2_threshold, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "val_fraction": val_fraction, "seed": seed, "layers": layers,
            "split": {k: split_meta[k] for k in SPLIT_KEYS},
            "model": split_meta["model"], "metrics": {str(i): results[i][1] for i in layers}})
    return {i: results[i][1] for i in layers}


def load_gate(work_dir, split_meta):
    """(gate.json, {layer: {"w1", "w2"}}) checked against the split they must belong to."""
    from Models.moefication.stages import layer_file, read_json, stage_json
    path = stage_json(work_dir, "gate")
    meta = read_json(path, "gate")
    if meta.get("format") != "moefication-gate":
        raise UserError("%s: not a MoEfication gate file" % path)
    if meta.get("model") != split_meta.get("model"):
        raise UserError("%s: trained for another model than split.json's; run `moefy.py gate` again" % path)
    for key in SPLIT_KEYS:
        if meta.get("split", {}).get(key) != split_meta.get(key):
            raise UserError("%s: trained on another split (%s %r, split.json has %r); run `moefy.py gate` again"
                            % (path, key, meta.get("split", {}).get(key), split_meta.get(key)))
    E, d = meta["num_experts"], split_meta["model"]["dim"]
    weights = {}
    for i in split_meta["layers"]:
        f = layer_file(work_dir, "gate", i, "npz")
        try:
            with np.load(f, allow_pickle=False) as z:
                w = {"w1": np.asarray(z["w1"], np.float32), "w2": np.asarray(z["w2"], np.float32)}
        except (OSError, ValueError, KeyError) as e:
            raise UserError("%s: missing or unreadable gate weights (%s)" % (f, str(e).splitlines()[0]))
        if w["w1"].shape != (E, d) or w["w2"].shape != (E, E):
            raise UserError("%s: router shapes %s and %s, expected (%d, %d) and (%d, %d)"
                            % (f, w["w1"].shape, w["w2"].shape, E, d, E, E))
        weights[i] = w
    return meta, weights
