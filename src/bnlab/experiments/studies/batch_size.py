"""`bnlab study batch-size`: every norm at every batch size, on the same images.

Batch norm estimates each channel's mean and variance from the batch: the
smaller the batch, the noisier the estimate that normalizes training, and the
further the batch statistics of training are from the running statistics used
at test time. The fixes differ in how: renorm corrects the batch statistics
towards the running ones, ghost batch norm normalizes chunks of 16 (so at
batch ≤ 16 it is batch norm exactly), and GroupNorm uses no batch statistics
at all.

The learning rate follows the batch size (`lr_scaling`, square root by
default): Adam's steps get noisier as the batch shrinks, and without scaling
the network without norm fails at small batches for reasons that have nothing
to do with normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from matplotlib.figure import Figure
from tqdm import tqdm

from bnlab.data import CIFAR10
from bnlab.experiments.report import count
from bnlab.experiments.studies.config import BatchSizeStudy
from bnlab.experiments.studies.output import grid_table, images_text, plot_name, report_text
from bnlab.experiments.studies.plots import sweep_figure
from bnlab.experiments.studies.sweep import Sweep, run_sweep

REFERENCE_BATCH = 64  # the batch at which the learning rate is --lr itself


def scaled_lr(lr: float, batch_size: int, scaling: str) -> float:
    """The learning rate at `batch_size`: `lr` at REFERENCE_BATCH, scaled by `scaling`."""
    ratio = batch_size / REFERENCE_BATCH
    factors = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}
    if scaling not in factors:
        raise ValueError(f"unknown lr scaling {scaling!r}; choose one of: {', '.join(factors)}")
    return lr * factors[scaling]


def run_batch_size_study(
    study: BatchSizeStudy,
    *,
    data: CIFAR10 | None = None,
    command: str | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Train `study.base` at each batch size, into `study.base.out`; the study's results."""
    cells = [
        (f"batch-{b}", {"batch_size": b, "lr": scaled_lr(study.base.lr, b, study.lr_scaling)})
        for b in study.batch_sizes
    ]
    return run_sweep(SWEEP, study, cells, data=data, command=command, log=log)


def _table(results: dict[str, Any]) -> str:
    return grid_table(results["summary"], row="batch_size", column="norm", row_label="batch")


def _figure(results: dict[str, Any]) -> Figure:
    cfg = results["config"]
    return sweep_figure(
        results["summary"],
        x="batch_size",
        series="norm",
        xlabel="training batch size",
        title=f"LeNet-5, CIFAR-10: {count(cfg['epochs'], 'epoch')} of {images_text(cfg)} "
        f"training images, lr {cfg['lr']} at batch {REFERENCE_BATCH} scaled "
        f"{results['study']['lr_scaling']}\nmean ± std over seeds",
    )


def _report(results: dict[str, Any]) -> str:
    cfg, study = results["config"], results["study"]
    intro = (
        f"Each norm trained at each batch size on {images_text(cfg)} training images for "
        f"{count(cfg['epochs'], 'epoch')} (the same images whatever the batch, so fewer steps at "
        f"larger batches), Adam with lr {cfg['lr']} at batch {REFERENCE_BATCH}, scaled "
        f"`{study['lr_scaling']}` with the batch; seeds {cfg['seeds']}. Test accuracy on "
        "the whole test set after the last epoch, mean ± sample std over seeds. Each batch "
        "size's comparison (curves, checkpoints) is in runs/batch-B/."
    )
    return report_text(
        results,
        title="Batch size: where batch norm breaks down",
        intro=intro,
        body=f"## Final test accuracy (%)\n\n{_table(results)}",
        plot=plot_name(SWEEP.name),
    )


SWEEP = Sweep(
    kind="study batch-size",
    name="batch-size",
    keys=("batch_size", "lr"),
    table=_table,
    figure=_figure,
    report=_report,
)
