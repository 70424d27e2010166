"""Gradients for the backends' custom ops, so that a graph holding them trains.

``torch.compile`` traces :class:`bnlab.autograd.BatchNormFunction`, backward
and all. ``torch.export`` keeps only its forward, and ``torch.jit.trace`` and
dispatch modes (``make_fx``) record the ops without the Function: their
graphs call the ops themselves (``bnlab::cpu_forward_train`` and the like),
and without a formula of their own, a backward through such a graph stopped
at the first one. Their formula is the backend's backward op, as the
Function's is; the statistics they return are not differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor


def requested(ctx, dx: Tensor, dweight: Tensor, dbias: Tensor) -> tuple:
    """(dx, dweight, dbias) as the inputs ask: None where no gradient is needed, and
    the parameters' in their own dtypes (``ctx.param_dtypes``)."""
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (
        dx if need_x else None,
        _as_dtype(dweight, weight_dtype) if need_weight else None,
        _as_dtype(dbias, bias_dtype) if need_bias else None,
    )


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a microsecond


def _setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, stats, *others) -> None:
    ctx.mark_non_differentiable(stats, *others)
    ctx.save_for_backward(x, weight, stats)
    ctx.param_dtypes = (
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
    )


def register(forward_train, forward_eval, backward_op) -> None:
    """Give ``forward_train`` (x, weight, bias, eps) -> (y, stats, var) and
    ``forward_eval`` (x, weight, bias, running_mean, running_var, eps) -> (y, stats)
    the gradient ``backward_op`` (dy, x, weight, stats, batch_stats) computes."""

    def gradients(ctx, dy: Tensor, batch_stats: bool) -> tuple:
        x, weight, stats = ctx.saved_tensors
        return requested(ctx, *backward_op(dy, x, weight, stats, batch_stats))

    def setup_train(ctx, inputs, output) -> None:
        x, weight, bias, _ = inputs
        _, stats, var = output
        _setup(ctx, x, weight, bias, stats, var)

    def backward_train(ctx, dy, _dstats, _dvar):
        return (*gradients(ctx, dy, True), None)

    def setup_eval(ctx, inputs, output) -> None:
        x, weight, bias, *_ = inputs
        _setup(ctx, x, weight, bias, output[1])

    def backward_eval(ctx, dy, _dstats):
        return (*gradients(ctx, dy, False), None, None, None)

    forward_train.register_autograd(backward_train, setup_context=setup_train)
    forward_eval.register_autograd(backward_eval, setup_context=setup_eval)
