"""Evaluation charts: accuracy@k bars against the chance level, and rank box plots.

matplotlib's object API (``Figure``, no pyplot): no global backend state, renders with Agg.
Legends sit below the axes so that they never cover a bar or a box.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

_DPI = 120


def _legend_below(ax, handles=None) -> None:
    handles = handles or ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(4, len(handles)),
              frameon=False, fontsize=8)


def _save(fig, path):
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")  # "tight" keeps the legend below the axes
    return fig


def plot_accuracy_at_k(series: Mapping[str, Mapping[str, float]], path, title: str,
                       chance: Mapping[int, float] | None = None, chance_label: str = "chance",
                       ylabel: str = "accuracy@k"):
    """Grouped bars of accuracy@k (k on the x axis) for each series (language or direction); the
    y axis ends a little above the highest bar or chance value, so small figures stay readable.

    Args:
        series: {name: {"1": acc@1, "2": ...}} (string keys, as in the metrics JSON).
        chance: {k: chance accuracy@k} (``clip.eval.metrics.chance_at_k``), drawn as a dashed line.
        chance_label: its legend entry, e.g. "chance k/267 (images)".
    Returns the saved matplotlib Figure.
    """
    from matplotlib.figure import Figure

    ks = sorted({int(k) for acc in series.values() for k in acc})
    width = 0.8 / max(1, len(series))
    fig = Figure(figsize=(7, 4.3))
    ax = fig.subplots()
    for j, (name, acc) in enumerate(series.items()):
        offset = (j - (len(series) - 1) / 2) * width  # series side by side around each k
        ax.bar([k + offset for k in ks], [acc[str(k)] for k in ks], width, label=name)
    if chance:
        ax.plot(ks, [chance[k] for k in ks], color="black", ls="--", lw=1, marker="_", label=chance_label)
    top = max([v for acc in series.values() for v in acc.values()] + list((chance or {}).values()))
    ax.set(xlabel="k", ylabel=ylabel, title=title, ylim=(0, min(1.0, max(0.05, 1.15 * top))), xticks=ks)
    ax.grid(axis="y", alpha=0.3)
    _legend_below(ax)
    return _save(fig, path)


def plot_rank_boxplot(series: Mapping[str, torch.Tensor], path, title: str, chance: float | None = None,
                      chance_label: str = "chance median"):
    """Box plot of the 1-based ranks of each series on a log-scale y axis (1 = best): box = quartiles,
    line = median, triangle = mean, whiskers = the farthest ranks within 1.5 IQR of the box;
    ``chance`` (the median rank of a random ranking, (N + 1) / 2) as a dashed line.
    Returns the saved matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7, 4.3))
    ax = fig.subplots()
    ax.boxplot([r.numpy() for r in series.values()], showmeans=True)
    ax.set_xticks(range(1, len(series) + 1), list(series))
    ax.set_yscale("log")
    ax.set(ylabel="rank of the correct item (1 = best)", title=title)
    ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color="tab:orange", label="median"),
               Line2D([], [], color="tab:green", marker="^", ls="", label="mean"),
               Line2D([], [], color="black", label="box: quartiles, whiskers: within 1.5 IQR")]
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1)
        handles.append(Line2D([], [], color="grey", ls="--", label=f"{chance_label} ({chance:g})"))
    _legend_below(ax, handles)
    return _save(fig, path)
