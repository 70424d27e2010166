"""The studies: when batch norm and its fixes matter, measured on the LeNet-5/CIFAR-10 setup.

    batch_size.py   every norm at batch 2..256: where BN breaks down, which fix holds
    eval_mode.py    a trained BN model in each train/eval x track_running_stats cell
    lr.py           with and without BN across learning rates
    config.py       their settings; cells.py, sweep.py, session.py, folder.py,
                    output.py and plots.py the plumbing they share

The names below load on first use, so the command line can build its options
from config.py without the experiment's extra.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BatchSizeStudy": "config",
    "EvalModeStudy": "config",
    "LRStudy": "config",
    "run_batch_size_study": "batch_size",
    "run_eval_mode_study": "eval_mode",
    "run_lr_study": "lr",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
