"""`bnlab study eval-mode`: every train/eval x track_running_stats cell, end to end on tiny data."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import bnlab.nn
from bnlab.cli import main
from bnlab.experiments import Config
from bnlab.experiments.studies import EvalModeStudy, run_eval_mode_study
from bnlab.experiments.studies.eval_mode import MODES, without_running_stats

from ._cifar_writers import make_batches, use_tiny_batches, write_bin_layout
from ._cli import error_of
from .test_experiment_train import tiny_cifar

PER_BATCH = 64  # 320 training images, 64 test images

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(line: str) -> None:
    pass


def test_without_running_stats_is_track_running_stats_false_at_construction():
    trained = bnlab.nn.BatchNorm2d(3, dtype=torch.float64)
    trained(torch.randn(8, 3, 4, 4, dtype=torch.float64))  # running statistics move
    built = bnlab.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    ours = without_running_stats(torch.nn.Sequential(trained)).eval()
    assert torch.equal(ours(x), built.eval()(x))  # eval normalizes with the batch's statistics
    assert ours[0].running_mean is None and not ours[0].track_running_stats


def test_every_mode_at_every_test_batch_size(tmp_path):
    base = Config(
        norms=("bn",), seeds=(0, 1), epochs=2, limit_train=96, batch_size=16,
        eval_batch_size=64, device="cpu", jobs=1, out=str(tmp_path / "study"),
    )  # fmt: skip
    study = EvalModeStudy(eval_batch_sizes=(2, 8, 64), base=base)
    results = run_eval_mode_study(study, data=tiny_cifar(n_test=64), log=quiet)
    out = tmp_path / "study"

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["study"] == {"eval_batch_sizes": [2, 8, 64], "precise_batches": None}
    acc = {
        (r["mode"], r["eval_batch_size"], r["seed"]): r["test_acc"] for r in results["evaluations"]
    }
    assert len(acc) == len(MODES) * 3 * 2
    trained = {run["seed"]: run["epochs"][-1]["test_acc"] for run in results["runs"]}
    for seed in (0, 1):
        # eval mode with running statistics is what training reported
        assert acc["eval-running", 64, seed] == trained[seed]
        for b in (2, 8, 64):
            # LeNet-5 has no dropout: the three batch-statistics cells compute the same outputs
            batch = acc["eval-batch", b, seed]
            assert acc["train-tracking", b, seed] == batch == acc["train-untracked", b, seed]
            # running statistics make each image's prediction independent of its batch
            assert abs(acc["eval-running", b, seed] - trained[seed]) <= 100 / 64
    summary = {(r["mode"], r["eval_batch_size"]): r for r in results["summary"]}
    assert set(summary) == {(m, b) for m in MODES for b in (2, 8, 64)}
    assert all(r["runs"] == 2 and r["acc_std"] is not None for r in summary.values())
    assert len(results["training"]) == 1 and results["training"][0]["runs"] == 2

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "eval_batch_size", "seed", "test_acc"]
    assert len(rows) == len(acc)
    assert (out / "eval-mode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| test batch | eval-running | eval-batch |" in report
    assert len(list((out / "runs" / "train" / "checkpoints").glob("*.pt"))) == 2


def test_cli(tmp_path, monkeypatch, capsys):
    use_tiny_batches(monkeypatch, PER_BATCH)
    data = write_bin_layout(tmp_path / "data" / "cifar-10-batches-bin", make_batches(PER_BATCH))
    out = tmp_path / "study"
    argv = ["study", "eval-mode", "--norm", "renorm", "--eval-batch-sizes", "16", "64",
            "--precise-batches", "2", "--seeds", "1", "--epochs", "1", "--limit-train", "64",
            "--batch-size", "16", "--jobs", "1", "--device", "cpu", "--data-dir", str(data),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "| test batch |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["norms"] == ["renorm"] and results["config"]["batch_size"] == 16
    assert results["study"] == {"eval_batch_sizes": [16, 64], "precise_batches": 2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-batch-sizes", "1"], "argument --eval-batch-sizes: must be at least 2, got 1"),
        (["--eval-batch-sizes", "8", "8"], "--eval-batch-sizes: 8 given more than once"),
        (["--norm", "gn"], "argument --norm: invalid choice: 'gn'"),
        (["--norms", "bn"], "unrecognized arguments: --norms bn"),
        (["--precise-batches", "0"], "argument --precise-batches: must be at least 1, got 0"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert message in error_of(["study", "eval-mode", *argv], capsys)
