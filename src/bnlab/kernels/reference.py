"""Reference backend: batch norm in plain torch ops.

This is the oracle every other backend is tested against. It is exact in
float64, works on any device and dtype, and is differentiable, so the
autograd function also uses it for double backward.

Shapes: ``x`` is (N, C, *spatial); every reduction is over all dims but 1,
``n = N * prod(spatial)``. Statistics come back as (C,) tensors in the
accumulation dtype (float64 for float64 input, float32 otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts against x: (1, C, 1, ...)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, two-pass (exact for shifted data)."""
    xa = x.to(acc_dtype(x.dtype))
    dims = _reduce_dims(x)
    mean = xa.mean(dims)
    var = (xa - _per_channel(mean, x)).square().mean(dims)
    return mean, var


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x − mean)·invstd·γ + β, computed in the statistics' dtype, returned in x's."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (x.to(invstd.dtype) - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(invstd.dtype), x)
    return y.to(x.dtype)


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with batch statistics. Returns (y, mean, var, invstd), var biased."""
    mean, var = batch_stats(x)
    invstd = torch.rsqrt(var + eps)
    return normalize(x, mean, invstd, weight, bias), mean, var, invstd


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    batch_stats_used: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of y = xhat·γ + β with xhat = (x − mean)·invstd.

        dβ = Σ dy            dγ = Σ dy·xhat
        batch statistics (mean, invstd depend on x):
            dx = γ·invstd/n · (n·dy − dβ − xhat·dγ)
        running statistics (constants):
            dx = γ·invstd · dy

    Returns (dx, dweight, dbias); dweight and dbias in the statistics' dtype.
    """
    dims = _reduce_dims(x)
    acc = invstd.dtype
    dya = dy.to(acc)
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    dbias = dya.sum(dims)
    dweight = (dya * xhat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(acc)
    if batch_stats_used:
        n = x.numel() // x.size(1) if x.numel() else 1
        dx = (dya - _per_channel(dbias / n, x) - xhat * _per_channel(dweight / n, x)) * (
            _per_channel(scale, x)
        )
    else:
        dx = dya * _per_channel(scale, x)
    return dx.to(dy.dtype), dweight, dbias
