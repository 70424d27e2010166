"""The native CPU kernels as torch custom ops (namespace ``bnlab``).

``torch.compile`` cannot trace a call that passes data pointers; it can trace
a custom op, using the fake implementations below for shapes, dtypes and
strides, and call the real one at run time. Eager code skips the op
dispatcher and calls the kernels directly (see :mod:`bnlab.kernels.cpu`):
the dispatcher costs about as much as a small batch norm itself (~10 µs).

The wrappers in ``cpu`` hand these ops inputs the kernels read directly;
the real implementations still accept any layout (a compiler may restride
an input) and return the layout the fake promises. Should the kernels be
unavailable at run time, they compute the same outputs with the reference
formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build, reference
from .cpu import _dense, _like, _native_backward, _native_forward_train, _native_normalize

_F64 = torch.float64


def _restride(out: Tensor, like: Tensor, dense: Tensor) -> Tensor:
    """``out`` (laid out like ``dense``) in ``empty_like(like)``'s layout, as the fake promises."""
    return out if dense is like else torch.empty_like(like).copy_(out)


@torch.library.custom_op("bnlab::cpu_forward_train", mutates_args=())
def cpu_forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, invstd): statistics float64, var biased."""
    if _build.native() is None:
        y, mean, var, invstd = reference.forward_train(x, weight, bias, eps)
        return y, mean.to(_F64), var.to(_F64), invstd.to(_F64)
    xd, geometry = _dense(x)
    y, mean, var, invstd = _native_forward_train(xd, geometry, weight, bias, eps)
    return _restride(y, x, xd), mean, var, invstd


@cpu_forward_train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    stats = [x.new_empty((c,), dtype=_F64) for _ in range(3)]
    return torch.empty_like(x), *stats


@torch.library.custom_op("bnlab::cpu_normalize", mutates_args=())
def cpu_normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x − mean)·invstd·γ + β; mean and invstd float64."""
    if _build.native() is None:
        return reference.normalize(x, mean, invstd, weight, bias)
    xd, geometry = _dense(x)
    return _restride(_native_normalize(xd, geometry, mean, invstd, weight, bias), x, xd)


@cpu_normalize.register_fake
def _(x, mean, invstd, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("bnlab::cpu_backward", mutates_args=())
def cpu_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    batch_stats_used: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); mean and invstd float64, dweight and dbias in x's dtype."""
    if _build.native() is None:
        dx, dweight, dbias = reference.backward(dy, x, mean, invstd, weight, batch_stats_used)
        return dx, dweight.to(x.dtype), dbias.to(x.dtype)
    xd, geometry = _dense(x)
    dx, dweight, dbias = _native_backward(
        _like(dy, xd), xd, geometry, mean, invstd, weight, batch_stats_used
    )
    return _restride(dx, x, xd), dweight, dbias


@cpu_backward.register_fake
def _(dy, x, mean, invstd, weight, batch_stats_used):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((c,)), x.new_empty((c,))
