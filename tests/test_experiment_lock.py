"""One writer per output folder: the lock refuses a second holder, names the first, is taken
over when its holder died, and stays held by the workers a killed command leaves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnlab.experiments.lock import LOCK, FolderBusy, FolderLock, busy_holder

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    lock = FolderLock.acquire(tmp_path, "bnlab compare --out x")
    try:
        info = json.loads((tmp_path / LOCK).read_text())
        assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(FolderBusy) as e:
            FolderLock.acquire(tmp_path)  # another open file: another holder
        expected = f"pid {os.getpid()} on host {socket.gethostname()} (`bnlab compare --out x`)"
        assert f"{tmp_path} is in use by another bnlab: {expected}" == str(e.value)
        assert busy_holder(tmp_path) == expected
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()
    assert busy_holder(tmp_path) is None
    FolderLock.acquire(tmp_path).release()  # free again


def test_looking_creates_nothing(tmp_path):
    assert busy_holder(tmp_path / "absent") is None
    assert busy_holder(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_file_whose_holder_died_is_taken_over(tmp_path):
    left = {"pid": 2**22 + 1, "host": "elsewhere", "command": "bnlab train"}
    (tmp_path / LOCK).write_text(json.dumps(left))
    assert busy_holder(tmp_path) is None  # nobody holds it
    lock = FolderLock.acquire(tmp_path)
    try:
        assert lock.left_by == left
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def hold(lock: object, seconds: float) -> None:
    """A worker's life, in short: it holds the inherited lock while it runs."""
    time.sleep(seconds)


# A command that starts a worker and dies as SIGKILL would end it: without releasing.
KILLED_COMMAND = """
import multiprocessing, os, sys
from pathlib import Path
from bnlab.experiments.lock import FolderLock
from tests.test_experiment_lock import hold

if __name__ == "__main__":
    lock = FolderLock.acquire(Path(sys.argv[1]), "bnlab compare")
    worker = multiprocessing.get_context("spawn").Process(target=hold, args=(lock.inherited(), 60))
    worker.start()
    print(worker.pid, flush=True)
    os._exit(0)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_workers_of_a_killed_command_keep_the_folder_locked(tmp_path):
    folder, log = tmp_path / "out", tmp_path / "log"
    folder.mkdir()
    with log.open("w") as f:  # not a pipe: the worker keeps its copy open for a minute
        done = subprocess.run(
            [sys.executable, "-c", KILLED_COMMAND, str(folder)],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert done.returncode == 0, log.read_text()
    worker = int(log.read_text())
    try:
        holder = busy_holder(folder)
        assert holder is not None
        assert "which has ended; its worker processes are still stopping" in holder
        with pytest.raises(FolderBusy):
            FolderLock.acquire(folder)
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    lock = FolderLock.acquire(folder)  # the last holder is gone
    try:
        assert lock.left_by is not None and lock.left_by["command"] == "bnlab compare"
    finally:
        lock.release()
