"""Kernel backends, chosen by the input's device and dtype, never by model code.

A backend is a module with three functions (see ``reference`` for their
contracts): ``forward_train(x, weight, bias, eps) -> (y, mean, var, invstd)``,
``normalize(x, mean, invstd, weight, bias) -> y`` and
``backward(dy, x, mean, invstd, weight, batch_stats_used) -> (dx, dweight, dbias)``.
A backend may also offer ``forward_train_update(x, weight, bias, eps,
running_mean, running_var, momentum)``: ``forward_train`` that also moves the
running buffers in place (the rule of :func:`update_running_stats`) in the
same pass; without it the update runs as separate torch ops. And it may offer
``forward_eval(x, weight, bias, running_mean, running_var, eps, need_stats)``
-> (y, mean, var, invstd): normalize with the running statistics in one call
(mean, var, invstd may be None when ``need_stats`` is False).
Fast backends register themselves with a predicate saying which inputs they
take; anything no fast backend takes runs on the reference backend
(``BNLAB_BACKEND=reference`` keeps it that way).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from . import reference

_BACKENDS: list[tuple[str, Callable[[Tensor], bool], ModuleType]] = []
# The predicates tried before the CPU backend's (None until it is registered):
# the eager fast path (bnlab.autograd.batch_norm_eager) asks them before it
# hands an input to the CPU kernels.
_AHEAD_OF_CPU: tuple[Callable[[Tensor], bool], ...] | None = None


def register(name: str, supports: Callable[[Tensor], bool], backend: ModuleType) -> None:
    """Add a backend; later registrations are tried first."""
    global _AHEAD_OF_CPU
    _BACKENDS.insert(0, (name, supports, backend))
    names = [n for n, _, _ in _BACKENDS]
    if "cpu" in names:
        _AHEAD_OF_CPU = tuple(s for _, s, _ in _BACKENDS[: names.index("cpu")])


def select(x: Tensor) -> ModuleType:
    """The backend for input ``x``: the first registered one that supports it, else reference."""
    for _, supports, backend in _BACKENDS:
        if supports(x):
            return backend
    return reference


def available() -> list[str]:
    return [name for name, _, _ in _BACKENDS] + ["reference"]


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float | Tensor,
    n: int,
) -> None:
    """r ← (1 − m)·r + m·s in place, with the unbiased variance var·n/(n − 1)."""
    with torch.no_grad():
        unbiased_var = var * (n / (n - 1))
        running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
        running_var.mul_(1 - momentum).add_(momentum * unbiased_var.to(running_var.dtype))


# Imported last: the CPU backend uses the helpers above.
from . import _ops, cpu  # noqa: E402, F401  (_ops registers the custom ops)

register("cpu", cpu.supports, cpu)
