"""What every study does around its cells: claim the folder, load the data once, keep time,
and save results.json and metrics.csv after every cell (the plot and report.md at the end).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bnlab.data import CIFAR10, load_cifar10
from bnlab.experiments.studies.cells import Cell, run_cell
from bnlab.experiments.studies.config import Study, study_fields
from bnlab.experiments.studies.folder import study_folder
from bnlab.experiments.studies.output import write_study


class StudyRun:
    """A study in its folder: its results so far, and the data its cells train on."""

    def __init__(
        self,
        kind: str,
        study: Study,
        out: Path,
        data: CIFAR10,
        previous: dict[str, Any] | None,
        command: str | None,
        log: Callable[[str], None],
    ) -> None:
        self.kind, self.out, self.data, self.command, self.log = kind, out, data, command, log
        self.started = time.monotonic()
        self.seconds_before = (previous or {}).get("seconds", 0.0)  # of the runs it resumes
        self.results: dict[str, Any] = {
            "command": kind,
            "study": study_fields(study),
            "config": study.base.to_dict(),
            "environment": None,  # the first cell's, once it has run
            "runs": [],
            "summary": [],
            "seconds": self.seconds_before,
        }

    def run(self, cell: Cell) -> dict[str, Any]:
        """Train `cell` (or resume it); its comparison's results."""
        results = run_cell(cell, self.data, command=self.command, kind=self.kind, log=self.log)
        if self.results["environment"] is None:
            self.results["environment"] = results["environment"]
        self.tick()
        return results

    def tick(self) -> None:
        self.results["seconds"] = self.seconds_before + time.monotonic() - self.started

    def save(self, csv: str, **outputs: Any) -> None:
        """results.json, metrics.csv and whatever `outputs` write_study is given."""
        self.tick()
        write_study(self.out, self.results, csv=csv, **outputs)


@contextlib.contextmanager
def study_run(
    kind: str,
    study: Study,
    *,
    data: CIFAR10 | None,
    command: str | None,
    log: Callable[[str], None],
) -> Iterator[StudyRun]:
    """The study's folder claimed and checked, then the data loaded (unless given)."""
    base = study.base
    with study_folder(kind, study_fields(study), base, command, log) as (out, previous):
        if data is None:
            data = load_cifar10(base.data_dir, download=True if base.download else None)
        yield StudyRun(kind, study, out, data, previous, command, log)
