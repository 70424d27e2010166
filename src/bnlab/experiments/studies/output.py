"""What a study leaves in its folder, each file replaced atomically (see results.py):

results.json   study and training settings, environment, every run, summary, seconds
metrics.csv    one row per run and epoch (per evaluation for eval-mode)
STUDY.png      test accuracy against the varied setting, mean ± std over seeds
report.md      the summary table, the plot, the settings and environment
runs/CELL/     each cell's comparison folder (its own results, curves and checkpoints)
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bnlab.experiments.report import REPORT, accuracy_cell, count, markdown_table
from bnlab.experiments.results import CSV_COLUMNS, METRICS, RESULTS, write_text
from bnlab.experiments.studies.plots import save_png


def plot_name(study: str) -> str:
    """'batch-size' -> 'batch-size.png'."""
    return f"{study}.png"


def images_text(cfg: dict[str, Any]) -> str:
    """'all' or 'the first N': the training images a config uses."""
    return "all" if cfg["limit_train"] is None else f"the first {cfg['limit_train']}"


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def epoch_csv(runs: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """metrics.csv of a sweep: a row per run and epoch, the run's `keys` first."""
    rows = [
        [run[k] for k in keys] + [run["norm"], run["seed"]] + [e[c] for c in CSV_COLUMNS[2:]]
        for run in runs
        for e in run["epochs"]
    ]
    return csv_text((*keys, *CSV_COLUMNS), rows)


def grid_table(
    summary: list[dict[str, Any]],
    *,
    row: str,
    column: str,
    row_label: str,
    mean: str = "final_acc_mean",
    std: str = "final_acc_std",
) -> str:
    """Accuracy mean ± std as a Markdown table: a row per value of `row`, a column per `column`."""
    rows = list(dict.fromkeys(r[row] for r in summary))
    columns = list(dict.fromkeys(r[column] for r in summary))
    cells = {(r[row], r[column]): accuracy_cell(r[mean], r[std]) for r in summary}
    body = [[f"{value:g}"] + [cells.get((value, c), "") for c in columns] for value in rows]
    return markdown_table([row_label, *columns], body)


def report_text(results: dict[str, Any], *, title: str, intro: str, body: str, plot: str) -> str:
    """report.md: title, command and time, `intro`, `body` (tables), the plot, settings, environment."""
    env = results["environment"]
    data = env.get("data") or {}
    settings = markdown_table(
        ["setting", "value"],
        [[k, f"`{v!r}`"] for k, v in {**results["study"], **results["config"]}.items()],
    )
    environment = markdown_table(
        ["", ""],
        [
            ["bnlab", f"{env['bnlab']} (commit {env['git_commit'] or 'unknown'})"],
            ["torch / Python", f"{env['torch']} / {env['python']}"],
            [
                "device",
                f"{env['device']}: {env['device_name']}, {count(env.get('jobs', 1), 'run')} "
                f"at once, {count(env['threads'], 'thread')} each",
            ],
            [
                "data",
                f"{data.get('path')} ({data.get('layout')} layout, "
                f"fingerprint {data.get('fingerprint')})",
            ],
        ],
    )
    minutes = results.get("seconds", 0.0) / 60
    return f"""# {title}

Command: `{env.get("command") or "(not recorded)"}` ({minutes:.1f} min)

{intro}

{body}

![{title}]({plot})

## Settings

{settings}

## Environment

{environment}
"""


def write_study(
    out: Path,
    results: dict[str, Any],
    *,
    csv: str,
    figure: Figure | None = None,
    plot: str | None = None,
    report: str | None = None,
) -> None:
    """results.json and metrics.csv; the plot and report.md too when given."""
    write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    write_text(out / METRICS, csv)
    if figure is not None and plot is not None:
        save_png(figure, out / plot)
    if report is not None:
        write_text(out / REPORT, report)
