"""`bnlab diagnose RUN_DIR`: `bnlab.diagnose` for every checkpoint in an experiment folder.

A folder of `bnlab train`, `compare` or a study (whose cells are comparison
folders under runs/) holds checkpoints/NORM-seedS.pt beside the results.json
of the settings that trained them. Each model is rebuilt as training built it
and diagnosed on training batches of its own batch size: the statistics batch
norm saw while it trained.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bnlab.data import CIFAR10, DeviceLoader
from bnlab.experiments.config import Config
from bnlab.experiments.outdir import ExperimentError
from bnlab.experiments.results import CHECKPOINTS, load_checkpoint, load_results
from bnlab.experiments.train import memory_formats, resolve_device, restore_model
from bnlab.nn import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bnlab.toolkit import diagnose, format_diagnosis

FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)


def find_checkpoints(folder: Path) -> list[Path]:
    """Every checkpoints/*.pt in `folder` and below, in path order; ExperimentError if none."""
    if not folder.is_dir():
        raise ExperimentError(f"{folder}: no such folder")
    found = sorted(folder.glob(f"**/{CHECKPOINTS}/*.pt"))
    if not found:
        raise ExperimentError(
            f"{folder}: no checkpoints in it (looked for {CHECKPOINTS}/*.pt in it and below); "
            "give the --out folder of a bnlab train, compare or study"
        )
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        state = load_checkpoint(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ExperimentError(f"{path}: cannot read the checkpoint ({e})") from None
    missing = {"norm", "seed", "epochs_done", "model"} - set(state)
    if missing:
        raise ExperimentError(f"{path}: not a bnlab checkpoint (no {', '.join(sorted(missing))})")
    return state


def run_config(path: Path) -> Config:
    """The settings that trained the checkpoint at `path` (its folder's results.json)."""
    results = load_results(path.parent.parent)
    return Config() if results is None else Config.from_dict(results["config"])


def diagnose_checkpoint(
    path: Path,
    data: CIFAR10,
    *,
    num_batches: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
) -> tuple[dict[str, Any], str]:
    """(the checkpoint, its diagnosis as a Markdown table, or why there is none)."""
    state = _load(path)
    cfg = run_config(path)
    where = resolve_device(device)
    model_fmt, data_fmt = memory_formats(cfg, state["norm"], where)
    n = len(data.train_images) if cfg.limit_train is None else cfg.limit_train
    batches = DeviceLoader(
        data.train_images[:n], data.train_labels[:n], batch_size=batch_size or cfg.batch_size,
        seed=state["seed"], device=where, memory_format=data_fmt,
    )  # fmt: skip
    model = restore_model(state, where, model_fmt, renorm_warmup=len(batches))
    rows = diagnose(model, batches, num_batches)
    if rows:
        return state, format_diagnosis(rows)
    if any(isinstance(m, FROZEN) for m in model.modules()):
        return state, "its batch norms are frozen: fixed statistics, the same in train and eval"
    return state, f"no batch norm (norm {state['norm']!r})"


def diagnose_folder(
    folder: Path,
    checkpoints: list[Path],
    data: CIFAR10,
    *,
    num_batches: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
) -> Iterator[str]:
    """A Markdown section per checkpoint (`find_checkpoints(folder)`), as each is diagnosed."""
    for path in checkpoints:
        with torch.random.fork_rng():  # rebuilding a model seeds torch
            state, text = diagnose_checkpoint(
                path, data, num_batches=num_batches, batch_size=batch_size, device=device
            )
        yield (
            f"## {path.relative_to(folder)}: {state['norm']}, seed {state['seed']}, "
            f"after epoch {state['epochs_done']}\n\n{text}\n"
        )
