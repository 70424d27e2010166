"""A study's cells: each one `run_compare` in its own folder under runs/, with its checkpoints.

So a cell trains, saves and resumes exactly as `bnlab compare` does (runs side
by side on a multi-core CPU, checkpoints after every epoch), and its folder is
a comparison folder that `bnlab diagnose` and the comparison's tools read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.data import CIFAR10
from bnlab.experiments.compare import run_compare
from bnlab.experiments.config import Config
from bnlab.experiments.results import RESULTS, summarize

RUNS = "runs"  # the cells' folders, under the study's


@dataclass(frozen=True)
class Cell:
    name: str  # its folder under runs/
    values: dict[str, Any]  # the settings it varies, recorded with each of its runs
    cfg: Config  # the comparison it runs


def cell(out: Path, name: str, values: dict[str, Any], base: Config, **changes: Any) -> Cell:
    """A cell of `base` with `changes`, in out/runs/`name`, resumed if it saved results before."""
    folder = out / RUNS / name
    cfg = dataclasses.replace(base, out=str(folder), resume=(folder / RESULTS).is_file(), **changes)
    return Cell(name, values, cfg)


def used_images(data: CIFAR10, cfg: Config) -> CIFAR10:
    """`data` with only the training images `cfg` uses: each worker is sent these alone."""
    if cfg.limit_train is None:
        return data
    n = cfg.limit_train
    return dataclasses.replace(
        data, train_images=data.train_images[:n], train_labels=data.train_labels[:n]
    )


def run_cell(
    c: Cell, data: CIFAR10, *, command: str | None, kind: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train the cell's comparison; its results, each line it prints tagged with the cell."""

    def tagged(text: str) -> None:
        for line in text.splitlines():
            log(f"[{c.name}] {line}" if line else line)

    return run_compare(c.cfg, data=used_images(data, c.cfg), command=command, kind=kind, log=tagged)


def cell_runs(c: Cell, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The cell's runs, each with the cell's values."""
    return [{**c.values, **run} for run in results["runs"]]


def cell_summary(c: Cell, results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per norm: final accuracy mean and sample std over seeds, with the cell's values."""
    summary = summarize(results["runs"], c.cfg.epochs)
    return [{**c.values, "norm": norm, **s} for norm, s in summary.items()]
