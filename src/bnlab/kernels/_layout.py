"""The one memory layout every bnlab kernel reads: x as a contiguous (outer, C, inner) array."""

from __future__ import annotations

import torch
from torch import Tensor

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def geometry(x: Tensor) -> tuple[int, int, int] | None:
    """(outer, C, inner) such that x's memory is that array, contiguous; None otherwise.

    Contiguous (N, C, *) is (N, C, ∏spatial); channels_last(_3d) and (N, C)
    are (N·∏spatial, C, 1).
    """
    shape = x.shape
    n, c = shape[0], shape[1]
    if x.is_contiguous():
        return n, c, x.numel() // (n * c)
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x.numel() // c, c, 1
    return None


def restride(out: Tensor, like: Tensor) -> Tensor:
    """``out`` in ``empty_like(like)``'s layout (a copy if it is not): what the custom ops'
    fake implementations promise, whatever layout the compiler handed them."""
    want = torch.empty_like(like)
    return out if want.stride() == out.stride() else want.copy_(out)
