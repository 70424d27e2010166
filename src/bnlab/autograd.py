"""The autograd function behind every bnlab batch norm: hand-written backward.

Forward saves ``mean`` and ``invstd`` (float32 or wider) and hands the
arithmetic to a kernel backend. Backward computes the three gradients with
the same backend; when a graph of the backward itself is wanted
(``create_graph=True``, double backward) it runs the differentiable
reference formulas instead, recomputing the statistics from ``x`` so their
dependence on ``x`` is part of that graph.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels
from .kernels import reference


class Statistics(NamedTuple):
    """Which statistics normalize ``x``, and which running buffers move.

    ``running_mean``/``running_var`` given: they are the statistics
    (evaluation). Otherwise the batch's are, and ``update_mean``/``update_var``
    (when given) move in place toward them, ``r ← (1 − m)·r + m·s`` with
    ``m = momentum`` and the unbiased variance
    (:func:`bnlab.kernels.update_running_stats`); a backend that can does
    this inside its pass over ``x``. One argument rather than six: every
    argument of the autograd function costs time on each call.
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float
    update_mean: Tensor | None = None
    update_var: Tensor | None = None
    momentum: float | Tensor = 0.0


def _forward(
    backend: ModuleType,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    s: Statistics,
    need_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, invstd) from ``backend``; see :class:`Statistics`.

    ``need_stats=False``: only y will be used (a backend may skip the rest).
    """
    if s.running_mean is None:
        if s.update_mean is not None and hasattr(backend, "forward_train_update"):
            return backend.forward_train_update(
                x, weight, bias, s.eps, s.update_mean, s.update_var, s.momentum
            )
        y, mean, var, invstd = backend.forward_train(x, weight, bias, s.eps)
        if s.update_mean is not None:
            n = x.numel() // x.size(1)
            kernels.update_running_stats(s.update_mean, s.update_var, mean, var, s.momentum, n)
        return y, mean, var, invstd
    if hasattr(backend, "forward_eval"):
        return backend.forward_eval(
            x, weight, bias, s.running_mean, s.running_var, s.eps, need_stats
        )
    acc = reference.acc_dtype(x.dtype)
    mean, var = s.running_mean.to(acc), s.running_var.to(acc)
    invstd = torch.rsqrt(var + s.eps)
    return backend.normalize(x, mean, invstd, weight, bias), mean, var, invstd


class BatchNormFunction(torch.autograd.Function):
    """y = (x − mean)·invstd·γ + β, the statistics chosen by a :class:`Statistics`."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, statistics: Statistics
    ) -> Tensor:
        backend = kernels.select(x)
        y, mean, _, invstd = _forward(backend, x, weight, bias, statistics)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend = backend
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.batch_stats_used = statistics.running_mean is None
        ctx.eps = statistics.eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: differentiable formulas, statistics rebuilt from x.
            if ctx.batch_stats_used:
                mean, var = reference.batch_stats(x)
                invstd = torch.rsqrt(var + ctx.eps)
            dx, dweight, dbias = reference.backward(
                dy, x, mean, invstd, weight, ctx.batch_stats_used
            )
        else:
            dx, dweight, dbias = ctx.backend.backward(
                dy, x, mean, invstd, weight, ctx.batch_stats_used
            )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx if need_x else None,
            _as_dtype(dweight, weight_dtype) if need_weight else None,
            _as_dtype(dbias, bias_dtype) if need_bias else None,
            None,
        )


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def batch_norm_autograd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, statistics: Statistics
) -> Tensor:
    """Normalize ``x`` with a hand-written backward. See :class:`Statistics`.

    Without a graph to record (no grad mode, or nothing requires grad) the
    backend is called directly: the same results without the autograd
    function's per-call cost.
    """
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return BatchNormFunction.apply(x, weight, bias, statistics)
    return _forward(kernels.select(x), x, weight, bias, statistics, need_stats=False)[0]
