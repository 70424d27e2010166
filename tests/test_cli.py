"""The `bnlab` command: argument errors, end-to-end runs on tiny CIFAR files, real data when present."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import bnlab.cli
from bnlab.cli import main
from bnlab.experiments.config import Config

from ._cifar_writers import (
    tiny_cifar_dir,
)
from ._cli import error_of

PER_BATCH = 64  # images per tiny batch file: 320 training images, 64 test images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A tiny CIFAR-10 in the official bin layout; the label sets the brightness, so it is learnable."""
    return tiny_cifar_dir(tmp_path, monkeypatch, PER_BATCH, learnable=True)


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
    bnlab.cli.check_config(cfg, args.command_parser)  # no SystemExit
    assert cfg.batch_size == 1 and cfg.norms == ("none",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    assert "--device cuda: CUDA is not available" in error_of(["train", "--device", "cuda"], capsys)


def test_config_from_arguments():
    parser = bnlab.cli.build_parser()
    compare_args = parser.parse_args(["compare", "--seeds", "2", "--norms", "torch-bn", "none"])
    cfg = bnlab.cli.COMMANDS["compare"][2](compare_args)
    assert cfg.seeds == (0, 1) and cfg.norms == ("torch-bn", "none")
    assert cfg.stack is None  # decided by the device
    stacked = parser.parse_args(["compare", "--stack"])
    assert bnlab.cli.COMMANDS["compare"][2](stacked).stack is True
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


# ---- clear errors, and nothing created by a mistake ----------------------------------


def tree(root: Path) -> list[str]:
    """Everything under `root`, as relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main's exit code (a parser error's too), stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quick(data_dir: Path | None, out: Path, *extra: str, command: str = "train") -> list[str]:
    argv = [command, "--epochs", "1", "--device", "cpu", "--out", str(out), *extra]
    if command == "train":
        argv += ["--norm", "none"]
    return argv + ([] if data_dir is None else ["--data-dir", str(data_dir)])


def test_a_misspelt_data_dir_is_named_and_nothing_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = tree(tmp_path)
    code, _, err = run_main(quick(tmp_path / "cifra", tmp_path / "out"), capsys)
    assert code == 1
    assert f"bnlab: error: {tmp_path / 'cifra'} (from the data_dir argument (--data-dir)): " in err
    assert "no such folder" in err and "--download" in err
    assert tree(tmp_path) == before  # no data folder, no --out, no cache


def test_a_misspelt_bnlab_data_is_named_and_nothing_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "cifra"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = tree(tmp_path)
    code, _, err = run_main(quick(None, tmp_path / "out"), capsys)
    assert code == 1
    assert f"{tmp_path / 'cifra'} (from $BNLAB_DATA): no such folder" in err
    assert tree(tmp_path) == before


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "cifar").write_text("a file")
    code, _, err = run_main(quick(tmp_path / "cifar", tmp_path / "out"), capsys)
    assert code == 1
    assert f"{tmp_path / 'cifar'} is a file, not a folder" in err
    assert "cannot create" not in err and "File exists" not in err
    assert tree(tmp_path) == ["cifar"]


@pytest.mark.parametrize("where", ["under", "at"])
def test_an_out_at_or_under_a_file_is_a_message_not_a_traceback(data_dir, tmp_path, capsys, where):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = file / "sub" if where == "under" else file
    code, _, err = run_main(quick(data_dir, out), capsys)
    assert code == 2 and err.startswith("usage: bnlab train")
    if where == "under":
        assert f"--out {out}: {file} is a file, not a folder, so no folder can be made in it" in err
    else:
        assert f"--out {out}: is a file, not a folder" in err
    assert "Traceback" not in err
    assert file.read_text() == "mine"


def test_resume_of_a_folder_that_does_not_exist_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "typo"
    code, _, err = run_main(quick(data_dir, out, "--resume"), capsys)
    assert code == 2
    assert f"--resume: {out} does not exist, so there are no runs to continue" in err
    assert not out.exists()


def test_resume_of_an_empty_folder_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run_main(quick(data_dir, out, "--resume"), capsys)
    assert code == 2
    assert f"--resume: {out} holds no results.json to continue; drop --resume" in err
    assert list(out.iterdir()) == []


def test_resume_of_another_commands_runs_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    compare = quick(data_dir, out, "--norms", "none", "--seeds", "1", command="compare")
    assert main(compare) == 0
    capsys.readouterr()
    report = (out / "report.md").read_bytes()
    code, _, err = run_main(quick(data_dir, out, "--resume"), capsys)  # train, same settings
    assert code == 2
    assert f"--resume: {out} holds the runs of `bnlab compare`, not `bnlab train`" in err
    assert (out / "report.md").read_bytes() == report
    assert main([*compare, "--resume"]) == 0  # its own command continues it


def test_resume_compares_the_data_folder_by_where_it_is(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(quick(data_dir, out)) == 0
    monkeypatch.setenv("BNLAB_DATA", str(data_dir))  # the same folder, named another way
    assert main(quick(None, out, "--resume")) == 0
    monkeypatch.delenv("BNLAB_DATA")
    spelt = data_dir.parent / "." / data_dir.name / "cifar-10-batches-bin"  # spelt another way
    assert main(quick(spelt, out, "--resume")) == 0
    capsys.readouterr()

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)  # the same files elsewhere: another place
    code, _, err = run_main(quick(copy, out, "--resume"), capsys)
    assert code == 2
    assert f"data: {data_dir / 'cifar-10-batches-bin'} -> {copy / 'cifar-10-batches-bin'}" in err


def test_resume_compares_threads_and_device_as_resolved(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert main(quick(data_dir, out, "--device", "auto")) == 0  # auto: cpu; 0 threads: 1
    assert main(quick(data_dir, out, "--resume", "--threads", "1")) == 0
    capsys.readouterr()
    code, _, err = run_main(quick(data_dir, out, "--resume", "--threads", "2"), capsys)
    assert code == 2
    assert "threads per run: 1 -> 2 (the numbers depend on it: add --threads 1)" in err


# ---- no silent nonsense --------------------------------------------------------------


def test_more_threads_than_cores_are_warned_about(data_dir, tmp_path, capsys, monkeypatch):
    import bnlab.experiments.compare as compare

    monkeypatch.setattr(compare, "_cores", lambda: 2)
    assert main(quick(data_dir, tmp_path / "out", "--threads", "3")) == 0
    printed = capsys.readouterr().out
    assert "warning: 1 run at once x 3 threads = 3 threads on 2 cores" in printed
    assert "many times slower" in printed
    assert main(quick(data_dir, tmp_path / "fine", "--threads", "2")) == 0
    assert "warning" not in capsys.readouterr().out


def test_limit_train_beyond_the_data_says_it_uses_all(data_dir, tmp_path, capsys):
    assert main(quick(data_dir, tmp_path / "out", "--limit-train", "60000")) == 0
    printed = capsys.readouterr().out
    assert "note: --limit-train 60000 is more than the 320 training images there are: " in printed
    assert "using all 320" in printed


def test_the_header_counts_in_words_and_shows_the_runs_at_once(tmp_path, capsys, monkeypatch):
    import bnlab.experiments.compare as compare

    from .test_experiment_train import tiny_cifar

    def no_training(*args):
        yield from ()

    lines = []
    monkeypatch.setattr(compare, "run_tasks", no_training)  # the header is all this is about
    cfg = Config(norms=("bn", "none"), seeds=(0,), epochs=1, jobs=8, threads=1, device="cpu")
    compare.run_compare(
        dataclasses.replace(cfg, out=str(tmp_path / "a")), data=tiny_cifar(), log=lines.append
    )
    assert (
        lines[0].startswith("2 runs of 1 epoch on cpu") and ", 2 at once, 1 thread each" in lines[0]
    )
    lines.clear()
    cfg = dataclasses.replace(cfg, norms=("none",), out=str(tmp_path / "b"), epochs=2, threads=2)
    compare.run_compare(cfg, data=tiny_cifar(), log=lines.append)
    assert lines[0].startswith("1 run of 2 epochs on cpu") and "at once" not in lines[0]
    assert ", 2 threads each, 256 training images" in lines[0]


def test_each_command_offers_only_the_options_that_mean_something_for_it(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    assert "--jobs" not in train_help and "--threads" in train_help and "--download" in train_help
    assert "--stack" not in train_help
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    compare_help = capsys.readouterr().out
    assert "--jobs" in compare_help and "--no-stack" in compare_help
    for text in (train_help, compare_help):
        assert "script" not in text  # the --lr help named a script nobody has
    assert "unrecognized arguments: --jobs 2" in error_of(["train", "--jobs", "2"], capsys)


def test_interrupted_before_anything_is_saved_says_so(data_dir, tmp_path, capsys, monkeypatch):
    import bnlab.experiments.compare as compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "load_cifar10", interrupted)
    out = tmp_path / "out"
    code, _, err = run_main(["train", "--out", str(out)], capsys)
    assert code == 130
    assert "interrupted; nothing was saved." in err and "--resume" not in err
    assert not out.exists()  # made for the run, removed with it


def test_download_into_a_named_folder_only_with_the_flag(tmp_path, capsys, monkeypatch):
    import urllib.request

    calls = []

    def offline(url, timeout):
        calls.append(url)
        raise OSError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    new = tmp_path / "new"
    code, _, err = run_main(quick(new, tmp_path / "out"), capsys)
    assert code == 1 and "no such folder" in err and calls == []
    code, _, err = run_main(quick(new, tmp_path / "out", "--download"), capsys)
    assert code == 1 and "could not download" in err and len(calls) == 1
    assert tree(tmp_path) == []  # the folders made for the download went with it
