"""The BN experiment: LeNet-5 with and without batch norm on CIFAR-10, compared and reported.

The names below load on first use, so ``bnlab.experiments.config`` (what the
command line is built from) imports without the ``experiment`` extra and the
``bnlab`` command can say what is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Config": "config",
    "EpochResult": "train",
    "ExperimentError": "compare",
    "check_out": "compare",
    "default_out": "compare",
    "evaluate": "train",
    "run_compare": "compare",
    "train_epoch": "train",
    "train_run": "train",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
