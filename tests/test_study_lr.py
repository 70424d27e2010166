"""`bnlab study lr`: end to end on tiny data, its files, bad arguments."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.experiments import Config
from bnlab.experiments.studies import LRStudy, run_lr_study

from ._cifar_writers import make_batches, use_tiny_batches, write_bin_layout
from ._cli import error_of
from .test_experiment_train import tiny_cifar

PER_BATCH = 64  # 320 training images, 64 test images

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(line: str) -> None:
    pass


def test_each_norm_at_each_learning_rate(tmp_path):
    base = Config(
        norms=("bn", "none"), seeds=(0, 1), epochs=2, limit_train=96, batch_size=32,
        eval_batch_size=64, device="cpu", jobs=1, out=str(tmp_path / "study"),
    )  # fmt: skip
    results = run_lr_study(LRStudy(lrs=(1e-3, 0.1), base=base), data=tiny_cifar(), log=quiet)
    out = tmp_path / "study"

    assert results["command"] == "study lr"
    assert results["study"] == {"lrs": [1e-3, 0.1]}
    assert [(r["lr"], r["norm"], r["runs"]) for r in results["summary"]] == [
        (1e-3, "bn", 2), (1e-3, "none", 2), (0.1, "bn", 2), (0.1, "none", 2)
    ]  # fmt: skip
    for lr in (1e-3, 0.1):  # each learning rate is a comparison, with its own lr
        cell = json.loads((out / "runs" / f"lr-{lr:g}" / "results.json").read_text())
        assert cell["config"]["lr"] == lr and cell["config"]["batch_size"] == 32
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["lr", "norm", "seed"] and len(rows) == 2 * 2 * 2 * 2
    assert (out / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lr | bn | none |" in (out / "report.md").read_text()


def test_cli(tmp_path, monkeypatch, capsys):
    use_tiny_batches(monkeypatch, PER_BATCH)
    data = write_bin_layout(tmp_path / "data" / "cifar-10-batches-bin", make_batches(PER_BATCH))
    out = tmp_path / "study"
    argv = ["study", "lr", "--lrs", "0.001", "--norms", "bn", "--seeds", "1", "--epochs", "1",
            "--limit-train", "64", "--eval-batch-size", "64", "--jobs", "1", "--device", "cpu",
            "--data-dir", str(data), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "| 0.001 |" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["study"] == {"lrs": [0.001]}
    assert Path(out / "runs" / "lr-0.001" / "checkpoints" / "bn-seed0.pt").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lrs", "0"], "argument --lrs: must be positive, got 0"),
        (["--lrs", "fast"], "argument --lrs: not a number: 'fast'"),
        (["--lrs", "0.1", "0.1"], "--lrs: 0.1 given more than once"),
        (["--norms", "bn", "bn"], "--norms: bn given more than once"),
        (["--batch-size", "1"], "--batch-size 1: batch norm needs at least 2 images per batch"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert message in error_of(["study", "lr", *argv], capsys)


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    import bnlab.experiments.studies.cells as cells

    use_tiny_batches(monkeypatch, PER_BATCH)
    data = write_bin_layout(tmp_path / "data" / "cifar-10-batches-bin", make_batches(PER_BATCH))
    out = tmp_path / "study"
    argv = ["study", "lr", "--lrs", "0.001", "0.01", "--norms", "none", "--seeds", "1",
            "--epochs", "1", "--limit-train", "64", "--eval-batch-size", "64", "--jobs", "1",
            "--device", "cpu", "--data-dir", str(data), "--out", str(out)]  # fmt: skip
    trained, interrupted = [], []
    real = cells.run_compare

    def second_cell_interrupted(cfg, **kwargs):
        if cfg.lr == 0.01 and not interrupted:
            interrupted.append(cfg.lr)
            raise KeyboardInterrupt
        trained.append((cfg.lr, cfg.resume))
        return real(cfg, **kwargs)

    monkeypatch.setattr(cells, "run_compare", second_cell_interrupted)
    assert main(argv) == 130
    assert f"Continue with:\n  {' '.join(['bnlab', *argv])} --resume" in capsys.readouterr().err
    partial = json.loads((out / "results.json").read_text())
    assert [r["lr"] for r in partial["runs"]] == [0.001]

    assert main([*argv, "--resume"]) == 0
    assert trained == [(0.001, False), (0.001, True), (0.01, False)]  # the first cell resumed
    done = json.loads((out / "results.json").read_text())
    assert done["runs"][0] == partial["runs"][0]
    assert [r["lr"] for r in done["runs"]] == [0.001, 0.01]
