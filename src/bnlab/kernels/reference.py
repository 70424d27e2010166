"""The reference backend: batch norm in plain torch ops, the oracle for every other backend.

It is exact in float64, runs on any device and dtype, and is differentiable
and vmappable, so the autograd function also uses its formulas for double
backward, forward-mode AD and tensors without storage (vmap and grad
wrappers).

Shapes: ``x`` is (N, C, *spatial); reductions run over all dims but 1,
``n = N·∏spatial``. Statistics are (C,) tensors in the accumulation dtype
(float64 for float64 input, float32 otherwise).
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
    """A (C,) tensor viewed to broadcast against x: (1, C, 1, ...)."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, in two passes (exact for data with a large mean)."""
    xa = x.to(acc_dtype(x.dtype))
    dims = _reduce_dims(x)
    mean = xa.mean(dims)
    var = (xa - _per_channel(mean, x)).square().mean(dims)
    return mean, var


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float | Tensor,
    n: int,
) -> None:
    """r ← (1 − m)·r + m·s in place, with the unbiased variance var·n/(n − 1).

    16-bit buffers are updated in float32 and rounded once: updated in their
    own dtype, each of the product, the cast and the sum would round.

    The statistics are detached, not the update put under ``no_grad``: a
    change of grad mode would become a region of its own in an exported graph
    (torch.export), which then could not be saved and loaded.
    """
    mean, var = mean.detach(), var.detach()
    # var·n first: n may be a traced size, a 0-dim int64 tensor, whose quotient
    # n / (n − 1) would be a float32 one.
    unbiased_var = var * n / (n - 1)
    for buffer, stat in ((running_mean, mean), (running_var, unbiased_var)):
        if buffer.dtype.itemsize >= 4:
            buffer.mul_(1 - momentum).add_(momentum * stat.to(buffer.dtype))
        else:
            wide = buffer.float().mul_(1 - momentum)
            buffer.copy_(wide.add_(momentum * stat.float()))


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x − mean)·invstd·γ + β, computed in the statistics' dtype, returned in x's."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (x.to(invstd.dtype) - _per_channel(mean, x)) * _per_channel(scale, x)
    if bias is not None:
        y = y + _per_channel(bias.to(invstd.dtype), x)
    return y.to(x.dtype)


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    batch_stats: bool,
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
    if batch_stats:
        n = max(x.numel() // x.size(1), 1) if x.size(1) else 1
        dx = (dya - _per_channel(dbias / n, x) - xhat * _per_channel(dweight / n, x)) * (
            _per_channel(scale, x)
        )
    else:
        dx = dya * _per_channel(scale, x)
    return dx.to(dy.dtype), dweight, dbias


def tangent(
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    batch_stats: bool,
    x_t: Tensor | None,
    weight_t: Tensor | None,
    bias_t: Tensor | None,
) -> Tensor:
    """Forward-mode derivative ṫ_y of y = xhat·γ + β for tangents ṫ_x, ṫ_γ, ṫ_β (None: zero).

        batch statistics:   ṫ_y = γ·invstd·(ṫ_x − mean(ṫ_x) − xhat·mean(ṫ_x·xhat)) + xhat·ṫ_γ + ṫ_β
        running statistics: ṫ_y = γ·invstd·ṫ_x + xhat·ṫ_γ + ṫ_β

    (means over the reduced dims: the tangents of the batch mean and of invstd).
    """
    acc = invstd.dtype
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    y_t = torch.zeros_like(xhat)
    if x_t is not None:
        xa_t = x_t.to(acc)
        if batch_stats:
            dims = _reduce_dims(x)
            xa_t = (
                xa_t - xa_t.mean(dims, keepdim=True) - xhat * (xa_t * xhat).mean(dims, keepdim=True)
            )
        scale = invstd if weight is None else invstd * weight.to(acc)
        y_t = y_t + xa_t * _per_channel(scale, x)
    if weight_t is not None:
        y_t = y_t + xhat * _per_channel(weight_t.to(acc), x)
    if bias_t is not None:
        y_t = y_t + _per_channel(bias_t.to(acc), x)
    return y_t.to(x.dtype)


def channel_grad_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ dy, Σ dy·xhat) per channel, in the statistics' dtype (zeros for an empty x)."""
    dims = _reduce_dims(x)
    acc = invstd.dtype
    dya = dy.to(acc)
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    return dya.sum(dims), (dya * xhat).sum(dims)


def grad_input(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    mean_dy: Tensor,
    mean_dy_xhat: Tensor,
) -> Tensor:
    """dx = γ·invstd·(dy − mean_dy − xhat·mean_dy_xhat), computed in the statistics' dtype.

    :func:`backward`'s dx with batch statistics, given the means of dy and
    dy·xhat rather than x's own (they may come from a batch spread over processes).
    """
    acc = invstd.dtype
    xhat = (x.to(acc) - _per_channel(mean, x)) * _per_channel(invstd, x)
    scale = invstd if weight is None else invstd * weight.to(acc)
    mean_dy, mean_dy_xhat = _per_channel(mean_dy.to(acc), x), _per_channel(mean_dy_xhat.to(acc), x)
    dx = (dy.to(acc) - mean_dy - xhat * mean_dy_xhat) * _per_channel(scale, x)
    return dx.to(dy.dtype)


class ReferenceBackend:
    """:class:`~bnlab.kernels.protocol.Backend` in the torch ops above; takes any input."""

    name = "reference"

    def supports(self, x: Tensor) -> bool:
        return True

    def forward_train(
        self, x, weight, bias, eps, running_mean, running_var, momentum, want_stats=True
    ):
        mean, var = batch_stats(x)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            update_running_stats(
                running_mean, running_var, mean, var, momentum, x.numel() // x.size(1)
            )
        return normalize(x, mean, invstd, weight, bias), torch.stack([mean, invstd])

    def forward_eval(self, x, weight, bias, running_mean, running_var, eps, want_stats=True):
        acc = acc_dtype(x.dtype)
        mean = running_mean.to(acc)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        return normalize(x, mean, invstd, weight, bias), torch.stack([mean, invstd])

    def backward(self, dy, x, weight, stats, batch_stats):
        mean, invstd = stats
        return backward(dy, x, weight, mean, invstd, batch_stats)

    def batch_stats(self, x):
        c = x.size(1)
        if x.numel() == 0:
            zeros = x.new_zeros(c, dtype=acc_dtype(x.dtype))
            return 0, zeros, zeros.clone()
        mean, var = batch_stats(x)
        return x.numel() // c, mean, var

    def backward_reduce(self, dy, x, stats):
        mean, invstd = stats
        return channel_grad_sums(dy, x, mean, invstd)

    def backward_elemt(self, dy, x, weight, stats, mean_dy, mean_dy_xhat):
        mean, invstd = stats
        return grad_input(dy, x, weight, mean, invstd, mean_dy, mean_dy_xhat)


REFERENCE = ReferenceBackend()
