"""report.md and the summary table printed at the end of a run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bnlab.experiments.results import write_text

REPORT = "report.md"
CURVES = "curves.png"


def _acc(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """Final test accuracy per norm (mean ± sample std over seeds), as a Markdown table."""
    epochs = results["config"]["epochs"]
    rows = []
    for norm, s in results["summary"].items():
        acc = _acc(s["final_acc_mean"], s["final_acc_std"])
        seconds = s["seconds_mean"]
        rows.append([norm, acc, str(s["runs"]), f"{seconds / epochs:.1f}", f"{seconds:.1f}"])
    header = [
        "norm",
        f"test accuracy after {epochs} epochs (%)",
        "seeds",
        "seconds / epoch",
        "seconds / run",
    ]
    return _table(header, rows)


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
    return _table(["epoch", *norms], rows)


def write_report(results: dict[str, Any], out: Path) -> None:
    cfg, env = results["config"], results["environment"]
    data = env.get("data") or {}
    settings = _table(["setting", "value"], [[k, f"`{v!r}`"] for k, v in cfg.items()])
    environment = _table(
        ["", ""],
        [
            ["bnlab", f"{env['bnlab']} (commit {env['git_commit'] or 'unknown'})"],
            ["torch / Python", f"{env['torch']} / {env['python']}"],
            ["device", f"{env['device']}: {env['device_name']}, {env['threads']} threads"],
            [
                "data",
                f"{data.get('path')} ({data.get('layout')} layout, fingerprint {data.get('fingerprint')})",
            ],
        ],
    )
    text = f"""# LeNet-5 on CIFAR-10: {" vs ".join(results["summary"]) or "no finished run"}

Command: `{env.get("command") or "(not recorded)"}`

Adam (lr {cfg["lr"]}), cross-entropy, batch {cfg["batch_size"]}, {cfg["epochs"]} epochs,
{"all" if cfg["limit_train"] is None else f"the first {cfg['limit_train']}"} training images;
test accuracy on the whole test set. One run per norm and seed (seeds {cfg["seeds"]}).

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
