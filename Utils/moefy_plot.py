"""The MoEfication picture: retained quality vs the fraction of FFN groups used, one panel per model and one curve
per selection method, plus a panel of router recall per layer (and the measured FFN speed-up in its title).

`plot_moefication(results, out, speedup=None)` takes {model name: evaluate-stage result dict} (rows of method, k,
fraction, retained; "gate": {layer: metrics}) and returns (figure, the plotted series) so tests can read what was
drawn. Plain data in, nothing of Models/ imported.
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
    fig, axes = plt.subplots(1, n + 1, figsize=(4.6 * (n + 1), 4.0), squeeze=False)
    drawn = {}
    for ax, (name, res) in zip(axes[0], results.items()):
        drawn[name] = series(res)
        for method, (xs, ys) in drawn[name].items():
            color, marker, label = STYLE.get(method, (None, ".", method))
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        dense = res.get("dense", {})
        ax.set_title("%s (dense ppl %.2f)" % (name, dense.get("ppl", float("nan"))), fontsize=10)
        ax.set_xlabel("FFN groups used per token, k/E (%)")
        ax.set_ylabel("retained quality, ppl_dense / ppl (%)")
        ax.set_xscale("log", base=2)
        ticks = sorted({x for xs, _ in drawn[name].values() for x in xs})
        ax.set_xticks(ticks)
        ax.set_xticklabels(["%g" % t for t in ticks])
        ax.set_ylim(0, max([105.0] + [y + 3.0 for _, ys in drawn[name].values() for y in ys]))
        ax.axhline(95, color="k", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[0][n]
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
