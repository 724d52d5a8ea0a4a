"""Router statistics and per-token case dumps (docs/moa.md §9.1, §9.2, D10): `type_weight.pkl` and `token_weight.pkl`.

`RoutingCollector` is the `on_step` hook of one `model.generate` call: after every forward (prefill chunk, then one
token per step) it keeps `get_routing_records(model)`. When the call returns, the accumulators turn those records
into the two dump files, both plain pickles of dicts / lists of numpy arrays, read back with
`Utils.safe_pickle.load` (which refuses anything else, so a dump handed to a colleague cannot run code).

type_weight.pkl (`TypeWeightStats`, reference `route_stats.pth`)::

    {"routing": str,                                   # ModelArgs.routing of the model that was run
     "labels": {layer: [str, ...]},                    # column names of sum_weights, e.g. LoRA-Q ... PAdapter
     "layers": {layer: {"sum_weights": np.float64[n],  # Σ over processed tokens of the type weights
                        "sum_threshold": float,        # sparse MoA only: Σ Γ
                        "sum_experts": int}},          # sparse MoA only: Σ number of active types per token
     "token_num": int,                                 # N: processed tokens counted in every sum
     "expert_sums": {layer: {module path: np.float64[E]}},  # multi-expert modules (MoLoRA/Hydra/Top-K/AdaMoLE)
     "num_examples": int}

    Mean usage of type i in layer l = sum_weights[i] / token_num. Only layers with type routing appear in "labels"
    and "layers". Which tokens are counted: every position the model READ, prompt and generation, for each
    sequence separately — positions 0 .. len(prompt) + k − 2, where k counts generated tokens including a stop
    token (the last generated token is never fed back). With batch size 1 this is exactly the reference's
    N = Σ B·(cur − prev); with larger batches the positions a finished or shorter sequence merely carries along
    (tokens after its stop token) are masked out, so the numbers do not depend on the batch size.
    Instance-level and UniPEFT weights (one row per sequence and forward) count once per processed token.
    For UniPEFT the columns are the three gates LoRA, Prompt, PAdapter.

token_weight.pkl (`TokenWeightDump`, reference `router_case.pth`): a list with one dict per dumped example::

    {"index": int,                                     # the record's index in its test set
     "layers": {layer: np.float32[T_total, n(+1)]},    # type weights per token; sparse MoA: Γ as last column
     "labels": {layer: [str, ...]},                    # one name per column, "Threshold" for the Γ column
     "words": [str, ...],                              # decoded token of prompt + generation, cut at first stop
     "experts": {layer: {module path: np.float32[T_total, E]}}}

    Row t holds the routing computed while the model read token t, and len(words) == T_total always (fix of docs/moa.md
    §10 quirk 13): the examples are generated one at a time with one extra decoding step, so the last generated token is
    also read once; only when max_seq_len left no room for that step is its row NaN.
"""
import copy
import os
import pickle

import numpy as np

from Models.moa import get_routing_records, set_routing_record, type_labels
from Models.variants import variant

UNIPEFT_LABELS = ["LoRA", "Prompt", "PAdapter"]
THRESHOLD_LABEL = "Threshold"


def routing_labels(args, layer):
    """Column names of a layer's type weights ([] for layers without type routing)."""
    if variant(args.routing).family_gates:
        return list(UNIPEFT_LABELS)
    return type_labels(args, layer)


def real_lengths(prompt_lens, outputs, max_gen_len, max_seq_len):
    """Per sequence, how many positions the model read in a generate call (see module docstring).

    `outputs` are the generated token lists cut at (and excluding) their first stop token.
    """
    total_len = min(max_seq_len, max_gen_len + max(prompt_lens))
    lens = []
    for n, out in zip(prompt_lens, outputs):
        budget = min(total_len, n + max_gen_len) - n
        k = len(out) + (1 if len(out) < budget else 0)  # a stop token was generated (and cut) before the budget
        lens.append(n + k - 1)
    return np.array(lens, dtype=np.int64)


class RoutingCollector:
    """`on_step` hook: the routing records of every forward of one generate call."""

    def __init__(self, model):
        self.model = model
        self.steps = []
        set_routing_record(model, True)

    def reset(self):
        self.steps = []

    def __call__(self, start_pos, n_positions):
        self.steps.append((start_pos, n_positions, get_routing_records(self.model)))

    def stacked(self):
        """{layer: {"type", "threshold", "active": [B, P, ...] or None, "experts": {path: [B, P, E]}}} over time.

        P = positions processed in the call; one-row-per-forward weights (instance MoA, UniPEFT) are repeated
        over the positions of their forward.
        """
        if not self.steps:
            return {}, 0
        out = {}
        for layer in self.steps[0][2]:
            rec = {}
            for key in ("type", "threshold", "active"):
                parts = [_expand(step[layer][key], n) for _, n, step in self.steps]
                rec[key] = None if parts[0] is None else np.concatenate(parts, axis=1)
            rec["experts"] = {path: np.concatenate([_expand(step[layer]["experts"][path], n, flat=True)
                                                    for _, n, step in self.steps], axis=1)
                              for path in self.steps[0][2][layer]["experts"]}
            out[layer] = rec
        return out, sum(n for _, n, _ in self.steps)


def _expand(a, n, flat=False):
    """[B, t, ...] with t == n, or t == 1 repeated to n; flattened [B·n, E] expert weights reshaped to [B, n, E]."""
    if a is None:
        return None
    if flat and a.ndim == 2 and a.shape[0] % n == 0:
        return a.reshape(a.shape[0] // n, n, a.shape[1])
    if a.shape[1] == n:
        return a
    if a.shape[1] == 1:
        return np.repeat(a, n, axis=1)
    raise ValueError("routing record of shape %s does not cover %d positions" % (a.shape, n))


class TypeWeightStats:
    """Per-layer sums of the routing weights over every token read, plus the token count (type_weight.pkl)."""

    def __init__(self, args):
        self.routing = args.routing
        self.labels = {}
        for layer in range(args.n_layers):
            labels = routing_labels(args, layer)
            if labels:
                self.labels[layer] = labels
        self.layers = {}
        self.expert_sums = {}
        self.token_num = 0
        self.num_examples = 0

    def add(self, stacked, real_lens):
        """Add one generate call: `stacked` from RoutingCollector.stacked(), `real_lens` from real_lengths()."""
        records, processed = stacked
        mask = np.arange(processed)[None, :] < np.asarray(real_lens)[:, None]           # [B, P]
        self.token_num += int(mask.sum())
        self.num_examples += len(real_lens)
        for layer, rec in records.items():
            if rec["type"] is not None:
                st = self.layers.setdefault(layer, {"sum_weights": np.zeros(rec["type"].shape[-1], np.float64)})
                st["sum_weights"] += (rec["type"].astype(np.float64) * mask[..., None]).sum((0, 1))
                if rec["threshold"] is not None:
                    st["sum_threshold"] = st.get("sum_threshold", 0.0) + float((rec["threshold"][..., 0] * mask).sum())
                if rec["active"] is not None:
                    st["sum_experts"] = st.get("sum_experts", 0) + int((rec["active"] * mask).sum())
            for path, w in rec["experts"].items():
                sums = self.expert_sums.setdefault(layer, {})
                sums[path] = sums.get(path, 0.0) + (w.astype(np.float64) * mask[..., None]).sum((0, 1))

    def state(self):
        return {"routing": self.routing, "labels": {k: list(v) for k, v in self.labels.items()},
                "layers": self.layers, "token_num": self.token_num, "expert_sums": self.expert_sums,
                "num_examples": self.num_examples}

    @staticmethod
    def merge(states):
        """Sum the states of several ranks (same model, so the same keys)."""
        out = None
        for s in states:
            if out is None:
                out = copy.deepcopy(s)
                continue
            out["token_num"] += s["token_num"]
            out["num_examples"] += s["num_examples"]
            for layer, st in s["layers"].items():
                dst = out["layers"].setdefault(layer, {"sum_weights": np.zeros_like(st["sum_weights"])})
                for key, v in st.items():
                    dst[key] = dst.get(key, 0) + v
            for layer, sums in s["expert_sums"].items():
                dst = out["expert_sums"].setdefault(layer, {})
                for path, v in sums.items():
                    dst[path] = dst.get(path, 0) + v
        return out


class TokenWeightDump:
    """Per-token routing weights and decoded words of single examples (token_weight.pkl)."""

    def __init__(self, args, tokenizer):
        self.args = args
        self.tokenizer = tokenizer
        self.examples = []

    def entry(self, index, stacked, prompt, output):
        """One example generated alone: `output` is its generation cut at the first stop token and at
        max_gen_len (the call itself ran one step longer so that the last kept token was read too)."""
        records, processed = stacked
        tokens = list(prompt) + list(output)
        T = len(tokens)
        entry = {"index": int(index), "layers": {}, "labels": {}, "experts": {},
                 "words": [self.tokenizer.decode_token(t) for t in tokens]}
        for layer, rec in records.items():
            if rec["type"] is not None:
                cols = [rec["type"][0]]
                labels = routing_labels(self.args, layer)
                if rec["threshold"] is not None:
                    cols.append(rec["threshold"][0])
                    labels = labels + [THRESHOLD_LABEL]
                entry["layers"][layer] = _rows(np.concatenate(cols, axis=-1), T)
                entry["labels"][layer] = labels
            if rec["experts"]:
                entry["experts"][layer] = {path: _rows(w[0], T) for path, w in rec["experts"].items()}
        return entry


def _rows(a, T):
    """The first T rows of [P, C] as float32; rows the model never read (P < T) are NaN."""
    a = np.asarray(a, dtype=np.float32)[:T]
    if a.shape[0] < T:
        a = np.concatenate([a, np.full((T - a.shape[0], a.shape[1]), np.nan, np.float32)])
    return a


def save_pickle(obj, path):
    """Write atomically (temporary file + rename), so a killed run never leaves a truncated .pkl."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(tmp, path)
