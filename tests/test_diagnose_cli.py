"""`bnlab diagnose RUN_DIR`: a section per checkpoint, clear errors for what is not a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlab.cli import main
from bnlab.experiments.diagnose_runs import find_checkpoints
from bnlab.experiments.outdir import ExperimentError

from ._cifar_writers import tiny_cifar_dir
from ._cli import error_of

PER_BATCH = 64  # 320 training images, 64 test images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    return tiny_cifar_dir(tmp_path, monkeypatch, PER_BATCH, learnable=False)


def test_a_section_per_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(data_dir), "--device", "cpu"]
    argv = ["compare", "--norms", "bn", "frozen", "none", "--seeds", "1", "--epochs", "2",
            "--batch-size", "32", "--eval-batch-size", "64", "--jobs", "1", "--out", str(out)]  # fmt: skip
    assert main(argv + common) == 0
    capsys.readouterr()

    assert main(["diagnose", str(out), "--batches", "3", *common]) == 0
    text = capsys.readouterr().out
    sections = text.split("## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "checkpoints/bn-seed0.pt: bn, seed 0, after epoch 2",
        "checkpoints/frozen-seed0.pt: frozen, seed 0, after epoch 2",
        "checkpoints/none-seed0.pt: none, seed 0, after epoch 2",
    ]
    bn, frozen, none = sections
    assert "| layer | kind | C |" in bn
    for layer in ("| conv1.1 | BatchNorm2d | 6 |", "| fc2.1 | BatchNorm1d | 84 |"):
        assert layer in bn
    assert "its batch norms are frozen" in frozen  # by the end of epoch 2
    assert "no batch norm (norm 'none')" in none


def test_a_folder_without_checkpoints_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = error_of(["diagnose", str(tmp_path / "empty")], capsys)
    assert "no checkpoints in it (looked for checkpoints/*.pt in it and below)" in err
    err = error_of(["diagnose", str(tmp_path / "nowhere")], capsys)
    assert f"{tmp_path / 'nowhere'}: no such folder" in err


def test_an_unreadable_checkpoint_is_named(data_dir, tmp_path, capsys):
    bad = tmp_path / "run" / "checkpoints" / "bn-seed0.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    err = error_of(["diagnose", str(tmp_path / "run"), "--data-dir", str(data_dir)], capsys)
    assert f"{bad}: cannot read the checkpoint" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["diagnose"], "the following arguments are required: RUN_DIR"),
        (["diagnose", "x", "--batches", "0"], "argument --batches: must be at least 1, got 0"),
        (["diagnose", "x", "--batch-size", "1"], "argument --batch-size: must be at least 2"),
        (["diagnose", "x", "--epochs", "2"], "unrecognized arguments: --epochs 2"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert message in error_of(argv, capsys)


def test_finds_the_checkpoints_of_a_study(tmp_path):
    made = [
        tmp_path / "runs" / "batch-2" / "checkpoints" / "bn-seed0.pt",
        tmp_path / "runs" / "batch-16" / "checkpoints" / "gn-seed1.pt",
    ]
    for path in made:
        path.parent.mkdir(parents=True)
        path.touch()
    assert find_checkpoints(tmp_path) == sorted(made)
    (tmp_path / "runs" / "batch-4" / "checkpoints").mkdir(parents=True)  # a cell not started
    with pytest.raises(ExperimentError, match="no checkpoints"):
        find_checkpoints(tmp_path / "runs" / "batch-4")
