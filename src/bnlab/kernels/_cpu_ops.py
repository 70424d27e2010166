"""The CPU backend's calls as torch custom ops (namespace ``bnlab``), for ``torch.compile``.

The compiler cannot trace a call that passes data pointers; it can trace a
custom op, using the fake implementations below for shapes, dtypes and
strides, and call the real one at run time. Eager code calls the backend
directly: the op dispatcher costs about as much as a small batch norm
(``benchmarks/bench_bn.py --floor`` measures such fixed costs).

The real implementations accept any layout (a compiler may restride an
input) and return the layout the fake promises. Should the kernels be
unavailable at run time, they compute the same outputs with the reference
formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build, _op_autograd, cpu, reference
from ._cpu_native import compute_dtype
from ._layout import restride

_F64 = torch.float64


@torch.library.custom_op("bnlab::cpu_forward_train", mutates_args=())
def cpu_forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, stats, var): stats (2, C) rows mean and invstd, var biased; all float64."""
    if _build.native() is None:
        mean, var = reference.batch_stats(x)
        invstd = torch.rsqrt(var + eps)
        y = reference.normalize(x, mean, invstd, weight, bias)
        return y, torch.stack([mean, invstd]).to(_F64), var.to(_F64)
    y, stats, var = cpu.eager_forward_train(x, weight, bias, eps, None, None, 0.0, want_var=True)
    return restride(y, x), stats, var


@cpu_forward_train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return torch.empty_like(x), x.new_empty((2, c), dtype=_F64), x.new_empty((c,), dtype=_F64)


@torch.library.custom_op("bnlab::cpu_forward_eval", mutates_args=())
def cpu_forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(y, stats) with the running statistics; stats (2, C) float64."""
    if _build.native() is None:
        y, stats = reference.REFERENCE.forward_eval(x, weight, bias, running_mean, running_var, eps)
        return y, stats.to(_F64)
    y, stats = cpu.eager_forward_eval(x, weight, bias, running_mean, running_var, eps)
    return restride(y, x), stats


@cpu_forward_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=_F64)


@torch.library.custom_op("bnlab::cpu_backward", mutates_args=())
def cpu_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, batch_stats: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight and dbias in x's compute dtype (float32 for 16-bit x)."""
    if _build.native() is None:
        dx, dweight, dbias = reference.REFERENCE.backward(dy, x, weight, stats, batch_stats)
        return dx, dweight.to(compute_dtype(x.dtype)), dbias.to(compute_dtype(x.dtype))
    dx, dweight, dbias = cpu.eager_backward(dy, x, weight, stats, batch_stats)
    return restride(dx, x), dweight, dbias


@cpu_backward.register_fake
def _(dy, x, weight, stats, batch_stats):
    c, param = x.shape[1], compute_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty((c,), dtype=param), x.new_empty((c,), dtype=param)


_op_autograd.register(cpu_forward_train, cpu_forward_eval, cpu_backward)
