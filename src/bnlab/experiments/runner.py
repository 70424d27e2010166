"""The runs of a comparison: how many at once, with how many threads; each run's epochs.

LeNet-5 at batch 64 is too small to keep several CPU cores busy: a step with
two threads takes far more than half the time of a step with one, so two
runs side by side, one thread each, finish a comparison sooner than the same
runs one after another with both threads (`benchmarks/bench_experiment.py`
times a comparison). `plan` makes that the default on the CPU: as many runs
at once as torch has threads (at most one per run), the threads shared
evenly among them.

A run's numbers depend on its thread count (float rounding), not on the
process it runs in, so the thread count per run is fixed by the settings and
the machine alone: a resumed comparison trains each run with the threads it
started with, even when fewer runs are left.

Each run saves its own checkpoint after every epoch and only then reports the
epoch, so the caller, which writes results.json, never records an epoch a
resume could not continue from. `run_here` trains runs one after another
in this process; workers.py trains several at once.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnlab.data import CIFAR10
from bnlab.experiments.config import Config
from bnlab.experiments.results import save_checkpoint
from bnlab.experiments.train import EpochResult, MakeBar, terminal_bar, train_run


class RunFailed(RuntimeError):
    """A run in a worker process raised, or the worker died; the message holds its traceback."""


@dataclass(frozen=True)
class Plan:
    jobs: int  # runs trained at once
    threads: int  # torch threads of each run


def plan(cfg: Config, runs: int, device: torch.device) -> Plan:
    """Runs at once and threads per run, from the settings (0: automatic) and this machine.

    `runs` counts every run of the comparison, finished or not, so a resume
    gets the threads per run of the start. More runs at once than runs would
    only thin the threads.
    """
    available = torch.get_num_threads()
    auto = 1 if device.type == "cuda" else available
    jobs = max(1, min(runs, cfg.jobs or auto))
    threads = cfg.threads or (available if jobs == 1 else max(1, available // jobs))
    return Plan(jobs, threads)


@dataclass(frozen=True)
class Task:
    index: int  # in the caller's list of runs
    norm: str
    seed: int
    checkpoint: Path  # saved after every epoch
    state: dict[str, Any] | None = None  # a loaded checkpoint to continue from


@dataclass(frozen=True)
class EpochDone:
    index: int
    result: EpochResult
    history: list[dict[str, float]]  # the run's epochs so far, this one included


def runs_at_once(how: Plan, tasks: int) -> int:
    return max(1, min(how.jobs, tasks))


@contextlib.contextmanager
def planned_threads(how: Plan) -> Iterator[None]:
    """torch's threads set to the plan's per run for the block; the caller's restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(how.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_here(cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan) -> Iterator[EpochDone]:
    """Train `tasks` one after another in this process, with the planned threads;
    yield each epoch once its checkpoint is saved. The caller's thread count is restored."""
    with planned_threads(how):
        for task in tasks:
            yield from run_one(cfg, task, data, terminal_bar)


def run_one(cfg: Config, task: Task, data: CIFAR10, make_bar: MakeBar) -> Iterator[EpochDone]:
    for result, state in train_run(
        cfg, task.norm, task.seed, data, checkpoint=task.state, make_bar=make_bar
    ):
        save_checkpoint(task.checkpoint, state)  # first: it alone is enough to resume this run
        yield EpochDone(task.index, result, state["history"])


def state_to_bytes(state: dict[str, Any] | None) -> bytes | None:
    """A checkpoint state as torch.save bytes: sent to a worker by value, strides and all.

    (Tensors pickled through multiprocessing would go to shared memory.)
    """
    if state is None:
        return None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def state_from_bytes(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
