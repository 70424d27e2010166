"""The GPU backend's calls as torch custom ops (namespace ``bnlab``), for ``torch.compile``.

As :mod:`bnlab.kernels._cpu_ops` does for the CPU: the compiler traces the
op through its fake implementation and calls the Triton kernels at run time
(``torch.compile(fullgraph=True)`` and CUDA-graph capture both keep the op
whole). Outputs come in ``empty_like(x)``'s layout, statistics and weight
gradients in the compute dtype (float32, float64 for float64 input).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _op_autograd, gpu
from ._layout import restride
from .gpu import acc_dtype


@torch.library.custom_op("bnlab::triton_forward_train", mutates_args=())
def triton_forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, stats, var): stats (2, C) rows mean and invstd, var biased."""
    y, stats, var = gpu.eager_forward_train(x, weight, bias, eps, None, None, 0.0, want_var=True)
    return restride(y, x), stats, var


@triton_forward_train.register_fake
def _(x, weight, bias, eps):
    c, acc = x.shape[1], acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty((2, c), dtype=acc), x.new_empty((c,), dtype=acc)


@torch.library.custom_op("bnlab::triton_forward_eval", mutates_args=())
def triton_forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(y, stats) with the running statistics."""
    y, stats = gpu.eager_forward_eval(x, weight, bias, running_mean, running_var, eps)
    return restride(y, x), stats


@triton_forward_eval.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=acc_dtype(x.dtype))


@torch.library.custom_op("bnlab::triton_backward", mutates_args=())
def triton_backward(
    dy: Tensor, x: Tensor, weight: Tensor | None, stats: Tensor, batch_stats: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias)."""
    dx, dweight, dbias = gpu.eager_backward(dy, x, weight, stats, batch_stats)
    return restride(dx, x), dweight, dbias


@triton_backward.register_fake
def _(dy, x, weight, stats, batch_stats):
    c, acc = x.shape[1], acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


_op_autograd.register(triton_forward_train, triton_forward_eval, triton_backward)
