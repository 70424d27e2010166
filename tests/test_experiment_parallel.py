"""Runs trained at once in worker processes: same numbers, resumable, errors brought home."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.experiments import Config, run_compare
from bnlab.experiments.runner import Plan, RunFailed, plan

from .test_experiment_compare import Killed, config, numbers, quiet
from .test_experiment_train import tiny_cifar

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def in_workers(tmp_path, name: str, **kw) -> Config:
    """Two runs, one thread each, in two workers."""
    return config(tmp_path, seeds=(0,), jobs=2, threads=1, out=str(tmp_path / name), **kw)


def test_workers_give_the_numbers_of_runs_in_this_process(tmp_path):
    data = tiny_cifar()
    here = run_compare(
        config(tmp_path, seeds=(0,), jobs=1, threads=1, out=str(tmp_path / "here")),
        data=data,
        log=quiet,
    )
    lines = []
    there = run_compare(in_workers(tmp_path, "there"), data=data, log=lines.append)
    assert numbers(there) == numbers(here)
    saved = json.loads((tmp_path / "there" / "results.json").read_text())
    assert numbers(saved) == numbers(here)
    assert saved["environment"]["jobs"] == 2 and saved["environment"]["threads"] == 1
    assert "2 at once, 1 thread each" in lines[0]
    assert sum("train loss" in line for line in lines) == 4  # 2 runs x 2 epochs
    checkpoints = sorted(p.name for p in (tmp_path / "there" / "checkpoints").iterdir())
    assert checkpoints == ["bn-seed0.pt", "none-seed0.pt"]
    assert multiprocessing.active_children() == []


def test_kill_during_worker_runs_then_resume(tmp_path):
    data = tiny_cifar()
    straight = run_compare(in_workers(tmp_path, "straight"), data=data, log=quiet)

    cfg = in_workers(tmp_path, "run")

    def on_epoch(norm, seed, result):
        raise Killed  # the parent stops after the first epoch it records

    with pytest.raises(Killed):
        run_compare(cfg, data=data, on_epoch=on_epoch, log=quiet)
    assert multiprocessing.active_children() == []  # the workers were stopped
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sum(len(r["epochs"]) for r in saved["runs"]) == 1
    assert not list((tmp_path / "run").rglob(".*.tmp"))  # no half-written file left

    resumed = run_compare(dataclasses.replace(cfg, resume=True), data=data, log=quiet)
    assert numbers(resumed) == numbers(straight)


def test_a_failing_run_is_reported_with_its_traceback(tmp_path):
    data = tiny_cifar()
    data.train_labels[5] = 12  # no such class: cross_entropy raises inside the worker
    with pytest.raises(
        RunFailed, match=r"(?s)the run (bn|none) seed 0 failed in a worker.*out of bounds"
    ):
        run_compare(in_workers(tmp_path, "run"), data=data, log=quiet)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("settings", "runs", "device", "available", "expected"),
    [
        ({}, 4, CPU, 2, Plan(jobs=2, threads=1)),  # one run per thread
        ({}, 2, CPU, 8, Plan(jobs=2, threads=4)),  # threads shared by the runs at once
        ({}, 1, CPU, 2, Plan(jobs=1, threads=2)),  # one run keeps every thread
        ({}, 6, CPU, 1, Plan(jobs=1, threads=1)),
        ({}, 4, CUDA, 16, Plan(jobs=1, threads=16)),  # one GPU: one run at a time
        ({"jobs": 3}, 6, CPU, 2, Plan(jobs=3, threads=1)),
        ({"jobs": 1}, 6, CPU, 4, Plan(jobs=1, threads=4)),
        ({"threads": 3}, 2, CPU, 2, Plan(jobs=2, threads=3)),
        ({"jobs": 8}, 2, CPU, 2, Plan(jobs=2, threads=1)),  # at most one per run
        ({"jobs": 8}, 2, CPU, 8, Plan(jobs=2, threads=4)),  # the threads go to the runs there are
    ],
)
def test_plan(monkeypatch, settings, runs, device, available, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: available)
    assert plan(Config(**settings), runs, device) == expected


def test_plan_counts_every_run_not_the_runs_left(tmp_path, monkeypatch):
    """A resume keeps the threads per run it started with, however few runs are left
    (the numbers depend on the thread count)."""
    cfg = config(tmp_path, seeds=(0,), epochs=1, jobs=0, threads=0)  # automatic
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two cores, as it were
    first = run_compare(cfg, data=tiny_cifar(), log=quiet)
    assert (first["environment"]["jobs"], first["environment"]["threads"]) == (2, 1)
    again = run_compare(dataclasses.replace(cfg, resume=True), data=tiny_cifar(), log=quiet)
    assert (again["environment"]["jobs"], again["environment"]["threads"]) == (2, 1)
    assert numbers(again) == numbers(first)


def test_runs_in_this_process_leave_the_callers_threads_as_they_were(tmp_path):
    torch.set_num_threads(2)  # the one_thread fixture restores its own value afterwards
    run_compare(
        config(tmp_path, norms=("none",), seeds=(0,), epochs=1, jobs=1, threads=1),
        data=tiny_cifar(),
        log=quiet,
    )
    assert torch.get_num_threads() == 2


UNGUARDED_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from bnlab.experiments import Config, run_compare
from tests.test_experiment_train import tiny_cifar

# No `if __name__ == "__main__":` guard: each spawned worker runs this again.
cfg = Config(seeds=(0,), epochs=1, jobs=2, threads=1, device="cpu", out={out!r})
run_compare(cfg, data=tiny_cifar())
"""


def test_unguarded_script_fails_fast_with_the_fix(tmp_path):
    """A worker that dies before it receives its data (here: re-running a script with no
    main guard) stops the comparison with an error that says what to do, not a hang."""
    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT.format(root=root, out=str(tmp_path / "out")))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "RunFailed" in done.stderr and "died while starting" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr


def test_a_worker_ended_hard_leaves_no_temporary_file(tmp_path):
    """A stopped worker whose main thread does not unwind within the grace period (stuck
    in a C call; here, SIGTERM blocked) is ended by its watcher, which first removes the
    worker's temporary files."""
    script = """
import os, signal, sys, threading, time
from pathlib import Path
from bnlab.experiments import results, workers

out = Path(sys.argv[1])
read_end, write_end = os.pipe()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # no handler will run
reader = os.fdopen(read_end, "rb")
threading.Thread(target=workers._watch, args=(reader, os.getppid(), out), daemon=True).start()
with results.atomic_open(out / "checkpoints" / "bn-seed0.pt") as f:
    f.write(b"half")
    os.write(write_end, b"s")  # the command says stop
    time.sleep(60)
"""
    (tmp_path / "checkpoints").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=60
    )
    assert done.returncode == 143, done.stderr.decode()
    assert list(tmp_path.rglob("*.tmp")) == []
