"""Plots of router statistics and training curves (docs/moa.md §9.1 heatmap, §9.2 per-token case and inter-expert std).

    python -m Utils.plot type_weight --pkl out/AddSub_type_weight.pkl --out heat.png
    python -m Utils.plot token_weight --pkl out/AddSub_token_weight.pkl --example 0 --layer 1 --out tok.png
    python -m Utils.plot curves --logdir output_dir --out loss.png
    python -m Utils.plot std --pkl out/AddSub_token_weight.pkl

`plot_runs` (several runs' curves in one picture) and `plot_expert_load` (layers × experts share of routed tokens)
draw the MoE-LLM demo's pictures (demo_moe.py).

Each plotting function returns `(figure, axes, matrix)` where `matrix` is exactly the array drawn, so tests can
check the rows/columns. The .pkl schemas are documented in Models/routing_dump.py.
"""
import glob
import os
import struct

import numpy as np

from Utils import safe_pickle
from Utils.cli import Parser
from Utils.errors import UserError, cli_main

THRESHOLD_LABEL = "Threshold"


# ---------------------------------------------------------------------------- loading and validation
def load_pickle(path, kind):
    """Read a type_weight ("type") or token_weight ("token") dump; anything malformed is a UserError."""
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    if os.path.getsize(path) == 0:
        raise UserError("%s: empty file (expected a %s_weight .pkl written by inference.py)" % (path, kind))
    data = safe_pickle.load(path, "%s_weight dump" % kind)  # no code runs, whatever the file holds
    check = _check_type_weight if kind == "type" else _check_token_weight
    try:
        check(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError("%s: not a %s_weight dump (%s)" % (path, kind, str(e)[:120] or type(e).__name__))
    return data


def _check_type_weight(d):
    if not isinstance(d, dict):
        raise TypeError("top level is %s, expected a dict" % type(d).__name__)
    for key in ("labels", "layers", "token_num"):
        if key not in d:
            raise KeyError("missing key %r" % key)
    if int(d["token_num"]) <= 0:
        raise ValueError("token_num is %r (no tokens were recorded)" % d["token_num"])
    if not d["layers"] and not d.get("expert_sums"):
        raise ValueError("no layer has routing weights")
    for layer, st in d["layers"].items():
        n = len(np.asarray(st["sum_weights"]).reshape(-1))
        if n != len(d["labels"][layer]):
            raise ValueError("layer %s: %d weights but %d labels" % (layer, n, len(d["labels"][layer])))


def _check_token_weight(d):
    if not isinstance(d, list):
        raise TypeError("top level is %s, expected a list of examples" % type(d).__name__)
    if not d:
        raise ValueError("no examples in the dump")
    for i, e in enumerate(d):
        if not isinstance(e, dict) or "layers" not in e or "words" not in e or "labels" not in e:
            raise KeyError("example %d lacks 'layers', 'labels' or 'words'" % i)
        for layer, w in list(e["layers"].items()) + [(l, m) for l, ms in e.get("experts", {}).items()
                                                     for m in ms.values()]:
            w = np.asarray(w)
            if w.ndim != 2 or w.shape[0] != len(e["words"]):
                raise ValueError("example %d layer %s: weights %s do not have one row per word (%d words)"
                                 % (i, layer, w.shape, len(e["words"])))


# ---------------------------------------------------------------------------- matrices
def type_weight_matrix(d):
    """(matrix [layers, columns], row labels, column labels): mean weight = sum / token_num, NaN where a layer
    lacks a type; sparse MoA adds the mean Γ as a last "Threshold" column. MoE-LoRA dumps without type weights
    show the expert weights of each layer's first multi-expert module (FFN_DOWN when present)."""
    N = float(d["token_num"])
    if d["layers"]:
        layers = sorted(d["layers"])
        columns = []
        for layer in layers:
            for lab in d["labels"][layer]:
                if lab not in columns:
                    columns.append(lab)
        sparse = any("sum_threshold" in d["layers"][l] for l in layers)
        if sparse:
            columns.append(THRESHOLD_LABEL)
        m = np.full((len(layers), len(columns)), np.nan)
        for r, layer in enumerate(layers):
            st = d["layers"][layer]
            for lab, v in zip(d["labels"][layer], np.asarray(st["sum_weights"]).reshape(-1)):
                m[r, columns.index(lab)] = v / N
            if sparse and "sum_threshold" in st:
                m[r, -1] = float(st["sum_threshold"]) / N
        return m, ["layer %d" % l for l in layers], columns
    layers = sorted(d["expert_sums"])
    rows = []
    for layer in layers:
        mods = d["expert_sums"][layer]
        path = next((p for p in sorted(mods) if "DOWN" in p), sorted(mods)[0])
        rows.append(np.asarray(mods[path], dtype=np.float64) / N)
    width = max(len(r) for r in rows)
    m = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        m[i, :len(r)] = r
    return m, ["layer %d" % l for l in layers], ["E%d" % i for i in range(width)]


def token_weight_matrix(d, example, layer):
    """(matrix [tokens, columns], words, column labels) of one example and layer."""
    if not 0 <= example < len(d):
        raise UserError("--example %d: the dump holds examples 0..%d" % (example, len(d) - 1))
    e = d[example]
    if layer in e["layers"]:
        return np.asarray(e["layers"][layer], dtype=np.float64), list(e["words"]), list(e["labels"][layer])
    if layer in e.get("experts", {}):
        mods = e["experts"][layer]
        path = next((p for p in sorted(mods) if "DOWN" in p), sorted(mods)[0])
        w = np.asarray(mods[path], dtype=np.float64)
        return w, list(e["words"]), ["E%d" % i for i in range(w.shape[1])]
    have = sorted(set(e["layers"]) | set(e.get("experts", {})))
    raise UserError("--layer %d: example %d has routing weights for layers %s" % (layer, example, have))


def inter_expert_std(d, ddof=0):
    """docs/moa.md §9.2: per token and layer the std over the expert/type weights (Γ column dropped), averaged over
    tokens, then layers, then examples. Rows never read by the model (NaN) are skipped."""
    per_example = []
    for e in d:
        per_layer = []
        sources = e["layers"] or {l: next(iter(ms.values())) for l, ms in e.get("experts", {}).items() if ms}
        for layer, w in sources.items():
            w = np.asarray(w, dtype=np.float64)
            labels = e["labels"].get(layer, []) if e["layers"] else []
            if labels and labels[-1] == THRESHOLD_LABEL:
                w = w[:, :-1]
            w = w[~np.isnan(w).any(axis=1)]
            if w.shape[0] and w.shape[1] > 1:
                per_layer.append(np.std(w, axis=1, ddof=ddof).mean())
        if per_layer:
            per_example.append(float(np.mean(per_layer)))
    if not per_example:
        raise UserError("no example has weights over two or more experts to take a std of")
    return float(np.mean(per_example)), per_example


# ---------------------------------------------------------------------------- drawing
def _plt():
    import warnings
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tokens in scripts DejaVu lacks
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _heatmap(m, rows, cols, title, out, vmax=None, row_font=8):
    plt = _plt()
    h = min(40.0, max(3.0, 0.22 * len(rows) + 1.5))
    w = max(4.0, 0.8 * len(cols) + 2.5)
    fig, ax = plt.subplots(figsize=(w, h))
    img = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="viridis", vmin=0.0,
                    vmax=vmax if vmax is not None else (np.nanmax(m) if np.isfinite(m).any() else 1.0),
                    interpolation="nearest")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=row_font)
    ax.set_title(title, fontsize=10)
    fig.colorbar(img, ax=ax)
    fig.tight_layout()
    _save(fig, out)
    return fig, ax


def _save(fig, out):
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise UserError("%s: output directory does not exist" % d)
    fig.savefig(out, dpi=120)


def plot_type_weight(d, out):
    m, rows, cols = type_weight_matrix(d)
    fig, ax = _heatmap(m, rows, cols, "mean routing weight per layer (%s, %d tokens)"
                       % (d.get("routing", "?"), int(d["token_num"])), out)
    return fig, ax, m


def plot_token_weight(d, example, layer, out):
    m, words, cols = token_weight_matrix(d, example, layer)
    shown = [repr(w)[1:-1] for w in words]  # newlines and tabs stay visible as \n, \t
    fig, ax = _heatmap(m, shown, cols, "example %d, layer %d: routing weight per token" % (example, layer), out,
                       vmax=1.0, row_font=6)
    return fig, ax, m


def read_scalars(logdir):
    """{tag: (steps, values)} from every tensorboardX event file under logdir (TFRecord framing, `Event` protos).

    Files are read in name (= creation time) order; a later value for the same step wins, and a resumed writer's
    purge marker (SessionLog START at step s) drops the earlier points at steps >= s, as TensorBoard does.
    """
    from tensorboardX.proto import event_pb2
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise UserError("%s: no tensorboard event files (events.out.tfevents.*) found" % logdir)
    series = {}
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        off = 0
        while off + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[off:off + 8])
            body = data[off + 12:off + 12 + n]
            off += 12 + n + 4
            if len(body) < n:
                break  # a record cut by a kill
            ev = event_pb2.Event()
            try:
                ev.ParseFromString(body)
            except Exception:
                raise UserError("%s: corrupt event record at byte %d" % (path, off - n - 16))
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for pts in series.values():
                    for s in [s for s in pts if s >= ev.step]:
                        del pts[s]
            if ev.HasField("summary"):
                for v in ev.summary.value:
                    if v.HasField("simple_value"):
                        val = v.simple_value
                    elif v.HasField("tensor") and v.tensor.float_val:
                        val = v.tensor.float_val[0]
                    else:
                        continue
                    series.setdefault(v.tag, {})[int(ev.step)] = float(val)
    return {tag: (sorted(pts), [pts[s] for s in sorted(pts)]) for tag, pts in series.items() if pts}


def plot_curves(logdir, out, tags=None):
    """Loss curves (every scalar tag containing "loss", or the given tags) against the optimizer step."""
    scalars = read_scalars(logdir)
    chosen = tags or [t for t in sorted(scalars) if "loss" in t.lower()]
    missing = [t for t in chosen if t not in scalars]
    if missing or not chosen:
        raise UserError("%s: no scalar %s (tags present: %s)"
                        % (logdir, repr(missing[0]) if missing else "with 'loss' in its name",
                           ", ".join(sorted(scalars)) or "none"))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in chosen:
        steps, vals = scalars[t]
        ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, markersize=3, label=t)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    return fig, ax, {t: scalars[t] for t in chosen}


def plot_runs(runs, out, title="validation loss", xlabel="optimizer step", ylabel="loss"):
    """Several runs' curves in one picture (e.g. an MoE LM and its dense twin): runs = {label: (steps, values)}.
    Returns (figure, axes, {label: (steps, values)}) — exactly what was drawn."""
    if not runs or any(len(s) != len(v) or not len(s) for s, v in runs.values()):
        raise UserError("plot_runs: every run needs as many steps as values, and at least one point")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, vals) in runs.items():
        ax.plot(steps, vals, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    return fig, ax, {k: (list(s), list(v)) for k, (s, v) in runs.items()}


def expert_load_matrix(load):
    """{layer: assignments per expert [E]} (LLaMA_adapter.routing_load, summed over batches) → (matrix [layers, E]
    of each layer's share per expert, row labels, column labels); a layer with fewer experts is NaN-padded."""
    if not load:
        raise UserError("expert load: no MoE layer recorded any assignment")
    layers = sorted(load)
    width = max(len(np.asarray(load[l]).reshape(-1)) for l in layers)
    m = np.full((len(layers), width), np.nan)
    for r, l in enumerate(layers):
        counts = np.asarray(load[l], dtype=np.float64).reshape(-1)
        if counts.sum() <= 0:
            raise UserError("expert load: layer %s has no assignment" % l)
        m[r, :len(counts)] = counts / counts.sum()
    return m, ["layer %d" % l for l in layers], ["E%d" % e for e in range(width)]


def plot_expert_load(load, out, title=None):
    """Layers × experts heatmap of the share of routed assignments each expert received (1/E everywhere = perfect
    balance). Returns (figure, axes, matrix)."""
    m, rows, cols = expert_load_matrix(load)
    title = title or "share of routed tokens per expert (balanced = 1/%d = %.3f)" % (len(cols), 1.0 / len(cols))
    vmax = float(np.nanmax(m))
    fig, ax = _heatmap(m, rows, cols, title, out, vmax=vmax)
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            if np.isfinite(m[r, c]):   # dark text on viridis' bright end, white on its dark end
                ax.text(c, r, "%.2f" % m[r, c], ha="center", va="center", fontsize=7,
                        color="black" if m[r, c] > 0.6 * vmax else "white")
    _save(fig, out)
    return fig, ax, m


# ---------------------------------------------------------------------------- command line
def build_parser():
    p = Parser(prog="python -m Utils.plot", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("type_weight", help="layers x adapter-type heatmap of mean routing weights")
    s.add_argument("--pkl", required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("token_weight", help="tokens x adapter-type heatmap of one example and layer")
    s.add_argument("--pkl", required=True)
    s.add_argument("--example", type=int, default=0)
    s.add_argument("--layer", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("curves", help="train/val loss curves from tensorboard event files")
    s.add_argument("--logdir", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--tags", default=None, help="comma list of scalar tags (default: every tag with 'loss')")
    s = sub.add_parser("std", help="inter-expert standard deviation of a token_weight dump (docs/moa.md §9.2)")
    s.add_argument("--pkl", required=True)
    s.add_argument("--ddof", type=int, default=0, help="0: population std (default); 1: sample std")
    return p


@cli_main
def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.cmd == "type_weight":
        plot_type_weight(load_pickle(a.pkl, "type"), a.out)
        print(a.out)
    elif a.cmd == "token_weight":
        plot_token_weight(load_pickle(a.pkl, "token"), a.example, a.layer, a.out)
        print(a.out)
    elif a.cmd == "curves":
        plot_curves(a.logdir, a.out, [t.strip() for t in a.tags.split(",")] if a.tags else None)
        print(a.out)
    else:
        mean, per = inter_expert_std(load_pickle(a.pkl, "token"), a.ddof)
        print("inter-expert std: %.4f (mean over %d examples; per example: %s)"
              % (mean, len(per), ", ".join("%.4f" % v for v in per)))


if __name__ == "__main__":
    main()
