"""The comparison's output folder: files, schema, resume after a kill, refusals."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import pytest

import bnlab.experiments.compare as compare
from bnlab.experiments import Config, ExperimentError, run_compare
from bnlab.experiments.plots import curves_figure
from bnlab.experiments.results import CSV_COLUMNS, load_checkpoint

from .test_experiment_train import tiny_cifar

EPOCH_KEYS = {
    "epoch": int,
    "train_loss": float,
    "test_acc": float,
    "train_seconds": float,
    "eval_seconds": float,
    "seconds": float,
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands for a kill: raised in the middle of an experiment."""


def config(tmp_path, **kw) -> Config:
    base = {
        "norms": ("bn", "none"),
        "seeds": (0, 1),
        "epochs": 2,
        "eval_batch_size": 50,
        "device": "cpu",  # exact equality across runs holds on the CPU
        "jobs": 1,  # in this process (runs in workers: test_experiment_parallel.py)
        "out": str(tmp_path / "run"),
    }
    return Config(**{**base, **kw})


def numbers(results: dict) -> list[tuple]:
    """Everything a run computes (not its timings)."""
    return [
        (run["norm"], run["seed"], e["epoch"], e["train_loss"], e["test_acc"])
        for run in results["runs"]
        for e in run["epochs"]
    ]


def quiet(line: str) -> None:
    pass


def test_output_files(tmp_path):
    cfg = config(tmp_path, epochs=1)
    results = run_compare(cfg, data=tiny_cifar(), command="bnlab compare", log=quiet)
    out = tmp_path / "run"

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved) == {"command", "config", "environment", "runs", "summary"}
    assert saved["command"] == "compare"
    assert saved["config"]["norms"] == ["bn", "none"] and saved["config"]["epochs"] == 1
    env = saved["environment"]
    for key in ("bnlab", "torch", "python", "git_commit", "device_name", "threads", "data"):
        assert key in env
    assert isinstance(env["torch"], str) and isinstance(env["threads"], int)
    assert env["data"] == {"path": "memory", "layout": "bin", "fingerprint": "0" * 16}
    assert env["command"] == "bnlab compare"
    assert [(r["norm"], r["seed"]) for r in saved["runs"]] == [
        ("bn", 0),
        ("bn", 1),
        ("none", 0),
        ("none", 1),
    ]
    for run in saved["runs"]:
        assert isinstance(run["norm"], str) and isinstance(run["seed"], int)
        [epoch] = run["epochs"]
        assert set(epoch) == set(EPOCH_KEYS)
        for key, kind in EPOCH_KEYS.items():
            assert isinstance(epoch[key], kind), key
    for norm in ("bn", "none"):
        s = saved["summary"][norm]
        assert isinstance(s["final_acc_mean"], float) and isinstance(s["final_acc_std"], float)
        assert isinstance(s["seconds_mean"], float)

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 4
    assert float(rows[0]["test_acc"]) == saved["runs"][0]["epochs"][0]["test_acc"]

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| norm | test accuracy after 1 epoch (%)" in report
    assert "Partial results" not in report
    assert "](curves.png)" in report
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "bn-seed0.pt",
        "bn-seed1.pt",
        "none-seed0.pt",
        "none-seed1.pt",
    ]
    assert not list(out.glob(".*.tmp"))  # no temporary file left behind
    assert not (out / ".bnlab.lock").exists()  # released, and gone with the command


def test_one_seed_has_no_std(tmp_path):
    results = run_compare(
        config(tmp_path, norms=("none",), seeds=(0,), epochs=1), data=tiny_cifar(), log=quiet
    )
    assert results["summary"]["none"]["final_acc_std"] is None


def test_epoch_lines_and_summary_table_are_printed(tmp_path):
    lines = []
    run_compare(
        config(tmp_path, norms=("bn",), seeds=(0,), epochs=2), data=tiny_cifar(), log=lines.append
    )
    text = "\n".join(lines)
    assert "epoch  1/2  train loss" in text and "test acc" in text
    assert "| bn |" in text


def interrupted_then_resumed(
    tmp_path, cfg, monkeypatch, kill_after_epochs: int, where: str
) -> dict:
    data = tiny_cifar()
    calls = {"n": 0}

    def on_epoch(norm, seed, result):
        calls["n"] += 1
        if calls["n"] == kill_after_epochs:
            raise Killed

    if where == "after epoch":
        with pytest.raises(Killed):
            run_compare(cfg, data=data, on_epoch=on_epoch, log=quiet)
    else:  # killed after the checkpoint was saved but before results.json was
        real = compare.write_results

        def write_results(out, results):
            calls["n"] += 1
            if calls["n"] == kill_after_epochs + 1:  # +1: the write before the first epoch
                raise Killed
            real(out, results)

        with monkeypatch.context() as m:
            m.setattr(compare, "write_results", write_results)
            with pytest.raises(Killed):
                run_compare(cfg, data=data, log=quiet)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    finished = sum(len(r["epochs"]) for r in saved["runs"])
    assert finished == (kill_after_epochs if where == "after epoch" else kill_after_epochs - 1)
    return run_compare(dataclasses.replace(cfg, resume=True), data=data, log=quiet)


@pytest.mark.parametrize(
    ("kill_after_epochs", "where"),
    [(1, "after epoch"), (3, "after epoch"), (2, "before results.json")],
)
def test_resume_gives_the_numbers_of_an_uninterrupted_run(
    tmp_path, monkeypatch, kill_after_epochs, where
):
    cfg = config(tmp_path, seeds=(0,))
    straight = run_compare(
        dataclasses.replace(cfg, out=str(tmp_path / "straight")), data=tiny_cifar(), log=quiet
    )
    resumed = interrupted_then_resumed(tmp_path, cfg, monkeypatch, kill_after_epochs, where)
    assert numbers(resumed) == numbers(straight)
    assert resumed["summary"].keys() == straight["summary"].keys()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert numbers(saved) == numbers(straight)


def test_resume_of_a_finished_run_trains_nothing(tmp_path):
    cfg = config(tmp_path, norms=("none",), seeds=(0,), epochs=1)
    first = run_compare(cfg, data=tiny_cifar(), log=quiet)
    lines = []
    again = run_compare(dataclasses.replace(cfg, resume=True), data=tiny_cifar(), log=lines.append)
    assert numbers(again) == numbers(first)
    assert not any("train loss" in line for line in lines)


def test_checkpoint_loads_with_weights_only(tmp_path):
    run_compare(config(tmp_path, norms=("bn",), seeds=(0,), epochs=1), data=tiny_cifar(), log=quiet)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "bn-seed0.pt")
    assert state["epochs_done"] == 1 and state["loader_epoch"] == 1
    assert {"model", "optimizer", "rng", "history"} <= set(state)


def test_non_empty_out_is_refused_without_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ExperimentError, match="not empty; pass --resume"):
        run_compare(config(tmp_path), data=tiny_cifar(), log=quiet)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_with_changed_settings_names_them(tmp_path):
    cfg = config(tmp_path, norms=("none",), seeds=(0,), epochs=1)
    run_compare(cfg, data=tiny_cifar(), log=quiet)
    changed = dataclasses.replace(cfg, resume=True, epochs=2, lr=0.1)
    with pytest.raises(ExperimentError) as e:
        run_compare(changed, data=tiny_cifar(), log=quiet)
    assert "epochs: 1 -> 2" in str(e.value) and "lr: 0.01 -> 0.1" in str(e.value)
    assert "batch_size" not in str(e.value)


def test_resume_with_other_data_is_refused(tmp_path):
    cfg = config(tmp_path, norms=("none",), seeds=(0,), epochs=1)
    run_compare(cfg, data=tiny_cifar(seed=0), log=quiet)
    with pytest.raises(ExperimentError, match="data: the files differ"):
        run_compare(dataclasses.replace(cfg, resume=True), data=tiny_cifar(seed=1), log=quiet)


def test_curves_figure_has_a_band_per_norm_and_whole_epoch_ticks():
    def run(norm, seed, accs):
        epochs = [
            {"epoch": i + 1, "test_acc": a, "train_loss": 2.0 - a / 100} for i, a in enumerate(accs)
        ]
        return {"norm": norm, "seed": seed, "epochs": epochs}

    results = {
        "runs": [
            run("bn", 0, [40.0, 45.0]),
            run("bn", 1, [42.0, 46.0]),
            run("none", 0, [30.0, 35.0]),
        ]
    }
    fig = curves_figure(results)
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["bn (n=2)", "none (n=1)"]
        assert len(ax.collections) == 1  # the ± std band: only bn has two seeds
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 2]
        assert ticks and all(float(t).is_integer() for t in ticks)
    accuracy = fig.axes[0].get_lines()[0].get_ydata()
    assert list(accuracy) == [41.0, 45.5]  # the mean over seeds


def test_report_and_curves_are_readable_while_the_runs_train(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "REPORT_EVERY_SECONDS", 0.0)  # as soon as an epoch ends
    cfg = config(tmp_path, seeds=(0,), epochs=1)
    seen = []

    def on_epoch(norm, seed, result):
        seen.append(result)
        if len(seen) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_compare(cfg, data=tiny_cifar(), on_epoch=on_epoch, log=quiet)
    out = tmp_path / "run"
    report = (out / "report.md").read_text()  # as written after the first epoch
    assert "**Partial results: 1 of 2 epochs done.**" in report
    assert "| bn | " in report and "| none | " not in report  # bn's run is done
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))


def test_partial_reports_wait_their_turn(tmp_path):
    from bnlab.experiments.report import PartialReports

    reports = PartialReports(tmp_path, every=60.0)
    reports.epoch_done({"runs": [], "config": {}, "environment": {}, "summary": {}})
    assert list(tmp_path.iterdir()) == []  # not due yet: nothing drawn


def test_temporary_files_of_a_dead_writer_are_told_apart(tmp_path):
    from bnlab.experiments.results import remove_temporary_files, write_text

    write_text(tmp_path / "kept.txt", "whole")  # a finished write leaves no temporary file
    (tmp_path / "checkpoints").mkdir()
    dead = [
        tmp_path / ".results.json.4242.abc.tmp",
        tmp_path / "checkpoints/.bn-seed0.pt.4242.x.tmp",
    ]
    other = tmp_path / ".metrics.csv.4243.def.tmp"
    for path in [*dead, other]:
        path.write_text("half")
    assert remove_temporary_files(tmp_path, 4242) == 2  # what a worker does when its command died
    assert [p.exists() for p in [*dead, other]] == [False, False, True]
    assert remove_temporary_files(tmp_path) == 1  # what a command does that takes over a lock
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "kept.txt"]


def test_a_stop_right_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A worker's stop raises wherever its main thread is, even just after the temporary
    file is created: the write still removes it."""
    from bnlab.experiments import results

    class Stop(BaseException):
        pass

    real_open = os.open

    def open_then_stop(*args, **kwargs):
        real_open(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(os, "open", open_then_stop)
    with pytest.raises(Stop), results.atomic_open(tmp_path / "x.pt") as f:
        f.write(b"never")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over_with_a_note_and_its_leftovers_go(tmp_path):
    cfg = config(tmp_path, norms=("none",), seeds=(0,), epochs=1)
    first = run_compare(cfg, data=tiny_cifar(), log=quiet)
    out = tmp_path / "run"
    # What a SIGKILL in the middle of a write leaves: the lock file and a temporary file.
    (out / ".bnlab.lock").write_text('{"pid": 4242, "host": "elsewhere"}')
    (out / ".results.json.4242.abc.tmp").write_text('{"half')
    lines = []
    again = run_compare(dataclasses.replace(cfg, resume=True), data=tiny_cifar(), log=lines.append)
    assert numbers(again) == numbers(first)
    assert f"note: {out}/.bnlab.lock was left by pid 4242 on host elsewhere" in lines[0]
    assert "note: removed 1 half-written temporary file it left" in lines[1]
    assert not list(out.glob(".*"))  # lock released, leftover removed
