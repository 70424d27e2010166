"""2-D convolution with bnlab's direct CPU kernels where they beat torch's.

``conv2d(x, weight, bias, padding)`` equals ``F.conv2d(x, weight, bias,
padding=padding)`` (stride 1, no dilation, one group) up to the order of
float additions. On the CPU, each of its three parts runs on the native
direct kernels (``conv2d.cpp``) when the tensor that part produces is
narrow, and on torch's own kernels otherwise (`native_parts`):

- forward: the output has at most 8 channels (NCHW) or 6 (channels_last);
- input gradient: the input has at most 8 (NCHW) or 6 (channels_last);
- weight and bias gradients: the output has at most 8 channels.

The native kernels vectorize along image rows and block a few channels in
registers; torch's CPU kernels vectorize along channels, which narrow layers
leave mostly empty, and fill exactly at 8 float32 channels in channels_last,
where they then win. ``benchmarks/bench_conv.py`` times each part on
LeNet-5's layers and the 3x3 layers of 3-16 channels the limits were tuned
on: natively faster wherever the produced tensor is narrow (all of conv1,
conv2's input gradient), torch faster for conv2's 16-channel forward and
weight gradient.

Everything else (CUDA, other dtypes, strides, dilation or groups, layouts
other than NCHW and channels_last, torch.compile, CPU autocast, no compiler)
is ``F.conv2d``. The output is channels_last when the input or the weight is
(torch's rule); the input gradient takes the output's layout, as in torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ext

NATIVE_MAX_CHANNELS = 8  # NCHW, and the weight gradient in any layout
NATIVE_MAX_CHANNELS_CL = 6  # channels_last outputs: torch's kernels fill a vector at 8
_DTYPES = (torch.float32, torch.float64)


def _channels_last(t: Tensor) -> bool:
    """Whether the kernels read ``t`` as channels_last (else it must be contiguous)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense(t: Tensor) -> Tensor:
    """``t`` as NCHW or channels_last memory, whichever it is closer to."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    fmt = torch.channels_last if t.dim() == 4 and t.stride(1) == 1 else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _empty_like_layout(shape: tuple[int, ...], *like: Tensor) -> Tensor:
    """An output channels_last if any of ``like`` is (torch's rule for convolutions), else NCHW."""
    cl = any(_channels_last(t) for t in like)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=like[0].dtype, memory_format=fmt)


def native_parts(x: Tensor, weight: Tensor) -> tuple[bool, bool, bool]:
    """Which of (forward, input gradient, weight and bias gradients) run natively."""
    o, c = weight.shape[:2]
    narrow = (
        NATIVE_MAX_CHANNELS_CL
        if _channels_last(x) or _channels_last(weight)
        else NATIVE_MAX_CHANNELS
    )
    return o <= narrow, c <= narrow, o <= NATIVE_MAX_CHANNELS


class _Conv2d(torch.autograd.Function):
    """Each part on the native kernels when the tensor it produces is narrow, else torch's."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, int]
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pad, ctx.has_bias = pad, bias is not None
        native_y, ctx.native_x, ctx.native_w = native_parts(x, weight)
        n, _, h, w = x.shape
        o, _, kh, kw = weight.shape
        if not native_y:
            y = F.conv2d(x, weight, bias, padding=pad)
        else:
            shape = (n, o, h + 2 * pad[0] - kh + 1, w + 2 * pad[1] - kw + 1)
            y = _empty_like_layout(shape, x, weight)
            b = None if bias is None else bias.contiguous()
            _ext.conv2d_forward(x, weight.contiguous(), b, y, pad)
        ctx.fmt = torch.channels_last if _channels_last(y) else torch.contiguous_format
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        pad = ctx.pad
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        dy = _dense(dy)
        o, _, kh, kw = weight.shape
        native_x, native_w = ctx.native_x, ctx.native_w
        torch_parts = (need_x and not native_x, need_w and not native_w, need_b and not native_w)
        dx, dw, db = (
            _torch_grads(dy, x, weight, pad, torch_parts) if any(torch_parts) else (None,) * 3
        )
        if need_x and native_x:
            # dx is dy, padded by K-1-P, convolved with the flipped kernel, in and out swapped.
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            dx = torch.empty(x.shape, dtype=x.dtype, memory_format=ctx.fmt)  # as torch: y's layout
            _ext.conv2d_forward(dy, flipped, None, dx, (kh - 1 - pad[0], kw - 1 - pad[1]))
        if (need_w or need_b) and native_w:
            dw = torch.empty(weight.shape, dtype=weight.dtype)
            db = torch.empty(o, dtype=dy.dtype) if ctx.has_bias else None
            _ext.conv2d_grad_weight(x, dy, dw, db, pad)
        return dx, dw if need_w else None, db if need_b else None, None


def _torch_grads(dy: Tensor, x: Tensor, weight: Tensor, pad: tuple[int, int], parts):
    """torch's (dx, dweight, dbias) for the parts asked for (None for the others)."""
    bias_sizes = [weight.shape[0]] if parts[2] else None
    return torch.ops.aten.convolution_backward(
        dy, x, weight, bias_sizes, [1, 1], list(pad), [1, 1], False, [0, 0], 1, list(parts)
    )


def _autocast_on_cpu() -> bool:
    """Whether CPU autocast is on: F.conv2d would then run in its lower precision."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # a torch whose is_autocast_enabled takes no device type
        return torch.is_autocast_cpu_enabled()


def _native_ok(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, int]) -> bool:
    if not (x.dim() == 4 and weight.dim() == 4 and x.numel() > 0 and weight.numel() > 0):
        return False
    o, c, kh, kw = weight.shape
    return (
        c == x.shape[1]
        and x.is_cpu
        and weight.is_cpu
        and x.dtype in _DTYPES
        and weight.dtype == x.dtype
        and (bias is None or (bias.is_cpu and bias.dtype == x.dtype and bias.shape == (o,)))
        and 0 <= pad[0] < kh
        and 0 <= pad[1] < kw
        and x.shape[2] + 2 * pad[0] >= kh
        and x.shape[3] + 2 * pad[1] >= kw
        and not torch.compiler.is_compiling()
        and not _autocast_on_cpu()
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and any(native_parts(x, weight))
        and _ext.available()
    )


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: int | tuple[int, int] = 0,
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)``, stride 1, on the native kernels where faster.

    First derivatives only on the native path (a double backward raises).
    """
    pad = (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))
    if _native_ok(x, weight, bias, pad):
        return _Conv2d.apply(x, weight, bias, pad)
    return F.conv2d(x, weight, bias, padding=pad)
