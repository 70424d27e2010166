"""The `bnlab` command: argument errors, end-to-end runs on tiny CIFAR files, real data when present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bnlab.cli
from bnlab.cli import main

from ._cifar_writers import BATCHES, write_bin_layout

PER_BATCH = 64  # images per tiny batch file: 320 training images, 64 test images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-10 in the official bin layout; the label sets the brightness, so it is learnable."""
    import bnlab.data.cifar10

    monkeypatch.setattr(bnlab.data.cifar10, "_RECORDS_PER_BATCH", PER_BATCH)
    rng = np.random.default_rng(0)
    batches = {}
    for name in BATCHES:
        labels = rng.integers(0, 10, PER_BATCH)
        images = (
            30 + 20 * labels[:, None, None, None] + rng.integers(-40, 41, (PER_BATCH, 3, 32, 32))
        )
        batches[name] = (images.clip(0, 255).astype(np.uint8), labels)
    write_bin_layout(tmp_path / "data" / "cifar-10-batches-bin", batches)
    return tmp_path / "data"


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["compare", "--epochs", "-3"], "argument --epochs: must be at least 1, got -3"),
        (["train", "--norm", "groupnorm"], "argument --norm: invalid choice: 'groupnorm'"),
        (
            ["compare", "--norms", "bn", "layernorm"],
            "argument --norms: invalid choice: 'layernorm'",
        ),
        (
            ["train", "--batch-size", "1"],
            "--batch-size 1: batch norm needs at least 2 images per batch",
        ),
        (["compare", "--norms", "none", "torch-bn", "--batch-size", "1"], "(norm torch-bn)"),
        (["train", "--limit-train", "-5"], "argument --limit-train: must be at least 2, got -5"),
        (["train", "--seed", "-1"], "argument --seed: must be at least 0, got -1"),
        (["compare", "--seeds", "0"], "argument --seeds: must be at least 1, got 0"),
        (["train", "--lr", "0"], "argument --lr: must be positive, got 0"),
        (["train", "--lr", "fast"], "argument --lr: not a number: 'fast'"),
        (["compare", "--norms", "bn", "bn"], "--norms: bn given more than once"),
        (["train", "--resume"], "--resume needs --out DIR"),
        (["train", "--threads", "-1"], "argument --threads: must be at least 0"),
        (["compare", "--jobs", "-1"], "argument --jobs: must be at least 0, got -1"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    err = error_of(argv, capsys)
    assert message in err
    assert err.startswith("usage: bnlab")


def test_batch_size_1_without_bn_is_allowed_by_the_parser():
    parser = bnlab.cli.build_parser()
    args = parser.parse_args(["train", "--norm", "none", "--batch-size", "1"])
    cfg = bnlab.cli.COMMANDS["train"][2](args)
    bnlab.cli._check(cfg, args.command_parser)  # no SystemExit
    assert cfg.batch_size == 1 and cfg.norms == ("none",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    assert "--device cuda: CUDA is not available" in error_of(["train", "--device", "cuda"], capsys)


def test_config_from_arguments():
    parser = bnlab.cli.build_parser()
    compare_args = parser.parse_args(["compare", "--seeds", "2", "--norms", "torch-bn", "none"])
    cfg = bnlab.cli.COMMANDS["compare"][2](compare_args)
    assert cfg.seeds == (0, 1) and cfg.norms == ("torch-bn", "none")
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (10, 0.01, 64)  # the original script's
    train_args = parser.parse_args(
        ["train", "--seed", "7", "--no-channels-last", "--limit-train", "100"]
    )
    cfg = bnlab.cli.COMMANDS["train"][2](train_args)
    assert (cfg.norms, cfg.seeds, cfg.channels_last, cfg.limit_train) == (("bn",), (7,), False, 100)


def test_compare_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "compare",
        "--seeds",
        "2",
        "--epochs",
        "3",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch  3/3" in printed and "| bn |" in printed and "| none |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["data"]["layout"] == "bin"
    assert results["environment"]["command"] == "bnlab " + " ".join(argv)
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        losses = [e["train_loss"] for e in run["epochs"]]
        assert losses[-1] < losses[0], (run["norm"], losses)
    for name in ("metrics.csv", "report.md", "curves.png"):
        assert (out / name).is_file()


def test_train_writes_to_a_default_folder(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--norm", "none", "--epochs", "1", "--data-dir", str(data_dir)]) == 0
    [out] = (tmp_path / "runs").iterdir()
    assert out.name.startswith("train-")
    assert json.loads((out / "results.json").read_text())["config"]["norms"] == ["none"]


def test_refused_out_and_changed_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "train",
        "--norm",
        "none",
        "--epochs",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    capsys.readouterr()

    err = error_of(argv, capsys)
    assert f"--out {out}: the folder exists and is not empty; pass --resume" in err

    err = error_of([*argv, "--resume", "--epochs", "2", "--batch-size", "32"], capsys)
    assert "the settings differ" in err
    assert "epochs: 1 -> 2" in err and "batch_size: 64 -> 32" in err

    assert main([*argv, "--resume"]) == 0  # same settings: nothing left to do, fine


def test_resume_after_interrupt_via_cli(data_dir, tmp_path, capsys, monkeypatch):
    import bnlab.experiments.runner as runner

    out = tmp_path / "out"
    argv = [
        "train",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    real_save = runner.save_checkpoint
    saved = []

    def save_then_maybe_die(path, state):
        real_save(path, state)
        saved.append(state["epochs_done"])
        if len(saved) == 1:
            raise KeyboardInterrupt  # Ctrl-C right after epoch 1 was saved

    monkeypatch.setattr(runner, "save_checkpoint", save_then_maybe_die)
    assert main(argv) == 130
    assert f"--out {out} --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert saved == [1, 2, 3]
    resumed = json.loads((out / "results.json").read_text())["runs"][0]["epochs"]

    straight = tmp_path / "straight"
    assert (
        main(
            [
                "train",
                "--epochs",
                "3",
                "--device",
                "cpu",
                "--data-dir",
                str(data_dir),
                "--out",
                str(straight),
            ]
        )
        == 0
    )
    expected = json.loads((straight / "results.json").read_text())["runs"][0]["epochs"]
    assert [(e["train_loss"], e["test_acc"]) for e in resumed] == [
        (e["train_loss"], e["test_acc"]) for e in expected
    ]


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "data" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    (folder / "batches.meta.txt").write_text("\n".join("abcdefghij") + "\n")
    assert (
        main(
            [
                "train",
                "--epochs",
                "1",
                "--data-dir",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error:") and "missing data_batch_1.bin" in err


def _real_data() -> str | None:
    path = os.environ.get("BNLAB_DATA")
    if not path:
        return None
    root = Path(path)
    found = any((root / d).is_dir() for d in ("cifar-10-batches-bin", "cifar-10-batches-py"))
    return path if found or root.name.startswith("cifar-10-batches") else None


@pytest.mark.slow
@pytest.mark.skipif(
    _real_data() is None, reason="real CIFAR-10 not found: set BNLAB_DATA to its folder"
)
def test_real_data_beats_chance(tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--norm", "bn", "--epochs", "1", "--limit-train", "2000", "--out", str(out)]
    assert main(argv) == 0
    [run] = json.loads((out / "results.json").read_text())["runs"]
    assert run["epochs"][0]["test_acc"] > 15  # chance is 10%
