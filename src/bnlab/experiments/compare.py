"""The comparison: every norm x every seed, saved after each epoch, resumable.

`run_compare(cfg)` is what `bnlab train` and `bnlab compare` do. After every
epoch of every run it saves the run's checkpoint, then results.json and
metrics.csv; at the end report.md and curves.png. Runs may train several at
once, in worker processes (see runner.py). A run killed at any point and
started again with `resume=True` continues each run after its last finished
epoch and ends with the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bnlab.data import CIFAR10, load_cifar10
from bnlab.experiments import environment
from bnlab.experiments.config import Config, changed_settings
from bnlab.experiments.plots import plot_curves
from bnlab.experiments.report import CURVES, summary_table, write_report
from bnlab.experiments.results import (
    checkpoint_path,
    load_checkpoint,
    load_results,
    summarize,
    write_results,
)
from bnlab.experiments.runner import Task, plan, run_tasks
from bnlab.experiments.train import EpochResult, resolve_device

OnEpoch = Callable[[str, int, EpochResult], None]


class ExperimentError(ValueError):
    """A refused output folder or resume; the message says why and what to do."""


def default_out(command: str) -> str:
    return str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_out(cfg: Config) -> dict[str, Any] | None:
    """Refuse an output folder that would mix runs; return the results to resume, if any.

    Cheap (no data is read), so the CLI calls it before anything slow.
    """
    if cfg.out is None:
        raise ExperimentError("no output folder given")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out}: exists and is not a folder")
    nonempty = out.is_dir() and any(out.iterdir())
    if not cfg.resume:
        if nonempty:
            raise ExperimentError(
                f"--out {out}: the folder exists and is not empty; "
                "pass --resume to continue the runs in it, or choose another folder"
            )
        return None
    previous = load_results(out)
    if previous is None:
        if nonempty:
            raise ExperimentError(f"--resume: {out} holds no results.json to continue")
        return None
    changed = changed_settings(Config.from_dict(previous["config"]), cfg)
    if changed:
        raise ExperimentError(
            f"--resume: the settings differ from those of the runs in {out}:\n  "
            + "\n  ".join(changed)
            + "\nresume with the same settings, or start a new --out"
        )
    return previous


def _epoch_line(norm: str, seed: int, epochs: int, r: EpochResult) -> str:
    return (
        f"{norm:>8} seed {seed}  epoch {r.epoch:>2}/{epochs}  "
        f"train loss {r.train_loss:.4f}  test acc {r.test_acc:6.2f}%  "
        f"({r.train_seconds:.1f} s train, {r.eval_seconds:.1f} s eval)"
    )


def run_compare(
    cfg: Config,
    *,
    data: CIFAR10 | None = None,
    command: str | None = None,
    on_epoch: OnEpoch | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Train every norm x seed of `cfg`, writing into `cfg.out`; return the results.

    `data` skips loading (benchmarks, tests); `command` is recorded in the
    environment; `on_epoch(norm, seed, result)` is called after each epoch is
    saved; `log` prints a line (tqdm.write keeps progress bars intact).
    """
    previous = check_out(cfg)
    out = Path(cfg.out)  # check_out refused None
    if data is None:
        data = load_cifar10(cfg.data_dir)
    if previous is not None:
        old = (previous["environment"].get("data") or {}).get("fingerprint")
        if old is not None and old != data.source.fingerprint:
            raise ExperimentError(
                f"--resume: the data differ from those of the runs in {out} "
                f"(fingerprint {old} -> {data.source.fingerprint})"
            )
    device = resolve_device(cfg.device)
    runs = [{"norm": n, "seed": s, "epochs": []} for n in cfg.norms for s in cfg.seeds]
    how = plan(cfg, len(runs), device)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "environment": {
            **environment.collect(device, data.source, command),
            "threads": how.threads,  # per run
            "jobs": how.jobs,
        },
        "runs": runs,
        "summary": {},
    }
    n_train = min(len(data.train_images), cfg.limit_train or len(data.train_images))
    where = f"{device} ({environment.device_name(device)})"
    at_once = f"{how.jobs} at once, " if how.jobs > 1 else ""
    log(
        f"{len(runs)} runs of {cfg.epochs} epochs on {where}, {at_once}"
        f"{how.threads} threads each, {n_train} training images"
    )

    def save() -> None:
        results["summary"] = summarize(runs, cfg.epochs)
        write_results(out, results)

    save()  # config and environment first: a resume needs them even if killed in epoch 1
    tasks = []
    for index, run in enumerate(runs):
        norm, seed = run["norm"], run["seed"]
        path = checkpoint_path(out, norm, seed)
        resume = cfg.resume and path.exists()
        if resume:
            checkpoint = load_checkpoint(path)
            run["epochs"] = list(checkpoint["history"])[: checkpoint["epochs_done"]]
            log(f"{norm:>8} seed {seed}  resumed after epoch {checkpoint['epochs_done']}")
            if checkpoint["epochs_done"] >= cfg.epochs:
                continue
        tasks.append(Task(index, norm, seed, path, resume))

    with contextlib.closing(run_tasks(cfg, tasks, data, how, device)) as epochs:
        for done in epochs:  # each one's checkpoint is already saved
            run = runs[done.index]
            run["epochs"] = done.history
            save()
            log(_epoch_line(run["norm"], run["seed"], cfg.epochs, done.result))
            if on_epoch is not None:
                on_epoch(run["norm"], run["seed"], done.result)

    save()
    plot_curves(results, out / CURVES)
    write_report(results, out)
    log("\n" + summary_table(results))
    log(f"\nwrote {out}/: results.json, metrics.csv, report.md, {CURVES}, checkpoints/")
    return results
