"""curves.png: test accuracy and training loss per epoch, one line per norm (mean ± std over seeds).

matplotlib is imported here only, and through `Figure` rather than pyplot: no
GUI backend, no global figure state, safe in a headless run.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.experiments.results import atomic_open

_PANELS = (("test_acc", "test accuracy (%)"), ("train_loss", "training loss"))


def _curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs that every run reached, the mean of `key` over runs and its sample std (0 for one run)."""
    n = min(len(r["epochs"]) for r in runs)
    values = [[r["epochs"][i][key] for r in runs] for i in range(n)]
    means = [statistics.fmean(v) for v in values]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return list(range(1, n + 1)), means, stds


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Write `curves_figure(results)` to `path` as a PNG (atomically).

    Drawn in memory first: the temporary file then exists for a write, not for the drawing.
    """
    buffer = io.BytesIO()
    curves_figure(results).savefig(buffer, format="png", dpi=120)
    with atomic_open(path) as f:
        f.write(buffer.getvalue())


def curves_figure(results: dict[str, Any]) -> Figure:
    """Test accuracy and training loss per epoch, one line per norm, a band of ± std over seeds."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    norms = dict.fromkeys(r["norm"] for r in results["runs"] if r["epochs"])
    for ax, (key, label) in zip(axes, _PANELS, strict=True):
        for norm in norms:
            runs = [r for r in results["runs"] if r["norm"] == norm and r["epochs"]]
            epochs, mean, std = _curve(runs, key)
            (line,) = ax.plot(epochs, mean, marker="o", label=f"{norm} (n={len(runs)})")
            if len(runs) > 1:
                lo = [m - s for m, s in zip(mean, std, strict=True)]
                hi = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if norms:  # before the first epoch ends there is nothing to name
            ax.legend()
    fig.suptitle("LeNet-5 on CIFAR-10: mean ± std over seeds")
    return fig
