"""Adapter files shared with the PyTorch original (docs/moa.md §5.4–5.5, D11): `adapter.pth` with the reference's key
names (prefixed `llama.`) plus `adapter_params.json` beside it.

We write `adapter.pth` in PyTorch's zip format without torch (Utils.checkpoint_io), so `torch.load` reads our
files and we read theirs; keys are identical in both directions, no renaming. One exception on reading: our own
Top-K / AdaMoLE files written before the modules moved up to `lora_X` carry an extra `.expert.` level, which is
dropped (`current_names`).

The official `MoA_Transformers` port (HF peft layout, docs/moa_transformers_notes.md) also loads: a directory (or
file) with `adapter_model.bin` and `adapter_config.json`. Its keys are renamed to ours, the configuration is read off
the tensors (its JSON does not say soft or sparse, rank, router size or threshold), and the rows of `lora_Q.lora_B` /
`lora_K.lora_B` are permuted from HF's rotate-half RoPE layout to our interleaved one, as the base's wq/wk are.
"""
import json
import os
import re

import numpy as np

from Utils.errors import UserError

ADAPTER_FILE = "adapter.pth"
PARAMS_FILE = "adapter_params.json"
MT_FILE, MT_CONFIG = "adapter_model.bin", "adapter_config.json"   # MoA_Transformers (peft's names)

# adapter_params.json keys of the reference that carry no meaning here (accepted and ignored).
IGNORED_KEYS = {"flash_attention2", "bf16", "expert_weight", "lb_loss", "max_batch_size", "adapter_noisy", "w_lora"}
OUR_KEYS = {"routing", "w_bias", "lora_layers", "lora_rank", "lora_targets", "lora_alpha", "swi_x",
            "p_adapter_layers", "p_adapter_size", "p_adapter_hydra", "prompt_layers", "prompt_len", "max_seq_len",
            "expert_num", "hydra_moe", "max_threshold", "const_threshold", "threshold_grad", "router_input", "top_k",
            "lb_loss_coeff", "noisy_router"}
# Block-level keys the sparse_moe reference creates but docs/moa.md §3.6 does not use: ignored when loading
# topk/adamole.
SPARSE_MOE_UNUSED = ("adapter_type_router", "adapter_threshold_fn", "adapter_noise_linear")
_BLOCK_UNUSED = re.compile(r"^llama\.layers\.\d+\.(%s)\." % "|".join(SPARSE_MOE_UNUSED))
# The Top-K / AdaMoLE module of a target sits at `lora_X` (reference layout): its router, AdaMoLE's threshold,
# and the extra `.expert.` level of our files from before that layout.
_TARGET = r"(\.lora_(?:Q|K|V|O|UP|GATE|DOWN))\."
_TOPK_KEY = re.compile(_TARGET + r"router\.topkroute_linear\.")
_ADAMOLE_KEY = re.compile(_TARGET + r"threshold_fn\.")
_OLD_SPARSE_MOE = re.compile(_TARGET + r"expert\.")
_EXPERT_INDEX = re.compile(_TARGET + r"experts\.(?P<e>\d+)\.")


def _resolve(path):
    """A file, or a directory holding adapter.pth (or MoA_Transformers' adapter_model.bin) → (weights file, its
    JSON: adapter_params.json, or adapter_config.json beside adapter_model.bin)."""
    if os.path.isdir(path):
        f = os.path.join(path, ADAPTER_FILE)
        if not os.path.isfile(f) and os.path.isfile(os.path.join(path, MT_FILE)):
            f = os.path.join(path, MT_FILE)
        if not os.path.isfile(f):
            raise UserError("%s: no %s (or MoA_Transformers' %s) in this directory" % (path, ADAPTER_FILE, MT_FILE))
    elif not os.path.isfile(path):
        raise UserError("%s: adapter file not found" % path)
    else:
        f = path
    config = MT_CONFIG if is_moa_transformers(f) else PARAMS_FILE
    return f, os.path.join(os.path.dirname(os.path.abspath(f)), config)


def is_moa_transformers(weights):
    return os.path.basename(weights) == MT_FILE


def adapter_params_path(path):
    """The adapter_params.json that goes with an adapter file or directory."""
    return _resolve(path)[1]


def current_names(state):
    """Adapter names as this code writes them: `lora_X.expert.<rest>` (our Top-K / AdaMoLE files before the
    module moved up to `lora_X`, as in the reference) → `lora_X.<rest>`; every other key unchanged."""
    return {_OLD_SPARSE_MOE.sub(r"\1.", k): v for k, v in state.items()}


def read_adapter_state(path):
    from Utils import checkpoint_io
    weights, _ = _resolve(path)
    state = checkpoint_io.read_torch_pth(weights)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError("%s: expected a flat {name: tensor} dict of adapter weights" % weights)
    if is_moa_transformers(weights):
        from Models.moa_transformers import our_names
        return our_names(state, weights)
    if "model" in state and isinstance(state["model"], dict):  # a full training checkpoint of the reference
        state = {k: v for k, v in state["model"].items() if any(s in k for s in ("lora", "prompt", "adapter"))}
    return current_names(state)


def infer_routing(keys):
    """Which variant wrote these keys, when adapter_params.json does not say (docs/moa.md §0 variants)."""
    keys = list(current_names(dict.fromkeys(keys)))
    has = lambda s: any(s in k for k in keys)  # noqa: E731
    if any(_TOPK_KEY.search(k) for k in keys):
        return "topk_moe"
    if any(_ADAMOLE_KEY.search(k) for k in keys):
        return "adamole"
    if has("adapter_threshold_fn"):
        return "sparse_moa"
    if has(".lora_gate.") or has(".p_adapter_gate."):
        return "unipeft"
    if has("adapter_type_router"):
        return "soft_moa"
    return "soft_moe"


def config_from_reference(params, source):
    """Reference adapter_params.json → ModelArgs overrides (names mapped, dead keys dropped, unsupported refused)."""
    cfg = {}
    for k, v in params.items():
        if k in IGNORED_KEYS:
            continue
        if k == "num_experts":
            cfg["expert_num"] = int(v)
        elif k == "moe_type":
            cfg["routing"] = {"adamole": "adamole", "topk": "topk_moe"}.get(v) or _bad(source, k, v, "adamole|topk")
        elif k == "adamole":
            if v is True or str(v).lower() == "true":
                cfg["routing"] = "adamole"
        elif k in ("bool_weights", "asym"):
            if v:
                raise UserError("%s: %s=true is not supported (dead or unported option of the reference)" % (source, k))
        elif k in OUR_KEYS:
            cfg[k] = v
        else:
            raise UserError("%s: unknown key %r" % (source, k))
    if cfg.get("routing") in ("topk_moe", "adamole") and "top_k" not in cfg:
        cfg["top_k"] = 1
    return cfg


def _bad(source, key, value, expected):
    raise UserError("%s: %s=%r (expected %s)" % (source, key, value, expected))


def load_adapter_config(path, routing=None):
    """ModelArgs overrides from the adapter_params.json beside an adapter file (or inside its directory)."""
    weights, params_path = _resolve(path)
    if is_moa_transformers(weights):
        from Models.moa_transformers import infer_config
        cfg = infer_config(read_adapter_state(weights), weights, params_path)
        return dict(cfg, routing=routing) if routing else cfg
    if not os.path.isfile(params_path):
        raise UserError("%s: missing %s beside the adapter file" % (os.path.dirname(params_path) or ".", PARAMS_FILE))
    try:
        with open(params_path) as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError("%s: not valid JSON (%s)" % (params_path, e))
    if not isinstance(params, dict):
        raise UserError("%s: expected a JSON object" % params_path)
    cfg = config_from_reference(params, params_path)
    keys = []

    def stored_keys():  # the weights file is read only when the JSON leaves something open
        if not keys:
            keys.extend(read_adapter_state(weights))
        return keys
    if routing:
        cfg["routing"] = routing
    elif "routing" not in cfg:
        cfg["routing"] = infer_routing(stored_keys())
    if cfg["routing"] in ("topk_moe", "adamole") and "expert_num" not in cfg:
        cfg["expert_num"] = count_experts(stored_keys()) or 1  # the reference's sparse_moe does not save it (§5.4)
    return cfg


def count_experts(keys):
    """E of a Top-K / AdaMoLE file: 1 + the highest `experts.<e>` index in its key names (0 when there is none)."""
    found = [int(m.group("e")) for m in map(_EXPERT_INDEX.search, keys) if m]
    return max(found) + 1 if found else 0


def load_adapter_weights(model, path):
    """Load adapter weights into `model` strictly: every adapter parameter must be present, no stranger keys."""
    from Utils.runtime import import_jittor
    jt = import_jittor()
    weights, _ = _resolve(path)
    state = read_adapter_state(weights)
    if is_moa_transformers(weights):
        from Models.moa_transformers import to_interleaved
        state = to_interleaved(state, model.args, weights)
    if model.args.routing in ("topk_moe", "adamole"):
        state = {k: v for k, v in state.items() if not _BLOCK_UNUSED.match(k)}
    params = dict(model.trainable_parameters())
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected:
        raise UserError("%s: unexpected tensor %r (%d in all) for routing %s" % (weights, unexpected[0], len(unexpected),
                                                                           model.args.routing))
    if missing:
        raise UserError("%s: missing tensor %r (%d in all) for routing %s" % (weights, missing[0], len(missing),
                                                                        model.args.routing))
    for name, value in state.items():
        p = params[name]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(p.shape):
            raise UserError("%s: tensor %r has shape %s but the model expects %s"
                            % (weights, name, tuple(value.shape), tuple(p.shape)))
        p.update(jt.array(value.astype(np.float32)))
    return model


def save_adapter(model, out_dir, extra_params=None):
    """Write `<out_dir>/adapter.pth` (reference key names, fp32) and `adapter_params.json`, each atomically."""
    from Utils import checkpoint_io
    os.makedirs(out_dir, exist_ok=True)
    checkpoint_io.write_torch_pth(os.path.join(out_dir, ADAPTER_FILE), model.adapter_state_dict())
    params = model.args.adapter_params()
    params.update(extra_params or {})
    tmp = os.path.join(out_dir, PARAMS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(params, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, PARAMS_FILE))
    return out_dir
