"""The runs of a comparison: one after another in this process, or several at once in workers.

LeNet-5 at batch 64 is too small to keep several CPU cores busy: a step with
two threads takes far more than half the time of a step with one, so two
runs side by side, one thread each, finish a comparison sooner than the same
runs one after another with both threads (`benchmarks/bench_experiment.py`
times a comparison). `plan`
makes that the default on the CPU: as many runs at once as torch has threads
(at most one per run), the threads shared evenly among them.

A run's numbers depend on its thread count (float rounding), not on the
process it runs in, so the thread count per run is fixed by the settings and
the machine alone: a resumed comparison trains each run with the threads it
started with, even when fewer runs are left.

Each run saves its own checkpoint after every epoch and only then reports the
epoch, so the caller, which writes results.json, never records an epoch a
resume could not continue from. Workers are spawned processes (fork is unsafe
once torch has started threads); they get the data as numpy arrays (pickled
through a pipe once they have started, so no shared-memory segment the size of
the data set is needed and a worker that dies while starting is reported, not
waited on), report progress and epochs through a queue, and are stopped when
the caller stops (an error, a kill, Ctrl-C). The native kernels are built in
the caller first, so the workers load them from the cache.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bnlab import speedups
from bnlab.data import CIFAR10
from bnlab.experiments.config import Config
from bnlab.experiments.memory import keep_freed_memory
from bnlab.experiments.results import load_checkpoint, save_checkpoint
from bnlab.experiments.train import Bar, EpochResult, MakeBar, terminal_bar, train_run
from bnlab.kernels import _build


class RunFailed(RuntimeError):
    """A run in a worker process raised, or the worker died; the message holds its traceback."""


@dataclass(frozen=True)
class Plan:
    jobs: int  # runs trained at once
    threads: int  # torch threads of each run


def plan(cfg: Config, runs: int, device: torch.device) -> Plan:
    """Runs at once and threads per run, from the settings (0: automatic) and this machine."""
    available = torch.get_num_threads()
    jobs = cfg.jobs or (1 if device.type == "cuda" else max(1, min(runs, available)))
    threads = cfg.threads or (available if jobs == 1 else max(1, available // jobs))
    return Plan(jobs, threads)


@dataclass(frozen=True)
class Task:
    index: int  # in the caller's list of runs
    norm: str
    seed: int
    checkpoint: Path  # saved after every epoch; continued from when `resume`
    resume: bool


@dataclass(frozen=True)
class EpochDone:
    index: int
    result: EpochResult
    history: list[dict[str, float]]  # the run's epochs so far, this one included


def run_tasks(
    cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan, device: torch.device
) -> Iterator[EpochDone]:
    """Train `tasks` as planned; yield each epoch once its checkpoint is saved."""
    if not tasks:
        return
    if how.jobs == 1 or len(tasks) == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(how.threads)
        try:
            for task in tasks:
                yield from _run(cfg, task, data, terminal_bar)
        finally:
            torch.set_num_threads(before)
        return
    yield from _run_in_workers(cfg, tasks, data, how, device)


def _run(cfg: Config, task: Task, data: CIFAR10, make_bar: MakeBar) -> Iterator[EpochDone]:
    checkpoint = load_checkpoint(task.checkpoint) if task.resume else None
    for result, state in train_run(
        cfg, task.norm, task.seed, data, checkpoint=checkpoint, make_bar=make_bar
    ):
        save_checkpoint(task.checkpoint, state)  # first: it alone is enough to resume this run
        yield EpochDone(task.index, result, state["history"])


# ---- workers ------------------------------------------------------------------------
#
# Messages from a worker, all tuples starting with the worker's slot:
#   (slot, "bar", total, desc)   an epoch starts      (slot, "step", n)   n batches done
#   (slot, "loss", text)         the running loss     (slot, "epoch", EpochDone)
#   (slot, "idle")               no task left         (slot, "error", traceback text)


def _portable(data: CIFAR10) -> dict[str, Any]:
    """The data as numpy arrays: pickled by value, where tensors would go to shared memory."""
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in vars(data).items()}


def _restore(fields: dict[str, Any]) -> CIFAR10:
    return CIFAR10(
        **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()}
    )


class _QueueBar:
    """A progress bar drawn by the parent: batches are sent in groups, not one message each."""

    disable = False
    EVERY = 25  # batches per message

    def __init__(self, events: Any, slot: int, total: int, desc: str) -> None:
        self.events, self.slot, self.pending = events, slot, 0
        events.put((slot, "bar", total, desc))

    def update(self, n: int = 1) -> None:
        self.pending += n
        if self.pending >= self.EVERY:
            self._flush()

    def set_postfix(self, **values: Any) -> None:
        self.events.put((self.slot, "loss", values.get("loss", "")))

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.events.put((self.slot, "step", self.pending))
            self.pending = 0


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (the parent stops its workers): unwind, so temporary files are removed.

    The stop is expected, so the unwinding prints nothing: torch's C++ layers
    may report the SystemExit passing through them as an error.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(143)


def _worker(
    slot: int,
    cfg: Config,
    data_pipe: Any,
    threads: int,
    on_cpu: bool,
    tasks: Any,
    events: Any,
) -> None:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(threads)
    if on_cpu:
        keep_freed_memory()  # as the parent does (see memory.py)
    data = _restore(data_pipe.recv())
    data_pipe.close()
    events.put((slot, "ready"))

    def make_bar(total: int, desc: str) -> Bar:
        return _QueueBar(events, slot, total, desc)

    try:
        while (task := tasks.get()) is not None:
            for done in _run(cfg, task, data, make_bar):
                events.put((slot, "epoch", done))
    except SystemExit:
        raise
    except BaseException:
        events.put((slot, "error", traceback.format_exc()))
        raise
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing left to unwind
    events.put((slot, "idle"))


def _run_in_workers(
    cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan, device: torch.device
) -> Iterator[EpochDone]:
    if device.type == "cpu":
        # Build the native modules once, here: the workers then load them from the cache.
        _build.native()  # batch norm
        speedups.available()  # the convolution and pooling of NativeConv2d and ReLUMaxPool2d
    ctx = torch.multiprocessing.get_context("spawn")
    task_queue, events = ctx.Queue(), ctx.Queue()
    for task in tasks:
        task_queue.put(task)
    jobs = min(how.jobs, len(tasks))
    for _ in range(jobs):
        task_queue.put(None)  # one stop sign per worker
    # The data go through a pipe, fed by a thread, after the worker has started: in the
    # spawn arguments they would block start() until the child read them, and a
    # child that dies first (say, re-running an unguarded script) would hang us.
    pipes = [ctx.Pipe(duplex=False) for _ in range(jobs)]
    workers = [
        ctx.Process(
            target=_worker,
            args=(slot, cfg, pipes[slot][0], how.threads, device.type == "cpu", task_queue, events),
            name=f"bnlab-run-{slot}",
            daemon=True,
        )
        for slot in range(jobs)
    ]
    fields = _portable(data)
    bars: dict[int, tqdm] = {}
    ready: set[int] = set()
    finished = False
    try:
        for worker, (receive_end, send_end) in zip(workers, pipes, strict=True):
            worker.start()
            receive_end.close()  # the child has its own copy
            threading.Thread(target=_send, args=(send_end, fields), daemon=True).start()
        idle = 0
        while idle < jobs:
            try:
                message = events.get(timeout=1.0)
            except queue.Empty:
                _check_alive(workers, ready)
                continue
            slot, kind, *payload = message
            if kind == "ready":
                ready.add(slot)
            elif kind == "epoch":
                yield payload[0]
            elif kind == "bar":
                if slot in bars:
                    bars[slot].close()
                total, desc = payload
                bars[slot] = tqdm(
                    total=total,
                    desc=desc,
                    unit="batch",
                    position=slot,
                    leave=False,
                    disable=None,
                    dynamic_ncols=True,
                )
            elif kind == "step":
                bars[slot].update(payload[0])
            elif kind == "loss":
                bars[slot].set_postfix(loss=payload[0])
            elif kind == "idle":
                idle += 1
            else:  # "error"
                raise RunFailed(f"a training run failed in worker {slot}:\n{payload[0]}")
        finished = True
    finally:
        for bar in bars.values():
            bar.close()
        started = [w for w in workers if w.pid is not None]
        for worker in started:
            if not finished and worker.is_alive():
                worker.terminate()
        for worker in started:
            worker.join(timeout=10)
            if worker.is_alive():  # stuck flushing its queue to a parent that stopped reading
                worker.kill()
                worker.join()


def _send(pipe: Any, fields: dict[str, Any]) -> None:
    """Send a worker its data; a worker that died first has nothing to receive them."""
    try:
        pipe.send(fields)
    except OSError:  # its death is reported by the parent's loop
        pass
    finally:
        pipe.close()


def _check_alive(workers: list[Any], ready: set[int]) -> None:
    for slot, worker in enumerate(workers):
        if worker.exitcode in (None, 0):
            continue
        how = f"exit code {worker.exitcode} ({_signal_name(worker.exitcode)})"
        if slot not in ready:
            raise RunFailed(
                f"training worker {worker.name} (pid {worker.pid}) died while starting, with "
                f"{how}. Workers are spawned processes that import the main module again: a "
                'script that runs a comparison must guard it with `if __name__ == "__main__":`.'
            )
        raise RunFailed(
            f"training worker {worker.name} (pid {worker.pid}) died with {how}; every "
            "finished epoch is saved: continue with --resume"
        )


def _signal_name(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return "an error"
