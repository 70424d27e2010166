"""Kernel backends for batch norm, chosen by the input's device, dtype and layout.

Each backend implements :class:`~bnlab.kernels.protocol.Backend` whole. The
reference backend (plain torch ops, :mod:`bnlab.kernels.reference`) is the
oracle and takes every input; the fast backends in ``_FAST`` (native CPU
kernels; Triton kernels for CUDA tensors, when triton is installed) are asked first,
in order. Adding a backend is adding its module and one entry there.
``BNLAB_BACKEND=reference`` keeps everything on the reference backend.
"""

from __future__ import annotations

from torch import Tensor

from . import _cpu_ops, _gpu_ops  # noqa: F401  (register the custom ops torch.compile traces)
from .cpu import CPU
from .gpu import TRITON
from .protocol import Backend
from .reference import REFERENCE

_FAST: tuple[Backend, ...] = (CPU, TRITON)


def select(x: Tensor) -> Backend:
    """The backend for input ``x``: the first fast one that supports it, else the reference."""
    for backend in _FAST:
        if backend.supports(x):
            return backend
    return REFERENCE


def available() -> list[str]:
    """The backends' names, fast ones first."""
    return [b.name for b in _FAST] + [REFERENCE.name]


__all__ = ["REFERENCE", "Backend", "available", "select"]
