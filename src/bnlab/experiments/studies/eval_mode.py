"""`bnlab study eval-mode`: one trained BN model in each cell of the train/eval x
track_running_stats table, at several test batch sizes, and after precise_bn.

The table (as the seed document teaches it):

                        track_running_stats=True         track_running_stats=False
    model.train()       batch statistics; the running    batch statistics; no running
                        statistics move                  statistics
    model.eval()        running statistics               each test batch's statistics

Training is the same function in both columns (batch statistics), so one
trained model serves every cell: each cell rebuilds it from its checkpoint and
sets the flags (track_running_stats=False as at construction: no buffers, so
eval mode uses batch statistics too). LeNet-5 has no dropout, so the three
batch-statistics cells compute the same outputs; the train-mode pass with
tracking also overwrites the running statistics with the test set's, which
the row "eval after a train-mode pass" measures. Batch statistics at test time
depend on the test batch: the smaller, the noisier. precise_bn replaces the
running averages with the exact statistics of the training images.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from bnlab.data import CIFAR10, DeviceLoader
from bnlab.experiments.config import Config
from bnlab.experiments.report import accuracy_cell, count
from bnlab.experiments.results import checkpoint_path, load_checkpoint
from bnlab.experiments.studies.cells import RUNS, cell, cell_runs, cell_summary
from bnlab.experiments.studies.config import EvalModeStudy
from bnlab.experiments.studies.output import (
    csv_text,
    grid_table,
    images_text,
    plot_name,
    report_text,
)
from bnlab.experiments.studies.plots import sweep_figure
from bnlab.experiments.studies.session import study_run
from bnlab.experiments.train import amp_context, memory_formats, resolve_device, restore_model
from bnlab.toolkit import precise_bn

KIND = "study eval-mode"
NAME = "eval-mode"
TRAIN_CELL = "train"
# mode -> its legend; the order of the table's columns and the plot's lines
MODES = {
    "eval-running": "eval, running stats (track=True)",
    "eval-batch": "eval, batch stats (track=False)",
    "train-tracking": "train mode, track=True",
    "train-untracked": "train mode, track=False",
    "eval-after-train-pass": "eval after the train-mode pass (track=True)",
    "eval-precise-bn": "eval, precise_bn stats",
}


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def without_running_stats(model: nn.Module) -> nn.Module:
    """Each batch norm as if built with track_running_stats=False: no buffers, so eval mode
    normalizes with batch statistics too (only the flag, set later, would leave them used)."""
    for bn in _batch_norms(model):
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return model


@torch.no_grad()
def accuracy(model: nn.Module, loader: DeviceLoader) -> float:
    """Accuracy in percent, the model left in the mode it is in (train mode moves buffers)."""
    correct, seen = 0, 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return 100.0 * correct / seen


def evaluate_modes(
    checkpoint: dict[str, Any],
    cfg: Config,
    data: CIFAR10,
    eval_batch_sizes: tuple[int, ...],
    precise_batches: int | None,
) -> list[dict[str, Any]]:
    """The checkpoint's model in every mode at every test batch size: a row each.

    The forwards run in the precision the model trained in (`cfg.amp`).
    """
    device = resolve_device(cfg.device)
    with amp_context(cfg, device):
        return _mode_rows(checkpoint, cfg, data, device, eval_batch_sizes, precise_batches)


def _mode_rows(
    checkpoint: dict[str, Any],
    cfg: Config,
    data: CIFAR10,
    device: torch.device,
    eval_batch_sizes: tuple[int, ...],
    precise_batches: int | None,
) -> list[dict[str, Any]]:
    model_fmt, data_fmt = memory_formats(cfg, checkpoint["norm"], device)
    n = len(data.train_images) if cfg.limit_train is None else cfg.limit_train
    train = DeviceLoader(
        data.train_images[:n], data.train_labels[:n], batch_size=cfg.batch_size,
        seed=checkpoint["seed"], device=device, memory_format=data_fmt,
    )  # fmt: skip

    def fresh() -> nn.Module:
        return restore_model(checkpoint, device, model_fmt, renorm_warmup=len(train))

    precise = fresh()
    precise_bn(precise, train, num_batches=precise_batches)  # batches as training saw them
    precise.eval()
    rows = []
    for b in eval_batch_sizes:
        # A last batch of a single image is left out (drop_single): batch statistics need two.
        test = DeviceLoader(
            data.test_images, data.test_labels, batch_size=b, shuffle=False,
            device=device, memory_format=data_fmt,
        )  # fmt: skip
        acc = {"eval-running": accuracy(fresh().eval(), test)}
        acc["eval-batch"] = accuracy(without_running_stats(fresh()).eval(), test)
        tracking = fresh().train()
        acc["train-tracking"] = accuracy(tracking, test)
        acc["train-untracked"] = accuracy(without_running_stats(fresh()).train(), test)
        acc["eval-after-train-pass"] = accuracy(tracking.eval(), test)
        acc["eval-precise-bn"] = accuracy(precise, test)
        rows += [
            {"mode": mode, "eval_batch_size": b, "seed": checkpoint["seed"], "test_acc": acc[mode]}
            for mode in MODES
        ]
    return rows


def summarize_modes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode and test batch size: accuracy mean and sample std over seeds."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["eval_batch_size"]), []).append(r["test_acc"])
    return [
        {
            "mode": mode,
            "eval_batch_size": b,
            "acc_mean": statistics.fmean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "runs": len(accs),
        }
        for (mode, b), accs in groups.items()
    ]


def run_eval_mode_study(
    study: EvalModeStudy,
    *,
    data: CIFAR10 | None = None,
    command: str | None = None,
    log: Callable[[str], None] = tqdm.write,
) -> dict[str, Any]:
    """Train `study.base` (one norm), then evaluate each seed's model in every mode."""
    if len(study.base.norms) != 1:
        raise ValueError(f"the eval-mode study trains one norm, got {study.base.norms}")
    with study_run(KIND, study, data=data, command=command, log=log) as run:
        c = cell(run.out, TRAIN_CELL, {}, study.base)
        trained = run.run(c)
        run.results["runs"] = cell_runs(c, trained)
        run.results["training"] = cell_summary(c, trained)
        run.results["evaluations"] = []
        norm = study.base.norms[0]
        for seed in study.base.seeds:
            log(f"evaluating {norm} seed {seed} in {len(MODES)} modes")
            checkpoint = load_checkpoint(checkpoint_path(run.out / RUNS / TRAIN_CELL, norm, seed))
            run.results["evaluations"] += evaluate_modes(
                checkpoint, study.base, run.data, study.eval_batch_sizes, study.precise_batches
            )
        run.results["summary"] = summarize_modes(run.results["evaluations"])
        run.save(
            _csv(run.results),
            figure=_figure(run.results),
            plot=plot_name(NAME),
            report=_report(run.results),
        )
    log("\n" + markdown_table(run.results))
    log(f"\nwrote {run.out}/: results.json, metrics.csv, report.md, {plot_name(NAME)}, runs/")
    return run.results


def _csv(results: dict[str, Any]) -> str:
    columns = ("mode", "eval_batch_size", "seed", "test_acc")
    return csv_text(columns, [[r[c] for c in columns] for r in results["evaluations"]])


def markdown_table(results: dict[str, Any]) -> str:
    return grid_table(
        results["summary"],
        row="eval_batch_size",
        column="mode",
        row_label="test batch",
        mean="acc_mean",
        std="acc_std",
    )


def _figure(results: dict[str, Any]) -> Figure:
    cfg = results["config"]
    return sweep_figure(
        results["summary"],
        x="eval_batch_size",
        series="mode",
        xlabel="test batch size",
        mean="acc_mean",
        std="acc_std",
        labels=MODES,
        zoom=5.0,
        title=f"LeNet-5 + {cfg['norms'][0]} on CIFAR-10, trained {count(cfg['epochs'], 'epoch')} "
        f"at batch {cfg['batch_size']}, evaluated in each train/eval x track_running_stats "
        "cell\nmean ± std over seeds",
    )


def _report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    training = ", ".join(
        accuracy_cell(s["final_acc_mean"], s["final_acc_std"]) for s in results["training"]
    )
    intro = (
        f"LeNet-5 with `{cfg['norms'][0]}` trained on {images_text(cfg)} training images for "
        f"{count(cfg['epochs'], 'epoch')} (Adam, lr {cfg['lr']}, batch {cfg['batch_size']}; seeds "
        f"{cfg['seeds']}; test accuracy after training, eval mode: {training} %), then "
        "evaluated on the whole test set in each mode, at each test batch size; mean ± sample "
        "std over seeds. The training comparison is in runs/train/.\n\n"
        + "\n".join(f"- `{mode}`: {label}" for mode, label in MODES.items())
    )
    return report_text(
        results,
        title="Train/eval x track_running_stats: what each cell does to a trained model",
        intro=intro,
        body=f"## Test accuracy (%)\n\n{markdown_table(results)}",
        plot=plot_name(NAME),
    )
