"""Kernel backends, chosen by the input's device and dtype, never by model code.

A backend is a module with three functions (see ``reference`` for their
contracts): ``forward_train(x, weight, bias, eps) -> (y, mean, var, invstd)``,
``normalize(x, mean, invstd, weight, bias) -> y`` and
``backward(dy, x, mean, invstd, weight, batch_stats_used) -> (dx, dweight, dbias)``.
Fast backends register themselves with a predicate saying which inputs they
take; anything no fast backend takes runs on the reference backend.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import Tensor

from . import reference

_BACKENDS: list[tuple[str, Callable[[Tensor], bool], ModuleType]] = []


def register(name: str, supports: Callable[[Tensor], bool], backend: ModuleType) -> None:
    """Add a backend; later registrations are tried first."""
    _BACKENDS.insert(0, (name, supports, backend))


def select(x: Tensor) -> ModuleType:
    """The backend for input ``x``: the first registered one that supports it, else reference."""
    for _, supports, backend in _BACKENDS:
        if supports(x):
            return backend
    return reference


def available() -> list[str]:
    return [name for name, _, _ in _BACKENDS] + ["reference"]
