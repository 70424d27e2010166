"""A sweep: one comparison per value of a training setting (batch size, learning rate).

Each cell is `bnlab compare` with the study's norms and seeds and its own value,
so within a cell every norm starts from the same weights and data order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from bnlab.data import CIFAR10
from bnlab.experiments.studies.cells import cell, cell_runs, cell_summary
from bnlab.experiments.studies.config import Study
from bnlab.experiments.studies.output import epoch_csv, plot_name
from bnlab.experiments.studies.session import study_run


@dataclass(frozen=True)
class Sweep:
    kind: str  # the command, "study lr"
    name: str  # its plot's name, "lr"
    keys: tuple[str, ...]  # the settings a cell sets, recorded with each run
    table: Callable[[dict[str, Any]], str]  # the summary as Markdown
    figure: Callable[[dict[str, Any]], Figure]
    report: Callable[[dict[str, Any]], str]


def run_sweep(
    sweep: Sweep,
    study: Study,
    cells: list[tuple[str, dict[str, Any]]],
    *,
    data: CIFAR10 | None,
    command: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train each (folder name, settings) cell of `study.base`; the study's results.

    results.json and metrics.csv are saved after each cell, the plot and
    report.md at the end.
    """
    with study_run(sweep.kind, study, data=data, command=command, log=log) as run:
        for name, values in cells:
            c = cell(run.out, name, values, study.base, **values)
            results = run.run(c)
            run.results["runs"] += cell_runs(c, results)
            run.results["summary"] += cell_summary(c, results)
            run.save(epoch_csv(run.results["runs"], sweep.keys))
        plot = plot_name(sweep.name)
        run.save(
            epoch_csv(run.results["runs"], sweep.keys),
            figure=sweep.figure(run.results),
            plot=plot,
            report=sweep.report(run.results),
        )
    log("\n" + sweep.table(run.results))
    log(f"\nwrote {run.out}/: results.json, metrics.csv, report.md, {plot}, runs/")
    return run.results
