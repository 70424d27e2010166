"""Batch norm followed by ReLU: y = max(bn(x), 0), in the batch norm's own passes where the
backend can.

A backend with ``fuses_relu`` (the Triton one, for CUDA tensors) writes y in
the normalize pass, and its backward takes dy only where bn(x) > 0. It
recomputes bn(x) from x, which the backward reads anyway, rather than saving
a mask: no extra memory and no extra pass (a saved mask would cost a write in
the forward and a read in the backward). Elsewhere (the CPU kernels, the
reference backend) and whenever something beyond autograd is at work
(forward-mode AD, torch.func transforms, tracing, torch.compile) it is
``relu(batch_norm(x))`` as composed from bnlab's batch norm, so everything
that works with the batch norm works here, with the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import autograd, kernels
from .kernels import reference


class BatchNormReLUFunction(torch.autograd.Function):
    """max(bn(x), 0) with a backend's fused calls; double backward by the reference formulas."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, backend):
        if training:
            y, stats = backend.forward_train_relu(
                x, weight, bias, eps, running_mean, running_var, momentum
            )
        else:
            y, stats = backend.forward_eval_relu(x, weight, bias, running_mean, running_var, eps)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.training, ctx.eps, ctx.backend = training, eps, backend
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, bias, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiated again: the graph of the reference formulas
            mean, invstd = stats
            if ctx.training:
                mean, var = reference.batch_stats(x)
                invstd = torch.rsqrt(var + ctx.eps)
            live = reference.normalize(x, mean, invstd, weight, bias) > 0
            dx, dweight, dbias = reference.backward(
                dy * live, x, weight, mean, invstd, ctx.training
            )
        else:
            dx, dweight, dbias = ctx.backend.backward_relu(dy, x, weight, bias, stats, ctx.training)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight.to(weight.dtype) if need_weight else None,
            dbias.to(bias.dtype) if need_bias else None,
        ) + (None,) * 6


def _fused_backend(x: Tensor):
    """The backend that fuses the ReLU for x, or None where the composition runs."""
    if autograd.beyond_plain_eager():
        return None
    backend = kernels.select(x)
    return backend if getattr(backend, "fuses_relu", False) else None


def batch_norm_relu(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor:
    """max(bn(x), 0); arguments checked by the caller, as for :func:`autograd.batch_norm`."""
    backend = _fused_backend(x)
    if backend is None:
        args = (x, weight, bias, running_mean, running_var, training, momentum, eps)
        y = autograd.small_call(*args)
        return torch.relu(autograd.batch_norm(*args) if y is None else y)
    return BatchNormReLUFunction.apply(
        x, weight, bias, running_mean, running_var, training, momentum, eps, backend
    )
