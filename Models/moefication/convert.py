"""The `convert` stage: write the MoE checkpoint a split and its trained gates define, in our own format
(params.json with a "moe" section + consolidated.00.pth + the tokenizer files), which `LLaMA_adapter.from_pretrained`
loads like any other checkpoint.

Per converted layer i, with the split's labels and S_e the neurons of expert e in increasing order:

    layers.i.feed_forward.experts.w1 = W1[S_0; S_1; …]        rows of the gate projection   [d_ff, d]
    layers.i.feed_forward.experts.w3 = W3[S_0; S_1; …]        rows of the up projection     (gated FFNs)
    layers.i.feed_forward.experts.w2 = W2[:, S_0; S_1; …]ᵀ    columns of the down projection, stored as rows
    layers.i.feed_forward.router.w1.weight = the gate's W1 [E, d];  router.w2.weight = the gate's W2 [E, E]

— the layout of `Models.moe.experts.Experts.from_dense(w1, w3, w2, E, partition=labels)`, so Σ_e expert_e = the
dense FFN. Everything else is copied. The MoE section: router "mlp" (tanh, hidden E, no bias), expert_sizes
d_ff/E each, the dense FFN's activation and gating, top_k = num_selects, and the weighting:

    weighting "none"     scoring "topk_unweighted": the k experts are summed (× score_scale, default 1): the dense
                         FFN with the other groups' neurons masked — k = E gives the dense model back exactly;
    weighting "softmax"  scoring "topk_softmax": softmax over the k kept router logits (llama-moe's
                         gate_use_softmax), × score_scale (default E/k, llama-moe's recommendation).

`moefication.json` beside the weights records where the experts and routers came from (split, gate, activation
and criterion), which `evaluate` needs for its ground-truth and similarity selectors. Without trained gates
(`use_gate=False`) the routers are the gate's initialisation: normalised centroids, then the identity.
"""
import json
import os
import shutil

import numpy as np

from Models.checkpoints import tokenizer_dir_files, write_dir_atomically
from Models.model_args import ModelArgs
from Models.moe.config import MoEConfig
from Models.moefication.gate import centroid_init, load_gate
from Models.moefication.split import permutation
from Models.moefication.stages import as_array, ffn_weights, load_split, read_json, state_fingerprints
from Utils.checkpoint_io import write_torch_pth
from Utils.errors import UserError

WEIGHTINGS = ("none", "softmax")
INFO = "moefication.json"


def expert_tensors(w1, w3, w2, labels):
    """Stacked expert weights (w1, w3 or None, w2 [d_ff, d]) of a dense FFN sliced by labels (neurons of expert 0
    first, each group in increasing index)."""
    perm = permutation(labels)
    return (np.ascontiguousarray(w1[perm]), None if w3 is None else np.ascontiguousarray(w3[perm]),
            np.ascontiguousarray(w2.T[perm]))


def moe_config(args, num_experts, num_selects, layers, weighting="none", score_scale=None):
    if weighting not in WEIGHTINGS:
        raise UserError("--weighting: expected none or softmax, got %r" % (weighting,))
    if not 1 <= num_selects <= num_experts:
        raise UserError("--num_selects: expected 1..%d (the number of experts), got %r" % (num_experts, num_selects))
    if score_scale is None:
        score_scale = 1.0 if weighting == "none" else num_experts / num_selects
    size = args.ffn_hidden_dim // num_experts
    return MoEConfig(num_experts=num_experts, top_k=num_selects, layers=tuple(layers),
                     expert_sizes=(size,) * num_experts, hidden_act=args.hidden_act, gated=bool(args.ffn_gated),
                     router="mlp", router_hidden=num_experts, router_act="tanh", router_bias=False,
                     scoring="topk_unweighted" if weighting == "none" else "topk_softmax",
                     score_scale=float(score_scale))


def converted_state(args, state, labels, routers):
    """Our-name state of the MoE model: dense FFNs of the split layers replaced by experts + routers (numpy)."""
    out = {}
    for name in list(state):
        parts = name.split(".")
        layer = int(parts[1]) if name.startswith("layers.") and parts[2] == "feed_forward" else None
        if layer is None or layer not in labels:
            out[name] = as_array(state[name])
            continue
        if parts[3] != "w1":
            continue  # w2/w3 are taken with w1
        w1, w3, w2 = ffn_weights(state, layer)
        e1, e3, e2 = expert_tensors(w1, w3, w2, labels[layer])
        p = "layers.%d.feed_forward." % layer
        out[p + "router.w1.weight"] = routers[layer]["w1"]
        out[p + "router.w2.weight"] = routers[layer]["w2"]
        out[p + "experts.w1"] = e1
        if e3 is not None:
            out[p + "experts.w3"] = e3
        out[p + "experts.w2"] = e2
    return out


def convert(args, state, work_dir, out_dir, model_dir=None, num_selects=None, weighting="none", score_scale=None,
            use_gate=True, log=print):
    """Write the converted checkpoint to out_dir; returns its ModelArgs."""
    split_meta, labels = load_split(work_dir)
    fps = state_fingerprints(state, split_meta["layers"])
    load_split(work_dir, args, fps)
    E = split_meta["num_experts"]
    info = {"format": "moefication-converted", "version": 1, "source": model_dir, "weighting": weighting,
            "split": {k: v for k, v in split_meta.items() if k != "model"}, "model": split_meta["model"]}
    if use_gate:
        gate_meta, routers = load_gate(work_dir, split_meta)
        num_selects = gate_meta["num_selects"] if num_selects is None else num_selects
        info["gate"] = {k: gate_meta[k] for k in ("criterion", "loss", "l2_threshold", "num_selects", "metrics")}
    else:
        if num_selects is None:
            raise UserError("--num_selects: needed when converting without trained gates")
        routers = {}
        for i in split_meta["layers"]:
            w1, w3, _ = ffn_weights(state, i)
            template = w1 if split_meta["template"] == "gate" else w3
            routers[i] = {"w1": centroid_init(template, labels[i], E), "w2": np.eye(E, dtype=np.float32)}
        info["gate"] = None
    feats = os.path.join(work_dir, "features", "features.json")
    info["activation"] = read_json(feats).get("activation") if os.path.isfile(feats) else None
    cfg = moe_config(args, E, num_selects, split_meta["layers"], weighting, score_scale)
    params = dict(args.base_params(), moe=cfg.to_dict())
    moe_args = ModelArgs.create(params, source="convert")
    new_state = converted_state(args, state, labels, routers)
    toks = tokenizer_dir_files(model_dir) if model_dir else []

    def write(tmp):
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(moe_args.base_params(), f, indent=2)
        write_torch_pth(os.path.join(tmp, "consolidated.00.pth"), new_state)
        for f in toks:
            shutil.copyfile(f, os.path.join(tmp, os.path.basename(f)))
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
    write_dir_atomically(out_dir, write)
    log("convert: %d layers -> %d experts of %d neurons, top-%d, weighting %s (score_scale %g) -> %s"
        % (len(split_meta["layers"]), E, args.ffn_hidden_dim // E, num_selects, weighting, cfg.score_scale, out_dir))
    return moe_args


def read_info(ckpt_dir):
    """moefication.json of a converted checkpoint (what evaluate's selectors need)."""
    path = os.path.join(ckpt_dir, INFO)
    info = read_json(path, "converted")
    if info.get("format") != "moefication-converted":
        raise UserError("%s: not written by `moefy.py convert`" % path)
    return info
