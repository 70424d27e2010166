"""A study's plot: test accuracy (mean ± std over seeds) against the setting it varies.

matplotlib through `Figure`, as in the experiment's plots: no GUI backend, no
global state.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bnlab.experiments.results import atomic_open

CHANCE = 10.0  # percent: ten classes


def save_png(fig: Figure, path: Path) -> None:
    """`fig` as a PNG at `path`, drawn in memory first, then written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    with atomic_open(path) as f:
        f.write(buffer.getvalue())


def sweep_figure(
    summary: list[dict[str, Any]],
    *,
    x: str,
    series: str,
    xlabel: str,
    title: str,
    mean: str = "final_acc_mean",
    std: str = "final_acc_std",
    log_base: float = 2,
    labels: dict[str, str] | None = None,
    zoom: float | None = None,
) -> Figure:
    """One line per value of `series` through (row[x], row[mean]), error bars of ± row[std].

    Lines that coincide stay visible: each has its own marker and dash, and later
    ones are drawn thinner. `zoom` adds a panel of the top `zoom` points of
    accuracy, where differences too small for the full scale show.
    """
    fig = Figure(figsize=(12 if zoom else 8, 5.2), layout="constrained")
    panels = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    names = list(dict.fromkeys(row[series] for row in summary))
    xs = sorted({row[x] for row in summary})
    markers, dashes = "osD^vP*X", ("-", "--", "-.", ":")
    for ax in panels:
        for i, name in enumerate(names):
            rows = sorted((r for r in summary if r[series] == name), key=lambda r: r[x])
            ax.errorbar(
                [r[x] for r in rows],
                [r[mean] for r in rows],
                yerr=[r[std] or 0.0 for r in rows],
                marker=markers[i % len(markers)],
                linestyle=dashes[i % len(dashes)],
                linewidth=max(0.8, 2.2 - 0.3 * i),
                markersize=max(3.0, 7.0 - 0.7 * i),
                capsize=3,
                label=(labels or {}).get(name, name),
            )
        ax.set_xscale("log", base=log_base)
        ax.set_xticks(xs, labels=[f"{v:g}" for v in xs])  # the values run, as they are written
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    panels[0].axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label="chance")
    if zoom and summary:
        top = max(r[mean] + (r[std] or 0.0) for r in summary)
        panels[1].set_ylim(top - zoom, top + 0.1 * zoom)
        panels[1].set_title(f"the top {zoom:g} points", fontsize="medium")
    if names:
        fig.legend(*panels[0].get_legend_handles_labels(), loc="outside lower center",
                   ncols=min(4, len(names) + 1), fontsize="small")  # fmt: skip
    fig.suptitle(title, fontsize="medium")
    return fig
