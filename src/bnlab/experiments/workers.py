"""Runs trained at once, in a pool of worker processes that never outlive the command.

The pool is `concurrent.futures.ProcessPoolExecutor` with spawned processes
(fork is unsafe once torch has started threads). Each task is one whole run:
its data go with it as numpy arrays (pickled by value: tensors would go to
shared memory), its progress and epochs come back through one queue, and
its failure comes back through its future, with the worker's traceback.

The workers stop when the command stops, whatever stops it:
- each worker watches a pipe whose only writing end the command holds. The
  command writes a byte per worker to stop them; if it dies (even by
  SIGKILL) the kernel closes that end, and the watchers read end-of-file at
  once. A parent-death signal (prctl) would not do: it fires when the
  *thread* that started the worker exits, and the pool starts workers from
  whichever thread happens to need one;
- the watcher then interrupts the worker's main thread with SIGTERM, whose
  handler unwinds a running task, so no temporary file is left, and ends
  the process; a worker that does not end within a grace period is ended
  hard, once the watcher has removed its temporary files. A worker whose
  command died also removes the command's own half-written files (their
  names carry its PID);
- the workers and Python's resource tracker (which the pool's semaphores
  start) are started with SIGINT and SIGHUP blocked: Ctrl-C or a closed
  terminal reach the whole process group, but it is the command that
  decides, and it stops its workers itself. The tracker ends when the last
  process holding its pipe (the command and the workers) is gone;
- the workers inherit the output folder's lock, so a second command cannot
  take the folder while a worker of this one still writes there.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bnlab import speedups
from bnlab.data import CIFAR10
from bnlab.experiments.config import Config
from bnlab.experiments.lock import FolderLock, InheritedLock
from bnlab.experiments.memory import keep_freed_memory
from bnlab.experiments.results import remove_temporary_files
from bnlab.experiments.runner import (
    EpochDone,
    Plan,
    RunFailed,
    Task,
    run_one,
    runs_at_once,
    state_from_bytes,
    state_to_bytes,
)
from bnlab.experiments.train import Bar
from bnlab.kernels import _build

GRACE_SECONDS = 1.0  # a stopped worker that has not unwound by then is ended hard
_POLL_SECONDS = 0.2  # how often the command looks at its futures when no event comes
_CHILDREN_IGNORE = {signal.SIGINT, signal.SIGHUP}


def run_in_workers(
    cfg: Config,
    tasks: list[Task],
    data: CIFAR10,
    how: Plan,
    device: torch.device,
    lock: FolderLock | None,
) -> Iterator[EpochDone]:
    """Train `tasks` in `how.jobs` worker processes; yield each epoch once its checkpoint is saved.

    The workers inherit `lock` (the output folder's), so it stays held until
    the last of them has exited.
    """
    if not tasks:
        return
    if device.type == "cpu":
        # Build the native modules once, here: the workers then load them from the cache.
        _build.native()  # batch norm
        speedups.available()  # the convolution and pooling of NativeConv2d and ReLUMaxPool2d
    ctx = multiprocessing.get_context("spawn")
    jobs = runs_at_once(how, len(tasks))
    fields = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in vars(data).items()}
    out = tasks[0].checkpoint.parent.parent
    stop_reader, stop_writer = ctx.Pipe(duplex=False)
    events, pool, finished = None, None, False
    try:
        with _blocked(_CHILDREN_IGNORE):  # inherited by every process started here
            events = ctx.Queue()
            pool = ProcessPoolExecutor(
                jobs,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(
                    events,
                    stop_reader,
                    lock.inherited() if lock is not None else None,
                    how.threads,
                    device.type == "cpu",
                    os.getpid(),
                    out,
                ),
            )
            futures = {
                pool.submit(
                    _train, cfg, replace(task, state=None), state_to_bytes(task.state), fields
                ): task
                for task in tasks
            }
        yield from _follow(events, futures)
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(OSError):
                # One byte each: a worker reads one, then stops (single bytes cannot be
                # split between readers, where messages could).
                os.write(stop_writer.fileno(), b"s" * jobs)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        stop_writer.close()
        stop_reader.close()
        if events is not None:
            events.close()
            events.join_thread()


@contextlib.contextmanager
def _blocked(signals: set[signal.Signals]) -> Iterator[None]:
    """Block `signals` in this thread for the block: processes started in it inherit the mask."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a pending Ctrl-C arrives now


def _follow(events: Any, futures: dict[Future[None], Task]) -> Iterator[EpochDone]:
    """Draw the workers' progress and yield their epochs until every task is done."""
    bars = _Bars()
    left = {task.index for task in futures.values()}
    heard = False  # from any worker: a pool that breaks before has died while starting
    try:
        while left:
            try:
                kind, index, *payload = events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                _raise_failure(futures, heard)
                continue
            heard = True
            if kind == "epoch":
                yield payload[0]
            elif kind == "bar":
                bars.start(index, *payload)
            elif kind == "step":
                bars.step(index, payload[0])
            elif kind == "loss":
                bars.loss(index, payload[0])
            elif kind == "done":
                bars.end(index)
                left.discard(index)
            _raise_failure(futures, heard)
    finally:
        bars.close()


def _raise_failure(futures: dict[Future[None], Task], heard: bool) -> None:
    for future, task in futures.items():
        if not future.done() or future.cancelled() or future.exception() is None:
            continue
        error = future.exception()
        if isinstance(error, BrokenProcessPool):
            if not heard:
                raise RunFailed(
                    "a training worker died while starting. Workers are spawned processes "
                    "that import the main module again: a script that runs a comparison "
                    'must guard it with `if __name__ == "__main__":`.'
                ) from error
            raise RunFailed(
                "a training worker process died (killed, or out of memory); every finished "
                "epoch is saved: continue with --resume"
            ) from error
        where = str(error.__cause__) if error.__cause__ is not None else repr(error)
        raise RunFailed(
            f"the run {task.norm} seed {task.seed} failed in a worker process:\n{where}"
        ) from error


class _Bars:
    """One tqdm bar per running run, drawn by the command; positions are reused."""

    def __init__(self) -> None:
        self.bars: dict[int, tqdm] = {}
        self.positions: dict[int, int] = {}

    def start(self, index: int, total: int, desc: str) -> None:
        self.end(index, keep_position=True)
        if index not in self.positions:
            used = set(self.positions.values())
            self.positions[index] = next(p for p in range(len(used) + 1) if p not in used)
        self.bars[index] = tqdm(
            total=total,
            desc=desc,
            unit="batch",
            position=self.positions[index],
            leave=False,
            disable=None,
            dynamic_ncols=True,
        )

    def step(self, index: int, n: int) -> None:
        if index in self.bars:
            self.bars[index].update(n)

    def loss(self, index: int, text: str) -> None:
        if index in self.bars:
            self.bars[index].set_postfix(loss=text)

    def end(self, index: int, keep_position: bool = False) -> None:
        bar = self.bars.pop(index, None)
        if bar is not None:
            bar.close()
        if not keep_position:
            self.positions.pop(index, None)

    def close(self) -> None:
        for index in list(self.bars):
            self.end(index)


# ---- in the worker ------------------------------------------------------------------


class _Stop(BaseException):
    """Raised in a worker's main thread when its command stops it (not an error of the run)."""


_events: Any = None
_lock: InheritedLock | None = None  # held, by keeping its descriptor, until the worker exits
_stopping = threading.Event()
_in_task = False


def _init_worker(
    events: Any,
    stop_reader: Any,
    lock: InheritedLock | None,
    threads: int,
    on_cpu: bool,
    command_pid: int,
    out: Path,
) -> None:
    global _events, _lock
    _events, _lock = events, lock
    # A stopped worker must not wait at exit to flush progress that nobody reads any more.
    events.cancel_join_thread()
    signal.signal(signal.SIGTERM, _on_stop)
    torch.set_num_threads(threads)
    if on_cpu:
        keep_freed_memory()  # as the command does (see memory.py)
    threading.Thread(
        target=_watch, args=(stop_reader, command_pid, out), name="bnlab-watch", daemon=True
    ).start()


def _watch(stop_reader: Any, command_pid: int, out: Path) -> None:
    """Wait for "stop" or the command's death; then stop this worker."""
    try:
        stop = os.read(stop_reader.fileno(), 1)
    except OSError:
        stop = b"s"
    if not stop:  # end of file, no writer left: the command died, maybe in the middle of a write
        remove_temporary_files(out, command_pid)
    _stopping.set()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    # Not unwound in time (its main thread still inside a long C call, such as
    # an fsync on a busy disk): this worker's own temporary files go first.
    remove_temporary_files(out, os.getpid())
    os._exit(143)


def _on_stop(signum: int, frame: Any) -> None:
    """SIGTERM: end an idle worker now; unwind a running task first (temporary files go)."""
    _stopping.set()
    if not _in_task:
        os._exit(128 + signum)
    # The stop is expected, so the unwinding prints nothing: torch's C++ layers
    # may report the exception passing through them as an error.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    raise _Stop


class _QueueBar:
    """A progress bar drawn by the command: batches are sent in groups, not one message each."""

    disable = False
    EVERY = 25  # batches per message

    def __init__(self, index: int, total: int, desc: str) -> None:
        self.index, self.pending = index, 0
        _events.put(("bar", index, total, desc))

    def update(self, n: int = 1) -> None:
        self.pending += n
        if self.pending >= self.EVERY:
            self._flush()

    def set_postfix(self, **values: Any) -> None:
        _events.put(("loss", self.index, values.get("loss", "")))

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.pending:
            _events.put(("step", self.index, self.pending))
            self.pending = 0


def _train(cfg: Config, task: Task, state: bytes | None, fields: dict[str, Any]) -> None:
    """One whole run, in a worker: epochs and progress go to the queue, errors to the future."""
    global _in_task
    _in_task = True
    try:
        if _stopping.is_set():
            raise _Stop
        data = CIFAR10(
            **{
                k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in fields.items()
            }
        )
        task = replace(task, state=state_from_bytes(state))

        def make_bar(total: int, desc: str) -> Bar:
            return _QueueBar(task.index, total, desc)

        for done in run_one(cfg, task, data, make_bar):
            _events.put(("epoch", task.index, done))
        _events.put(("done", task.index))
    except BaseException:
        if _stopping.is_set():
            os._exit(143)  # unwound: no temporary file is left
        raise
    finally:
        _in_task = False
