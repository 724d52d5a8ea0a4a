"""The `evaluate` stage: perplexity of the dense model and of the converted one when each token uses k of the E
expert groups, for k/E ∈ {12.5, 25, 50, 100 %} and each selection method (selectors.py), on held-out text.

Retained quality = ppl_dense / ppl_moe = exp(loss_dense − loss_moe) (1.0 = nothing lost). With the unweighted
sum (`convert --weighting none`) k = E reproduces the dense model, so every method retains 1.0 there; the curve
below it is how much of the FFN a method can skip. Batches come from the caller ({"tokens", "labels",
"token_mask"} numpy dicts with their target counts); under mpirun each rank brings its shard and `reduce` sums
(loss·tokens, tokens) over ranks once per evaluation. With `moefy.py evaluate --math_sets` each run also scores
the model's generated answers on test sets (the caller's `per_run`), row["math"] = {set: accuracy, "mean": …}.
"""
import math
import time

import numpy as np

from Models.moefication.selectors import METHODS, use_selection
from Utils.errors import UserError
from Utils.runtime import import_jittor

jt = import_jittor()

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def ks_for(num_experts, fractions=FRACTIONS):
    """[(fraction, k)] with k = round(fraction·E) (at least 1), duplicates dropped."""
    out, seen = [], set()
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise UserError("--fractions: %r is not in (0, 1]" % (f,))
        k = max(1, int(round(f * num_experts)))
        if k not in seen:
            seen.add(k)
            out.append((k / num_experts, k))
    return out


def mean_loss(model, batches, reduce=None):
    """Token-weighted mean LM loss over (batch, n_targets) pairs, reduced over ranks by `reduce` if given."""
    total, count = 0.0, 0
    with jt.no_grad():
        for batch, n in batches:
            if n == 0:
                continue
            terms = model.loss_terms({k: jt.array(v) for k, v in batch.items()})
            total += terms["lm"].item() * n
            count += n
    jt.sync_all()
    jt.gc()
    if reduce is not None:
        total, count = reduce([total, count])
    if not count:
        raise UserError("evaluation data: no target tokens")
    return total / count, int(count)


def sweep(moe_model, batches_fn, info, dense_loss, methods=METHODS, fractions=FRACTIONS, reduce=None, seed=0,
          log=None, progress=False, per_run=None):
    """[{method, k, fraction, loss, ppl, retained, seconds}] over methods × k of the converted model (a progress
    bar over the evaluations when `progress`). `per_run(method, k)`, if given, runs inside each run's selection
    after the loss and returns more keys for its row (the accuracy on test sets: {"math": {set: acc, "mean"}})."""
    from tqdm import tqdm
    transformer = moe_model.llama
    layers = transformer.moe_layers()
    if not layers:
        raise UserError("evaluate: the converted checkpoint has no MoE layers")
    E = layers[0][1].n_experts
    rows, cache = [], {}
    runs = [(m, frac, k) for m in methods for frac, k in ks_for(E, fractions)]
    bar = tqdm(total=len(runs), desc="evaluate", disable=not progress, unit="run", dynamic_ncols=True)
    for method, frac, k in runs:
        jt.set_global_seed(seed)   # the random selector draws the same choices on every run
        t0 = time.time()
        with use_selection(transformer, method, k, info, cache):
            loss, _ = mean_loss(moe_model, batches_fn(), reduce)
            extra = per_run(method, k) if per_run is not None else {}
        row = {"method": method, "k": k, "num_experts": E, "fraction": frac, "loss": loss,
               "ppl": math.exp(min(loss, 50.0)), "retained": math.exp(min(dense_loss - loss, 50.0))}
        row.update(extra, seconds=time.time() - t0)
        rows.append(row)
        bar.update(1)
        if log is not None:
            acc = row.get("math")
            log("evaluate: %-12s k=%d/%d (%5.1f%%): loss %.4f ppl %.2f retained %.3f%s"
                % (method, k, E, 100 * frac, loss, row["ppl"], row["retained"],
                   (" accuracy %.3f" % acc["mean"]) if acc else ""))
    bar.close()
    return rows


def summary_table(rows):
    """{method: {fraction: retained}} for quick reading and plotting."""
    out = {}
    for r in rows:
        out.setdefault(r["method"], {})[round(r["fraction"], 6)] = r["retained"]
    return out


def accuracy_table(rows):
    """{method: {fraction: mean accuracy on the test sets}} of the rows that carry it."""
    out = {}
    for r in rows:
        if r.get("math"):
            out.setdefault(r["method"], {})[round(r["fraction"], 6)] = r["math"]["mean"]
    return out


def activation_stats(h, top=0.1):
    """How concentrated one layer's activations are (MoEfication's premise): the share of exact zeros, and the
    share of each token's Σh² held by its top `top` fraction of neurons (averaged over tokens)."""
    h = np.asarray(h, dtype=np.float64)
    if h.size == 0:
        return {"zero_fraction": float("nan"), "top_mass": float("nan")}
    sq = np.sort(h * h, axis=1)[:, ::-1]
    n = max(1, int(round(top * h.shape[1])))
    total = sq.sum(1)
    keep = total > 0
    return {"zero_fraction": float((h == 0).mean()), "top_fraction": top,
            "top_mass": float((sq[keep, :n].sum(1) / total[keep]).mean()) if keep.any() else float("nan")}
