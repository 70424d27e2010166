"""`bnlab study lr`: with and without batch norm across Adam's learning rates.

Batch norm makes a layer's output invariant to the scale of the weights before
it, so a large step changes what the layer computes less, and the loss
landscape the optimizer sees is smoother (Santurkar et al., 2018); the claim is
that BN trains well over a wider range of learning rates, larger ones
especially. Each learning rate is one comparison with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bnlab.data import CIFAR10
from bnlab.experiments.report import count
from bnlab.experiments.studies.config import LRStudy
from bnlab.experiments.studies.output import grid_table, images_text, plot_name, report_text
from bnlab.experiments.studies.plots import sweep_figure
from bnlab.experiments.studies.sweep import Sweep, run_sweep


def run_lr_study(
    study: LRStudy,
    *,
    data: CIFAR10 | None = None,
    command: str | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Train `study.base` at each learning rate, into `study.base.out`; the study's results."""
    cells = [(f"lr-{lr:g}", {"lr": lr}) for lr in study.lrs]
    return run_sweep(SWEEP, study, cells, data=data, command=command, log=log)


def _table(results: dict[str, Any]) -> str:
    return grid_table(results["summary"], row="lr", column="norm", row_label="lr")


def _figure(results: dict[str, Any]) -> Figure:
    cfg = results["config"]
    return sweep_figure(
        results["summary"],
        x="lr",
        series="norm",
        xlabel="Adam learning rate",
        log_base=10,
        title=f"LeNet-5, CIFAR-10: {count(cfg['epochs'], 'epoch')} of {images_text(cfg)} "
        f"training images at batch {cfg['batch_size']}\nmean ± std over seeds",
    )


def _report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    intro = (
        f"Each norm trained at each learning rate on {images_text(cfg)} training images for "
        f"{count(cfg['epochs'], 'epoch')}, Adam, batch {cfg['batch_size']}; seeds {cfg['seeds']}. "
        "Test accuracy on the whole test set after the last epoch, mean ± sample std over "
        "seeds. Each learning rate's comparison (curves, checkpoints) is in runs/lr-LR/."
    )
    return report_text(
        results,
        title="Learning rate: does batch norm tolerate larger steps?",
        intro=intro,
        body=f"## Final test accuracy (%)\n\n{_table(results)}",
        plot=plot_name(SWEEP.name),
    )


SWEEP = Sweep(
    kind="study lr", name="lr", keys=("lr",), table=_table, figure=_figure, report=_report
)
