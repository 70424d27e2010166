"""ReLU followed by 2x2 max pooling (stride 2), fused into one native pass each way.

``relu_maxpool2d(x)`` equals ``F.max_pool2d(F.relu(x), 2)`` in value and
gradient: ReLU is monotonic, so the maximum of the ReLU'd window is the ReLU
of the window's maximum, at the same (first) position. The native kernels
(``relu_maxpool.cpp``) compute it in one pass forward and one backward, where
torch makes two forward (ReLU, the pool) and three backward (the pool
gradient's zero fill and scatter, ReLU's mask). The forward keeps no indices:
the backward finds each window's winner again from the saved input and output.
Other inputs (CUDA, float16 and bfloat16, other strides, graph capture, no
compiler) take the torch ops.

Under CPU autocast this needs no check of its own, unlike the convolution:
autocast leaves ReLU and pooling in their input's dtype, so a float32 input
gives float32 on either path, and the bfloat16 or float16 that autocast's
layers hand on is a dtype the kernels do not take, which sends it to the
torch ops by the dtype check alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext

_DTYPES = (torch.float32, torch.float64)


def _layout(x: Tensor) -> torch.memory_format | None:
    """The memory format the kernels read ``x`` in, or None if they cannot."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _native_ok(x: Tensor) -> bool:
    return (
        x.dim() == 4
        and x.is_cpu
        and x.dtype in _DTYPES
        and x.shape[2] >= 2
        and x.shape[3] >= 2
        and not torch.compiler.is_compiling()
        and _layout(x) is not None
        and _ext.available()
    )


class _ReLUMaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        fmt = _layout(x)
        n, c, h, w = x.shape
        y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=fmt)
        _ext.relu_maxpool_forward(x, y)
        ctx.save_for_backward(x, y)  # the backward finds each window's winner from them
        ctx.fmt = fmt
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> Tensor:
        x, y = ctx.saved_tensors
        dy = dy.contiguous(memory_format=ctx.fmt)
        dx = torch.empty_like(x)
        _ext.relu_maxpool_backward(dy, x, y, dx)
        return dx


def relu_maxpool2d(x: Tensor) -> Tensor:
    """``max_pool2d(relu(x), 2)`` for (N, C, H, W) input, fused on the CPU."""
    if _native_ok(x):
        return _ReLUMaxPool2x2.apply(x)
    return F.max_pool2d(F.relu(x), 2)
