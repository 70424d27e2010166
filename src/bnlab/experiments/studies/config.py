"""The studies' settings: one dataclass each, defaults chosen to finish in minutes on 2 cores.

A study runs the experiment's training (`Config`) in several cells: one
`bnlab compare` per batch size or learning rate, or one training run and many
evaluations. `base` holds the training settings shared by every cell; the
study's own fields say what varies. The CLI is built from both, as the
experiment's commands are built from `Config`. Defaults trade the classic
experiment's full length for a grid that fits a 2-core CPU in at most about 10
minutes; the README gives the measured times and the settings of the full runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bnlab.experiments.config import Config


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


LR_SCALINGS = ("sqrt", "linear", "none")


@dataclass(frozen=True)
class BatchSizeStudy:
    """Each norm trained at each batch size: where batch norm breaks down and which fix holds."""

    batch_sizes: tuple[int, ...] = _setting(
        (2, 4, 8, 16, 32, 64, 128, 256), "training batch sizes, one comparison each"
    )
    # Adam's steps are noisier at small batches: without scaling, lr 0.01 at batch 16
    # leaves LeNet-5 without norm at chance, which says nothing about normalization.
    lr_scaling: str = _setting(
        "sqrt",
        "learning rate at batch B: --lr x sqrt(B/64) (sqrt), x B/64 (linear) or --lr itself (none)",
    )
    # Same images for every batch size (so fewer steps at large batches); 2 epochs let
    # renorm (warm-up: one epoch) run with its full limits for the second.
    base: Config = field(
        default_factory=partial(
            Config,
            norms=("bn", "renorm", "ghost", "gn", "none"),
            seeds=(0, 1),
            epochs=2,
            limit_train=8_000,
        )
    )


@dataclass(frozen=True)
class EvalModeStudy:
    """One trained BN model, evaluated in each cell of the train/eval x track_running_stats table."""

    eval_batch_sizes: tuple[int, ...] = _setting(
        (2, 4, 8, 16, 32, 64, 128, 256, 1000),
        "test batch sizes (batch statistics at test time depend on them)",
    )
    precise_batches: int | None = _setting(
        None, "training batches precise_bn pools (unset: one pass over the training images)"
    )
    # The classic experiment's model (batch 64, lr 0.01), shorter: the study is about
    # what evaluation does to a trained model, not about training it longer.
    base: Config = field(default_factory=partial(Config, norms=("bn",), seeds=(0, 1, 2), epochs=5))


@dataclass(frozen=True)
class LRStudy:
    """With and without batch norm across learning rates: does BN tolerate larger steps?"""

    lrs: tuple[float, ...] = _setting(
        (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "Adam learning rates, one comparison each"
    )
    # The classic experiment's training (all images, batch 64), 2 epochs instead of 10.
    base: Config = field(
        default_factory=partial(Config, norms=("bn", "none"), seeds=(0, 1), epochs=2)
    )


Study = BatchSizeStudy | EvalModeStudy | LRStudy


def study_fields(study: Study) -> dict[str, Any]:
    """The study's own settings (not `base`), JSON-ready."""
    return {
        f.name: list(v) if isinstance(v := getattr(study, f.name), tuple) else v
        for f in dataclasses.fields(study)
        if f.name != "base"
    }
