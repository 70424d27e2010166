"""The comparison: every norm x every seed, saved after each epoch, resumable.

`run_compare(cfg)` is what `bnlab train` and `bnlab compare` do. It takes the
output folder first (one writer per folder: see lock.py), so every check of
what the folder holds is made by its only writer, once. After every epoch of
every run it saves the run's checkpoint, then results.json and metrics.csv;
report.md and curves.png follow every few seconds and at the end. Runs may
train several at once, in worker processes (see workers.py). A run killed at
any point and started again with `resume=True` continues each run after its
last finished epoch and ends with the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bnlab.data import CIFAR10, load_cifar10
from bnlab.experiments import environment, stacked
from bnlab.experiments.config import Config
from bnlab.experiments.lock import FolderLock
from bnlab.experiments.outdir import (
    ExperimentError,
    check_out,
    check_out_path,
    check_resolved,
    claimed,
    data_place,
    default_out,
)
from bnlab.experiments.report import (
    CURVES,
    PartialReports,
    count,
    precision_text,
    summary_table,
    write_outputs,
)
from bnlab.experiments.results import checkpoint_path, load_checkpoint, summarize, write_results
from bnlab.experiments.runner import (
    EpochDone,
    Plan,
    Task,
    plan,
    planned_threads,
    run_here,
    runs_at_once,
)
from bnlab.experiments.train import EpochResult, resolve_device
from bnlab.experiments.workers import run_in_workers

__all__ = ["ExperimentError", "check_out", "default_out", "run_compare"]

OnEpoch = Callable[[str, int, EpochResult], None]
# (cfg, tasks, data, plan, device, the folder's lock) -> each epoch, once its checkpoint is saved
Runner = Callable[
    [Config, list[Task], CIFAR10, Plan, torch.device, FolderLock], Iterator[EpochDone]
]
REPORT_EVERY_SECONDS = 10.0  # report.md and curves.png while the runs train


def _epoch_line(norm: str, seed: int, epochs: int, r: EpochResult) -> str:
    return (
        f"{norm:>8} seed {seed}  epoch {r.epoch:>2}/{epochs}  "
        f"train loss {r.train_loss:.4f}  test acc {r.test_acc:6.2f}%  "
        f"({r.train_seconds:.1f} s train, {r.eval_seconds:.1f} s eval)"
    )


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_compare(
    cfg: Config,
    *,
    data: CIFAR10 | None = None,
    command: str | None = None,
    kind: str = "compare",
    on_epoch: OnEpoch | None = None,
    log: Callable[[str], None] = tqdm.write,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Train every norm x seed of `cfg`, writing into `cfg.out`; return the results.

    `data` skips loading (benchmarks, tests); `command` (the command line) is
    recorded in the environment and the folder's lock; `kind` is the command's
    name ("train" or "compare"): a resume continues only runs of its kind;
    `on_epoch(norm, seed, result)` is called after each epoch is saved; `log`
    prints a line (tqdm.write keeps progress bars intact); `runner` trains the
    runs left in place of `run_tasks` (as the ranks of a torchrun job do).
    """
    if cfg.out is None:
        raise ExperimentError("no output folder given")
    out = Path(cfg.out)
    check_out_path(out, cfg.resume)  # before anything is created
    device = resolve_device(cfg.device)
    runs = [{"norm": n, "seed": s, "epochs": []} for n in cfg.norms for s in cfg.seeds]
    how = plan(cfg, len(runs), device)
    with claimed(out, command, log) as lock:
        previous = check_out(cfg, kind)
        if previous is not None:  # before the data are read: a refusal should come at once
            place = data.source.path if data is not None else data_place(cfg)
            check_resolved(previous, out, str(device), how.threads, place)
        if data is None:
            data = load_cifar10(cfg.data_dir, download=True if cfg.download else None)
        if previous is not None:
            source = data.source
            check_resolved(previous, out, str(device), how.threads, source.path, source.fingerprint)
        results: dict[str, Any] = {
            "command": kind,
            "config": cfg.to_dict(),
            "environment": {
                **environment.collect(device, data.source, command),
                "threads": how.threads,  # per run
                "jobs": how.jobs,
            },
            "runs": runs,
            "summary": {},
        }

        def save() -> None:
            results["summary"] = summarize(runs, cfg.epochs)
            write_results(out, results)

        tasks, resumed = _tasks(cfg, out, runs)
        for line in [*_header(cfg, len(runs), len(tasks), how, device, data), *resumed]:
            log(line)
        save()  # config and environment first: a resume needs them even if killed in epoch 1
        reports = PartialReports(out, every=REPORT_EVERY_SECONDS)
        train = runner or run_tasks
        with contextlib.closing(train(cfg, tasks, data, how, device, lock)) as epochs:
            for done in epochs:  # each one's checkpoint is already saved
                run = runs[done.index]
                run["epochs"] = done.history
                save()
                log(_epoch_line(run["norm"], run["seed"], cfg.epochs, done.result))
                if on_epoch is not None:
                    on_epoch(run["norm"], run["seed"], done.result)
                reports.epoch_done(results)
        save()
        write_outputs(results, out)
    log("\n" + summary_table(results))
    log(f"\nwrote {out}/: results.json, metrics.csv, report.md, {CURVES}, checkpoints/")
    return results


def run_tasks(
    cfg: Config,
    tasks: list[Task],
    data: CIFAR10,
    how: Plan,
    device: torch.device,
    lock: FolderLock,
) -> Iterator[EpochDone]:
    """Train `tasks` as planned: the runs that stack (see `stacked`) together in this
    process, then the others in this process when one at a time, else in workers
    (which inherit the folder's `lock`). Yields each epoch once its checkpoint is saved."""
    together, alone = stacked.groups(cfg, tasks, device)
    if not together:
        return _run_alone(cfg, alone, data, how, device, lock)
    return _run_stacked_first(cfg, together, alone, data, how, device, lock)


def _run_alone(cfg, tasks, data, how, device, lock) -> Iterator[EpochDone]:
    if runs_at_once(how, len(tasks)) == 1:
        return run_here(cfg, tasks, data, how)
    return run_in_workers(cfg, tasks, data, how, device, lock)


def _run_stacked_first(cfg, together, alone, data, how, device, lock) -> Iterator[EpochDone]:
    with planned_threads(how):
        for group in together:
            yield from stacked.train_stacked(cfg, group, data)
    if alone:
        with contextlib.closing(_run_alone(cfg, alone, data, how, device, lock)) as rest:
            yield from rest


def _tasks(cfg: Config, out: Path, runs: list[dict[str, Any]]) -> tuple[list[Task], list[str]]:
    """The runs left to train (each with its checkpoint, when resumed), and a line per resumed run.

    Each checkpoint is loaded once, here: its history goes into `runs`, its state into the task.
    """
    tasks, resumed = [], []
    for index, run in enumerate(runs):
        norm, seed = run["norm"], run["seed"]
        path = checkpoint_path(out, norm, seed)
        state = load_checkpoint(path) if cfg.resume and path.exists() else None
        if state is not None:
            run["epochs"] = list(state["history"])[: state["epochs_done"]]
            resumed.append(f"{norm:>8} seed {seed}  resumed after epoch {state['epochs_done']}")
            if state["epochs_done"] >= cfg.epochs:
                continue
        tasks.append(Task(index, norm, seed, path, state))
    return tasks, resumed


def _header(
    cfg: Config, runs: int, left: int, how: Plan, device: torch.device, data: CIFAR10
) -> list[str]:
    """What will run, and how, as it will really be: the runs at once, the images used."""
    n_images = len(data.train_images)
    n_train = min(n_images, cfg.limit_train or n_images)
    at_once = runs_at_once(how, left)
    lines = [
        f"{count(runs, 'run')} of {count(cfg.epochs, 'epoch')} on {device} "
        f"({environment.device_name(device)}), "
        + (f"{at_once} at once, " if at_once > 1 else "")
        + f"{count(how.threads, 'thread')} each, {n_train} training images"
        + ("" if cfg.amp == "off" else f"; {precision_text(cfg.amp)}")
    ]
    if cfg.limit_train is not None and cfg.limit_train > n_images:
        lines.append(
            f"note: --limit-train {cfg.limit_train} is more than the {n_images} training "
            f"images there are: using all {n_images}"
        )
    cores = _cores()
    if at_once * how.threads > cores:
        lines.append(
            f"warning: {count(at_once, 'run')} at once x {count(how.threads, 'thread')} = "
            f"{at_once * how.threads} threads on {count(cores, 'core')}: threads beyond the "
            "cores wait for each other at every operation, which can make training many "
            "times slower. Leave --threads (and --jobs) at 0 to share the cores."
        )
    return lines
