"""report.md and the summary table printed at the end of a run; both rewritten as epochs finish."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bnlab.experiments.config import AMP_DTYPES
from bnlab.experiments.plots import plot_curves
from bnlab.experiments.results import write_text

REPORT = "report.md"
CURVES = "curves.png"


def count(n: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def precision_text(amp: str) -> str:
    """How the runs computed, in words, for the `amp` setting."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return "float32 throughout"
    name = str(dtype).removeprefix("torch.")
    return f"the forward under CPU autocast to {name} (--amp {amp}; loss and Adam in float32)"


def accuracy_cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """Final test accuracy per norm (mean ± sample std over seeds), as a Markdown table."""
    epochs = results["config"]["epochs"]
    rows = []
    for norm, s in results["summary"].items():
        acc = accuracy_cell(s["final_acc_mean"], s["final_acc_std"])
        seconds = s["seconds_mean"]
        rows.append([norm, acc, str(s["runs"]), f"{seconds / epochs:.1f}", f"{seconds:.1f}"])
    header = [
        "norm",
        f"test accuracy after {count(epochs, 'epoch')} (%)",
        "seeds",
        "seconds / epoch",
        "seconds / run",
    ]
    return markdown_table(header, rows)


def epoch_table(results: dict[str, Any]) -> str:
    """Mean test accuracy per epoch, one column per norm."""
    norms = list(dict.fromkeys(r["norm"] for r in results["runs"]))
    rows = []
    for epoch in range(1, results["config"]["epochs"] + 1):
        row = [str(epoch)]
        for norm in norms:
            accs = [
                r["epochs"][epoch - 1]["test_acc"]
                for r in results["runs"]
                if r["norm"] == norm and len(r["epochs"]) >= epoch
            ]
            row.append(f"{statistics.fmean(accs):.2f}" if accs else "")
        rows.append(row)
    return markdown_table(["epoch", *norms], rows)


def write_report(results: dict[str, Any], out: Path) -> None:
    cfg, env = results["config"], results["environment"]
    data = env.get("data") or {}
    settings = markdown_table(["setting", "value"], [[k, f"`{v!r}`"] for k, v in cfg.items()])
    environment = markdown_table(
        ["", ""],
        [
            ["bnlab", f"{env['bnlab']} (commit {env['git_commit'] or 'unknown'})"],
            ["torch / Python", f"{env['torch']} / {env['python']}"],
            [
                "device",
                f"{env['device']}: {env['device_name']}, {count(env['threads'], 'thread')} per run",
            ],
            [
                "data",
                f"{data.get('path')} ({data.get('layout')} layout, fingerprint {data.get('fingerprint')})",
            ],
        ],
    )
    done = sum(len(r["epochs"]) for r in results["runs"])
    planned = len(results["runs"]) * cfg["epochs"]
    status = "" if done == planned else f"\n**Partial results: {done} of {planned} epochs done.**\n"
    text = f"""# LeNet-5 on CIFAR-10: {" vs ".join(results["summary"]) or "no finished run"}
{status}
Command: `{env.get("command") or "(not recorded)"}`

Adam (lr {cfg["lr"]}), cross-entropy, batch {cfg["batch_size"]}, {count(cfg["epochs"], "epoch")},
{"all" if cfg["limit_train"] is None else f"the first {cfg['limit_train']}"} training images,
{precision_text(cfg.get("amp", "off"))}; test accuracy on the whole test set. One run per norm and seed (seeds {cfg["seeds"]}).

## Final test accuracy

{summary_table(results)}

## Test accuracy per epoch (%, mean over seeds)

{epoch_table(results)}

## Curves

![test accuracy and training loss per epoch]({CURVES})

## Settings

{settings}

## Environment

{environment}
"""
    write_text(out / REPORT, text)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """curves.png and report.md, each replaced atomically."""
    plot_curves(results, out / CURVES)
    write_report(results, out)


class PartialReports:
    """Rewrites report.md and curves.png while the runs train, so an interrupted run has both.

    At most every `every` seconds, and never more often than keeps their cost
    (a plot takes a noticeable fraction of a second, and the first one imports
    matplotlib) under about 1/`budget` of the time: the comparison must not slow down.
    """

    def __init__(self, out: Path, every: float = 10.0, budget: float = 30.0) -> None:
        self.out, self.every, self.budget = out, every, budget
        self.due = time.monotonic() + every

    def epoch_done(self, results: dict[str, Any]) -> None:
        if time.monotonic() < self.due:
            return
        start = time.monotonic()
        write_outputs(results, self.out)
        cost = time.monotonic() - start
        self.due = time.monotonic() + max(self.every, self.budget * cost)
