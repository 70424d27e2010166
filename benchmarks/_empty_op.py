"""The floor of a batch norm written in C++: ``empty_autograd_op.cpp``, built on demand.

Building needs a C++ compiler, ninja and torch's headers (about 15 s, then
cached by torch.utils.cpp_extension); where that fails the benchmark goes on
without this column and says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "empty_autograd_op.cpp"


def empty_cpp_op() -> tuple[Callable | None, str]:
    """(op(x, weight, bias) -> y, "") once built, else (None, why not)."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            name="bnlab_bench_empty_op",
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a failed build or load: each is reported
        last_line = (str(e).strip().splitlines() or [""])[-1]
        return None, f"{SOURCE.name} not built ({type(e).__name__}: {last_line})"
    return torch.ops.bnlab_bench.empty_batch_norm.default, ""
