"""The MoEfication picture: retained quality vs the fraction of FFN groups used, one panel per model and one curve
per selection method, plus a panel of router recall per layer (and the measured FFN speed-up in its title). When
a result's rows carry accuracy on test sets (`moefy.py evaluate --math_sets`: row["math"]["mean"]), that model also
gets a panel of mean accuracy vs k/E, the dense model's accuracy as a dashed line; without it the picture is as
before.

`plot_moefication(results, out, speedup=None)` takes {model name: evaluate-stage result dict} (rows of method, k,
fraction, retained; "gate": {layer: metrics}) and returns (figure, the plotted retained series) so tests can read
what was drawn (`accuracy_series` gives the accuracy panels' curves). Plain data in, nothing of Models/ imported.
"""
import os

from Utils.errors import UserError

STYLE = {"ground_truth": ("tab:green", "o", "ground truth (oracle)"), "router": ("tab:blue", "s", "trained router"),
         "similarity": ("tab:orange", "^", "similarity (centroid)"), "random": ("tab:gray", "x", "random")}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def series(result):
    """{method: ([fraction %], [retained %])} sorted by fraction."""
    out = {}
    for r in result["rows"]:
        out.setdefault(r["method"], []).append((100.0 * r["fraction"], 100.0 * r["retained"]))
    return {m: tuple(map(list, zip(*sorted(v)))) for m, v in out.items()}


def accuracy_series(result):
    """{method: ([fraction %], [mean accuracy %])} of the rows that carry accuracy, sorted by fraction ({} if none)."""
    out = {}
    for r in result["rows"]:
        if r.get("math"):
            out.setdefault(r["method"], []).append((100.0 * r["fraction"], 100.0 * r["math"]["mean"]))
    return {m: tuple(map(list, zip(*sorted(v)))) for m, v in out.items()}


def _fraction_axis(ax, ticks):
    ax.set_xlabel("FFN groups used per token, k/E (%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels(["%g" % t for t in ticks])


def _accuracy_panel(ax, name, res, curves):
    for method, (xs, ys) in curves.items():
        color, marker, label = STYLE.get(method, (None, ".", method))
        ax.plot(xs, ys, marker=marker, color=color, label=label)
    dense = ((res.get("dense") or {}).get("math") or {}).get("mean")
    top = [y for _, ys in curves.values() for y in ys]
    if dense is not None:
        ax.axhline(100.0 * dense, color="k", lw=0.8, ls="--", label="dense model")
        top.append(100.0 * dense)
    sets = sorted(((res.get("math") or {}).get("sets") or {}))
    on = (" on " + ", ".join(sets)) if 0 < len(sets) <= 3 else (" on %d test sets" % len(sets)) if sets else ""
    ax.set_title("%s: accuracy%s (dense %s)" % (name, on,
                                               "%.1f %%" % (100.0 * dense) if dense is not None else "n/a"),
                 fontsize=10)
    _fraction_axis(ax, sorted({x for xs, _ in curves.values() for x in xs}))
    ax.set_ylabel("mean accuracy on the test sets (%)")
    ax.set_ylim(0, max([5.0] + [1.1 * y + 1.0 for y in top]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def recalls(result):
    """([layer], [val recall]) of the trained routers, if the result carries gate metrics."""
    gate = result.get("gate") or {}
    layers = sorted(int(i) for i in gate)
    return layers, [gate[str(i)]["val_recall"] for i in layers]


def plot_moefication(results, out, speedup=None, title=None):
    if not results:
        raise UserError("plot: no results to draw")
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise UserError("%s: output directory does not exist" % d)
    plt = _plt()
    n = len(results)
    accuracy = {name: accuracy_series(res) for name, res in results.items()}
    accuracy = {name: curves for name, curves in accuracy.items() if curves}
    panels = n + len(accuracy) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.0), squeeze=False)
    drawn = {}
    for ax, (name, res) in zip(axes[0], results.items()):
        drawn[name] = series(res)
        for method, (xs, ys) in drawn[name].items():
            color, marker, label = STYLE.get(method, (None, ".", method))
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        dense = res.get("dense", {})
        ax.set_title("%s (dense ppl %.2f)" % (name, dense.get("ppl", float("nan"))), fontsize=10)
        _fraction_axis(ax, sorted({x for xs, _ in drawn[name].values() for x in xs}))
        ax.set_ylabel("retained quality, ppl_dense / ppl (%)")
        ax.set_ylim(0, max([105.0] + [y + 3.0 for _, ys in drawn[name].values() for y in ys]))
        ax.axhline(95, color="k", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax, (name, curves) in zip(axes[0][n:], accuracy.items()):
        _accuracy_panel(ax, name, results[name], curves)
    ax = axes[0][panels - 1]
    for name, res in results.items():
        layers, rec = recalls(res)
        if layers:
            ax.plot(layers, rec, marker="o", label=name)
            ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("router top-k recall (held-out tokens)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("router recall" + ("\nFFN speed-up vs dense: %s" % speedup if speedup else ""), fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = "%s.tmp.%d" % (out, os.getpid())   # a reader never sees half a picture
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out)
    plt.close(fig)
    return fig, drawn
