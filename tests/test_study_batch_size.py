"""`bnlab study batch-size`: end to end on tiny data, its files, resume, refusals, bad arguments."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.experiments import Config
from bnlab.experiments.studies import BatchSizeStudy, run_batch_size_study
from bnlab.experiments.studies.batch_size import scaled_lr

from ._cifar_writers import tiny_cifar_dir
from ._cli import error_of
from .test_experiment_train import tiny_cifar

PER_BATCH = 64  # 320 training images, 64 test images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    return tiny_cifar_dir(tmp_path, monkeypatch, PER_BATCH, learnable=False)


def quiet(line: str) -> None:
    pass


def test_scaled_lr():
    assert scaled_lr(0.01, 64, "sqrt") == 0.01
    assert scaled_lr(0.01, 16, "sqrt") == pytest.approx(0.005)
    assert scaled_lr(0.01, 256, "linear") == pytest.approx(0.04)
    assert scaled_lr(0.01, 2, "none") == 0.01
    with pytest.raises(ValueError, match="unknown lr scaling 'cube'"):
        scaled_lr(0.01, 2, "cube")


def test_every_norm_at_every_batch_size(tmp_path):
    base = Config(
        norms=("bn", "ghost", "gn"), seeds=(0, 1), epochs=1, limit_train=96,
        eval_batch_size=64, device="cpu", jobs=1, out=str(tmp_path / "study"),
    )  # fmt: skip
    study = BatchSizeStudy(batch_sizes=(4, 32), base=base)
    results = run_batch_size_study(study, data=tiny_cifar(n_test=64), log=quiet)
    out = tmp_path / "study"

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["command"] == "study batch-size"
    assert results["study"] == {"batch_sizes": [4, 32], "lr_scaling": "sqrt"}
    assert results["seconds"] > 0
    cells = [(r["batch_size"], r["norm"]) for r in results["summary"]]
    assert cells == [(b, n) for b in (4, 32) for n in ("bn", "ghost", "gn")]
    assert all(r["runs"] == 2 and r["final_acc_std"] is not None for r in results["summary"])
    lrs = {r["batch_size"]: r["lr"] for r in results["runs"]}
    assert lrs == {4: pytest.approx(0.0025), 32: pytest.approx(0.01 / math.sqrt(2))}
    # ghost batch norm over chunks of 16 is batch norm at batch 4: the same numbers
    at_4 = {(r["norm"], r["seed"]): r["epochs"] for r in results["runs"] if r["batch_size"] == 4}
    for seed in (0, 1):
        strip = [(e["train_loss"], e["test_acc"]) for e in at_4["bn", seed]]
        assert strip == [(e["train_loss"], e["test_acc"]) for e in at_4["ghost", seed]]

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["batch_size", "lr", "norm", "seed", "epoch", "train_loss",
                             "test_acc", "train_seconds", "eval_seconds"]  # fmt: skip
    assert len(rows) == 2 * 3 * 2
    assert (out / "batch-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| batch | bn | ghost | gn |" in report and "![" in report
    for b in (4, 32):  # each batch size is a comparison folder, checkpoints and all
        cell = out / "runs" / f"batch-{b}"
        assert json.loads((cell / "results.json").read_text())["config"]["batch_size"] == b
        assert len(list((cell / "checkpoints").glob("*.pt"))) == 6


def test_cli_runs_resumes_and_refuses(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "batch-size", "--batch-sizes", "8", "16", "--norms", "bn", "none",
            "--seeds", "1", "--epochs", "1", "--limit-train", "64", "--eval-batch-size", "64",
            "--jobs", "1", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["environment"]["command"].startswith("bnlab study batch-size")
    assert {p.name for p in out.iterdir()} >= {
        "results.json", "metrics.csv", "batch-size.png", "report.md", "runs"
    }  # fmt: skip
    assert "| batch | bn | none |" in capsys.readouterr().out

    assert "the folder exists and is not empty" in error_of(argv, capsys)
    assert main([*argv, "--resume"]) == 0  # every cell is done: nothing trains again
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == first["runs"]
    err = error_of([*argv[:3], "8", "32", *argv[5:], "--resume"], capsys)
    assert "batch_sizes: [8, 16] -> [8, 32]" in err
    err = error_of([*argv, "--resume", "--epochs", "2"], capsys)
    assert "epochs: 1 -> 2" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "1"], "argument --batch-sizes: must be at least 2, got 1"),
        (["--batch-sizes", "4", "4"], "--batch-sizes: 4 given more than once"),
        (["--lr-scaling", "cube"], "argument --lr-scaling: invalid choice: 'cube'"),
        (["--norms", "bn", "layernorm"], "argument --norms: invalid choice: 'layernorm'"),
        (["--eval-batch-sizes", "8"], "unrecognized arguments: --eval-batch-sizes 8"),
        (["--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
        (["--resume"], "--resume needs --out DIR"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert message in error_of(["study", "batch-size", *argv], capsys)


def test_a_study_is_required(capsys):
    assert "required: STUDY" in error_of(["study"], capsys)
    assert "invalid choice: 'width'" in error_of(["study", "width"], capsys)
