"""`bnlab train --nproc 2`: one LeNet-5 trained data-parallel by torchrun's ranks, for real;
and `bnlab compare` under torchrun, its runs spread over the ranks.

Each command starts torch's elastic launcher in a session of its own, with two
gloo ranks on a tiny learnable CIFAR-10, so every process it leaves can be
found in /proc and killed if a test fails. Every wait is bounded.
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
import torch
import torch.nn.functional as F

from bnlab.experiments.ddp_train import shard

from ._cifar_writers import make_learnable_batches, write_bin_layout

PER_BATCH = 200  # images per batch file
LIMIT = 640  # training images: 10 steps of 64 per epoch
EPOCHS = 3
TIMEOUT = 120  # for any one command
SETTLE_SECONDS = 5.0  # the most that may pass between killing the launcher and its ranks' end
CURVE_RTOL = 1e-3

# The ranks run this script (the launcher passes its own script on), which reads tiny batch files.
PROGRAM = f"""\
import sys
import bnlab.data.cifar10 as c
c._RECORDS_PER_BATCH = {PER_BATCH}
from bnlab.cli import main
sys.exit(main())
"""

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with the script and a learnable tiny CIFAR-10 (the label sets the brightness)."""
    root = tmp_path_factory.mktemp("ddp")
    batches = make_learnable_batches(PER_BATCH)
    write_bin_layout(root / "data" / "cifar-10-batches-bin", batches)
    (root / "bnlab_tiny.py").write_text(PROGRAM)
    return root


class Command:
    """`bnlab train ... --nproc 2` in a session of its own; its output goes to a file."""

    def __init__(self, place: Path, out: Path, norm: str, epochs: int, *extra: str) -> None:
        self.log = out.with_suffix(".log")
        args = [
            *("train", "--norm", norm, "--nproc", "2", "--epochs", str(epochs)),
            *("--limit-train", str(LIMIT), "--device", "cpu"),
            *("--data-dir", str(place / "data"), "--out", str(out), *extra),
        ]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(place / "bnlab_tiny.py"), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=TIMEOUT)
        finally:
            self.kill_all()

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while text not in self.output():
            assert self.process.poll() is None, f"ended first:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in time:\n{self.output()}"
            time.sleep(0.05)

    def members(self) -> list[int]:
        """Live processes of the command's session (zombies have ended)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):  # ended meanwhile
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[3]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def kill_all(self) -> None:
        for pid in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(timeout=10)


def run(place: Path, out: Path, norm: str, epochs: int, *extra: str) -> str:
    command = Command(place, out, norm, epochs, *extra)
    code = command.finish()
    assert code == 0, command.output()
    return command.output()


def step_losses(out: Path, norm: str) -> list[float]:
    state = torch.load(out / "checkpoints" / f"{norm}-seed0.pt", weights_only=True)
    return state["step_losses"][0]


def all_numbers(results: dict) -> list[tuple]:
    return [
        (run["norm"], e["epoch"], e["train_loss"], e["test_acc"])
        for run in results["runs"]
        for e in run["epochs"]
    ]


def numbers(out: Path) -> list[tuple]:
    results = json.loads((out / "results.json").read_text())
    return [(e["epoch"], e["train_loss"], e["test_acc"]) for e in results["runs"][0]["epochs"]]


def tiny_data(place: Path):
    import bnlab.data.cifar10

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bnlab.data.cifar10, "_RECORDS_PER_BATCH", PER_BATCH)
        return bnlab.data.cifar10.load_cifar10(place / "data")


def one_process_losses(data, limit: int) -> list[float]:
    """The loss at each step of the first epoch, trained here by one process over the whole batch."""
    from bnlab.data import DeviceLoader
    from bnlab.experiments import Config
    from bnlab.experiments.train import build_model, build_optimizer, memory_formats

    cpu = torch.device("cpu")
    model_fmt, data_fmt = memory_formats(Config(device="cpu"), "bn", cpu)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has
    try:
        model = build_model("bn", 0, cpu, model_fmt)
        optimizer = build_optimizer(model, Config().lr)
        loader = DeviceLoader(
            data.train_images[:limit], data.train_labels[:limit], memory_format=data_fmt
        )
        losses = []
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(before)
    return losses


@pytest.fixture(scope="module")
def one_process(place) -> list[float]:
    return one_process_losses(tiny_data(place), LIMIT)


@pytest.fixture(scope="module")
def syncbn_run(place, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("syncbn") / "out"
    return out, run(place, out, "syncbn", EPOCHS)


def relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_shards_cover_the_batch_in_order():
    for world in (1, 2, 3, 5):
        for batch in (0, 1, 7, 64):
            parts = [shard(batch, world, r) for r in range(world)]
            assert [i for p in parts for i in range(batch)[p]] == list(range(batch))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_shards_too_small_are_refused():
    """Batches of 64 and a last one of 2: one image per rank suits syncbn only, none nothing."""
    from bnlab.data import DeviceLoader
    from bnlab.experiments.ddp_train import check_shards
    from bnlab.experiments.outdir import ExperimentError

    images = torch.zeros(66, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(66, dtype=torch.int64))
    check_shards(loader, 2, "syncbn")
    with pytest.raises(ExperimentError, match="a rank 1 of the images"):
        check_shards(loader, 2, "bn")
    with pytest.raises(ExperimentError, match="a rank 0 of the images"):
        check_shards(loader, 3, "syncbn")


def test_syncbn_follows_one_process(syncbn_run, one_process):
    out, _ = syncbn_run
    assert relative(step_losses(out, "syncbn"), one_process) < CURVE_RTOL


def test_per_process_bn_does_not(place, tmp_path, one_process):
    """Each rank normalizes its own 32 images: another training, visibly."""
    out = tmp_path / "out"
    run(place, out, "bn", 1)
    assert relative(step_losses(out, "bn"), one_process) > 10 * CURVE_RTOL


def test_only_rank_0_writes_and_logs(syncbn_run):
    out, output = syncbn_run
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "checkpoints",
        "checkpoints/syncbn-seed0.pt",
        "curves.png",
        "metrics.csv",
        "report.md",
        "results.json",
    ]
    assert output.count(f"epoch  1/{EPOCHS}") == 1
    assert output.count("wrote ") == 1
    assert torch.load(out / "checkpoints" / "syncbn-seed0.pt", weights_only=True)["world_size"] == 2


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_killed_launcher_leaves_no_rank(place, tmp_path, syncbn_run, signame):
    """Killing the launcher ends every rank; after SIGKILL, --resume ends with the numbers of
    an uninterrupted run."""
    out = tmp_path / "out"
    command = Command(place, out, "syncbn", EPOCHS)
    try:
        command.wait_for(f"epoch  1/{EPOCHS}")
        os.kill(command.process.pid, getattr(signal, signame))
        command.process.wait(timeout=TIMEOUT)
        deadline = time.monotonic() + SETTLE_SECONDS
        while command.members() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert command.members() == [], command.output()
    finally:
        command.kill_all()
    assert not [*out.glob(".*.tmp"), *out.glob("checkpoints/.*.tmp")] or signame == "SIGKILL"
    if signame == "SIGKILL":
        run(place, out, "syncbn", EPOCHS, "--resume")
        assert numbers(out) == numbers(syncbn_run[0])


def test_compare_spreads_its_runs_over_the_ranks(place, tmp_path):
    """Three runs on two ranks: the numbers of one process training them one after another."""
    import bnlab.data.cifar10
    from bnlab.experiments import Config, run_compare

    out = tmp_path / "out"
    args = [
        *("compare", "--norms", "bn", "none", "gn", "--seeds", "1", "--epochs", "2"),
        *("--limit-train", str(LIMIT), "--device", "cpu", "--data-dir", str(place / "data")),
        *("--out", str(out)),
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*torchrun, str(place / "bnlab_tiny.py"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    spread = json.loads((out / "results.json").read_text())

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bnlab.data.cifar10, "_RECORDS_PER_BATCH", PER_BATCH)
        data = bnlab.data.cifar10.load_cifar10(place / "data")
    cfg = Config(
        norms=("bn", "none", "gn"), seeds=(0,), epochs=2, limit_train=LIMIT, device="cpu",
        jobs=1, threads=1, out=str(tmp_path / "here"),
    )  # fmt: skip
    here = run_compare(cfg, data=data, log=lambda line: None)
    assert all_numbers(spread) == all_numbers(here)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "bn-seed0.pt",
        "gn-seed0.pt",
        "none-seed0.pt",
    ]


def _first_epoch_steps(rank: int, world: int, data, norm: str, limit: int) -> list[float]:
    from tqdm import tqdm

    from bnlab.experiments import Config
    from bnlab.experiments.ddp_train import ddp_epochs

    cfg = Config(epochs=1, limit_train=limit, device="cpu")
    quiet = lambda total, desc: tqdm(total=total, disable=True)  # noqa: E731
    [(_, state)] = ddp_epochs(cfg, norm, 0, data, torch.device("cpu"), make_bar=quiet)
    return state["step_losses"][0]


def test_uneven_shards_follow_one_process(place):
    """Three ranks share batches of 64 as 22 + 21 + 21 and the last one of 10 as 4 + 3 + 3:
    with each rank's loss scaled by its share, syncbn still follows one process."""
    from ._dist import spawn

    data, limit = tiny_data(place), 3 * 64 + 10
    losses = spawn(_first_epoch_steps, 3, data, "syncbn", limit, limit=TIMEOUT)
    assert losses[0] == losses[1] == losses[2]
    assert relative(losses[0], one_process_losses(data, limit)) < CURVE_RTOL
