"""The real `bnlab compare`, two runs at once, killed every way: nothing outlives it, nothing is
left half-written, a resume ends with the numbers of an uninterrupted run, and one folder
has one writer.

Each command runs in a session of its own, so every process it starts (the workers,
Python's resource tracker) can be found in /proc by that session, and killed by it
if a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._cifar_writers import make_learnable_batches, write_bin_layout

PER_BATCH = 600  # images per batch file: 3000 training images, an epoch well under a second
EPOCHS = 3
SETTLE_SECONDS = 2.0  # the most that may pass between the kill and the last process's end
TIMEOUT = 180  # for any one command: a failing test must not hang

# `bnlab` reading tiny batch files (the reader expects 10000 records per file otherwise).
# Workers never read files (the command sends them the data), so only this process needs it.
PROGRAM = (
    "import sys, bnlab.data.cifar10 as c; "
    f"c._RECORDS_PER_BATCH = {PER_BATCH}; "
    "from bnlab.cli import main; sys.exit(main())"
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A learnable tiny CIFAR-10: the label sets the brightness."""
    root = tmp_path_factory.mktemp("data")
    batches = make_learnable_batches(PER_BATCH)
    write_bin_layout(root / "cifar-10-batches-bin", batches)
    return root


def argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Two runs (bn and none, seed 0), two at once, one thread each."""
    return [
        "compare",
        *("--seeds", "1", "--epochs", str(EPOCHS), "--jobs", "2", "--threads", "1"),
        *("--device", "cpu", "--data-dir", str(data_dir), "--out", str(out), *extra),
    ]


class Command:
    """`bnlab ARGS` started in a session of its own; stdout and stderr go to files."""

    def __init__(self, args: list[str], logs: Path) -> None:
        self.stdout, self.stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-c", PROGRAM, *args],
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.sid = self.process.pid

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in self.stdout.read_text():
            assert self.process.poll() is None, f"ended first:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in time:\n{self.output()}"
            time.sleep(0.05)

    def finish(self) -> int:
        return self.process.wait(timeout=TIMEOUT)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def members(self) -> list[str]:
        return session_members(self.sid)

    def kill_all(self) -> None:
        """End what a failed test would leave: every process of this command's session."""
        for pid in list(_session_pids(self.sid)):
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)


def _session_pids(sid: int) -> dict[int, str]:
    """Live processes of session `sid` (zombies have ended), read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
        if fields[0] != "Z" and int(fields[3]) == sid:
            found[int(entry.name)] = cmdline
    return found


def session_members(sid: int) -> list[str]:
    return sorted(_session_pids(sid).values())


def numbers(results: dict) -> list[tuple]:
    return [
        (run["norm"], run["seed"], e["epoch"], e["train_loss"], e["test_acc"])
        for run in results["runs"]
        for e in run["epochs"]
    ]


def half_written(out: Path) -> list[str]:
    return sorted(p.name for p in [*out.glob(".*.tmp"), *out.glob("checkpoints/.*.tmp")])


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> list[tuple]:
    """The numbers of an uninterrupted run, trained here, one run after the other: the
    numbers depend on the threads per run, not on the process (test_experiment_parallel.py)."""
    import bnlab.data.cifar10
    from bnlab.experiments import Config, run_compare

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bnlab.data.cifar10, "_RECORDS_PER_BATCH", PER_BATCH)
        data = bnlab.data.cifar10.load_cifar10(data_dir)
    out = tmp_path_factory.mktemp("straight") / "out"
    cfg = Config(seeds=(0,), epochs=EPOCHS, jobs=1, threads=1, device="cpu", out=str(out))
    return numbers(run_compare(cfg, data=data, log=lambda line: None))


def wait_until_alone(command: Command) -> float:
    """Seconds until no process of the command's session is left (at most SETTLE_SECONDS)."""
    start = time.monotonic()
    while command.members() and time.monotonic() - start < SETTLE_SECONDS:
        time.sleep(0.05)
    assert command.members() == [], command.output()
    return time.monotonic() - start


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL", "SIGINT", "SIGHUP"])
def test_killed_command_leaves_nothing_running_or_half_written(
    data_dir, tmp_path, straight, signame
):
    out = tmp_path / "out"
    first = Command(argv(data_dir, out), tmp_path / "first")
    try:
        first.wait_for("epoch  1/")
        assert len(first.members()) >= 4  # the command, 2 workers, the resource tracker
        first.process.send_signal(getattr(signal, signame))
        wait_until_alone(first)
        code = first.finish()
    finally:
        first.kill_all()

    stderr = first.stderr.read_text()
    assert half_written(out) == []
    saved = json.loads((out / "results.json").read_text())
    assert 1 <= sum(len(r["epochs"]) for r in saved["runs"]) < 2 * EPOCHS
    if signame == "SIGKILL":
        assert code == -signal.SIGKILL
        assert (out / ".bnlab.lock").exists()  # left behind, but nobody holds it
    else:
        assert code == 128 + getattr(signal, signame)
        assert "leaked" not in stderr and "Traceback" not in stderr, stderr
        assert "every finished epoch is saved. Continue with:" in stderr
        assert f"--out {out} --resume" in stderr
        assert not (out / ".bnlab.lock").exists()
    if signame not in ("SIGTERM", "SIGKILL"):
        return

    again = Command(argv(data_dir, out, "--resume"), tmp_path / "again")
    try:
        assert again.finish() == 0, again.output()
    finally:
        again.kill_all()
    printed = again.stdout.read_text()
    assert "resumed after epoch" in printed
    if signame == "SIGKILL":  # the stale lock is taken over, with a note
        assert f"note: {out}/.bnlab.lock was left by pid {first.process.pid} on host" in printed
    else:
        assert "note:" not in printed
    assert numbers(json.loads((out / "results.json").read_text())) == straight
    assert not (out / ".bnlab.lock").exists()
    assert (out / "report.md").is_file() and (out / "curves.png").is_file()


def test_a_second_command_on_a_busy_folder_is_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    # Long enough to outlast the two refused commands, which start torch in turn.
    first = Command([*argv(data_dir, out), "--epochs", "50"], tmp_path / "first")
    try:
        first.wait_for("epoch  1/")
        for extra, name in (((), "second"), (("--resume",), "resume")):
            other = Command(argv(data_dir, out, *extra), tmp_path / name)
            try:
                assert other.finish() == 2, other.output()
            finally:
                other.kill_all()
            err = other.stderr.read_text()
            assert f"--out {out} is in use by another bnlab: pid {first.process.pid} on host" in err
            assert "Traceback" not in err
        assert first.process.poll() is None  # untouched by the refused commands
        first.process.send_signal(signal.SIGTERM)
        first.finish()
    finally:
        first.kill_all()
