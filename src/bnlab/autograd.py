"""The autograd function behind every bnlab batch norm: hand-written backward.

Forward saves ``mean`` and ``invstd`` (float32 or wider) and hands the
arithmetic to a kernel backend. Backward computes the three gradients with
the same backend; when a graph of the backward itself is wanted
(``create_graph=True``, double backward) it runs the differentiable
reference formulas instead, recomputing the statistics from ``x`` so their
dependence on ``x`` is part of that graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .kernels import reference


class BatchNormFunction(torch.autograd.Function):
    """y = (x − mean)·invstd·γ + β; returns (y, mean, var) with var biased.

    With ``running_mean``/``running_var`` given, they are the statistics
    (evaluation); otherwise the batch's are. ``mean`` and ``var`` are
    non-differentiable outputs, returned so the caller can update running
    buffers without a second pass over ``x``.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        backend = kernels.select(x)
        batch_stats_used = running_mean is None
        if batch_stats_used:
            y, mean, var, invstd = backend.forward_train(x, weight, bias, eps)
        else:
            acc = reference.acc_dtype(x.dtype)
            mean, var = running_mean.to(acc), running_var.to(acc)
            invstd = torch.rsqrt(var + eps)
            y = backend.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.batch_stats_used = batch_stats_used
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor, _dvar: Tensor):
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
            dx, dweight, dbias = kernels.select(x).backward(
                dy, x, mean, invstd, weight, ctx.batch_stats_used
            )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx if need_x else None,
            dweight.to(weight_dtype) if need_weight else None,
            dbias.to(bias_dtype) if need_bias else None,
            None,
            None,
            None,
        )


def batch_norm_with_stats(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x``; returns (y, mean, var). See :class:`BatchNormFunction`."""
    return BatchNormFunction.apply(x, weight, bias, running_mean, running_var, eps)
