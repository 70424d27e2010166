"""The experiment's settings: one dataclass, defaults as in the original LeNet-5 + BN script.

The CLI is built from these fields (their defaults and `help` metadata), so a
setting is added here once. A resumed run must keep every setting that changes
its numbers: even the speed settings change float rounding, and a resumed run
must give the numbers of an uninterrupted one. `changed_settings` compares the
settings that mean what they say; those that mean something only once resolved
(the data folder, the device, the threads per run) are compared as resolved,
by the comparison (see compare.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    # what to compare: one run per norm x seed
    norms: tuple[str, ...] = _setting(("bn", "none"), "normalization layers to compare")
    seeds: tuple[int, ...] = _setting((0, 1, 2), "a seed fixes the initial weights and data order")
    # training, as in the original script
    epochs: int = _setting(10, "passes over the training set")
    lr: float = _setting(
        0.01, "Adam learning rate (the BN demonstration's; Adam's own default is 0.001)"
    )
    batch_size: int = _setting(64, "training batch size")
    # data
    data_dir: str | None = _setting(None, "CIFAR-10 folder (unset: $BNLAB_DATA, else user cache)")
    download: bool = _setting(
        False, "download CIFAR-10 into --data-dir or $BNLAB_DATA if it is not there"
    )
    limit_train: int | None = _setting(None, "use the first N training images only (quick runs)")
    # speed: each choice gives the same numbers run after run, but not the same as another choice
    device: str = _setting("auto", "auto (cuda when available), cpu or cuda")
    jobs: int = _setting(
        0,
        "runs trained at once, each in its own process (0: on CUDA 1; on the CPU one per "
        "torch thread, at most one per run)",
    )
    threads: int = _setting(
        0, "torch threads per run (0: torch's threads shared evenly by the runs at once)"
    )
    channels_last: bool | None = _setting(None, "NHWC images and weights (unset: as measured)")
    eval_batch_size: int = _setting(1000, "batch size for the test set (no gradients)")
    cuda_graph: bool = _setting(True, "on CUDA, replay the training step as a CUDA graph")
    stack: bool | None = _setting(
        None,
        "train each norm's seeds together as one vmapped model (bn and none; unset: on CUDA)",
    )
    amp: str = _setting(
        "off",
        "run the model's forward (training and evaluation) under CPU autocast: bf16 "
        "(bfloat16) or fp16 (float16); parameters, loss and Adam stay float32",
    )
    # output
    out: str | None = _setting(None, "output folder (unset: runs/<command>-<timestamp>)")
    resume: bool = _setting(False, "continue the runs found in --out")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        )


# --amp's choices: the dtype CPU autocast runs the forward in (None: float32 throughout).
AMP_DTYPES: dict[str, torch.dtype | None] = {
    "off": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

# Settings a resume may change: where and how this command runs, not what it computes.
FREE_ON_RESUME = ("out", "resume", "download", "jobs")
# Settings compared once resolved: "auto" and "cuda", --data-dir and $BNLAB_DATA, 0 and
# the threads it stands for can mean the same.
RESOLVED_ON_RESUME = ("data_dir", "device", "threads")


def changed_settings(old: Config, new: Config) -> list[str]:
    """The settings a resume may not change that differ as given, as 'name: old -> new' lines."""
    skip = (*FREE_ON_RESUME, *RESOLVED_ON_RESUME)
    return [
        f"{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in dataclasses.fields(Config)
        if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)
    ]
