"""GhostBatchNorm1d/2d/3d: batch norm over virtual batches (Hoffer, Hubara & Soudry, 2017).

In training, each consecutive chunk of ``virtual_batch_size`` samples along
dim 0 is normalized with its own batch statistics (a smaller last chunk on its
own); eval is BatchNorm's eval. ``virtual_batch_size ≥ N`` is BatchNorm.

Running statistics move once per step, exactly as BatchNorm's would on the
whole batch: the chunks' means and variances pooled (each chunk's mean and
biased variance, weighted by its size, plus the spread of the chunk means:
the whole batch's mean and variance), then one update with BatchNorm's
momentum and its unbiased variance n/(n − 1). Why this rule:

* eval normalizes with estimates of the population's mean and variance; the
  pooled statistics use all n values with n − 1 degrees of freedom, the
  lowest-variance unbiased estimate the step offers;
* one update per step keeps ``momentum`` (and ``momentum=None``) meaning what
  it means for BatchNorm, whatever the number of chunks;
* a GhostBatchNorm's running statistics are a BatchNorm's on the same data, so
  checkpoints and tools (``precise_bn``, ``diagnose``) read them alike.

tf-keras's ``virtual_batch_size`` also updates once per step, but from the
average of the chunks' means and *biased* variances: the mean of the means is
the pooled mean (its chunks have equal sizes: it requires the batch size to be
a multiple of ``virtual_batch_size``), while the mean of within-chunk biased
variances leaves out the spread of the chunk means, which on average
shrinks the variance by (m − 1)/m for chunks of m values per channel.
The paper's algorithm instead moves the statistics once per chunk, which
shortens the averaging horizon as the batch grows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ..kernels import reference
from .batchnorm import _BatchNorm, affine_of, fx_leaf


def _memory_format_of(x: Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def ghost_batch_norm(
    x: Tensor, virtual_batch_size: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Normalize each chunk of ``virtual_batch_size`` samples with its own statistics.

    The k whole chunks of x (N, C, *) become the channels of one batch norm,
    (k·V, C, *) → (V, k·C, *) with channel j·C + c = chunk j's channel c (γ and
    β repeated k times), so they take the one path in one call; a smaller last
    chunk takes a call of its own.
    """
    n, c = x.shape[:2]
    # int(): under torch.jit.trace a size is a tensor; the chunks follow the batch
    # size, which a trace fixes anyway.
    k, rest = divmod(int(n), virtual_batch_size)
    parts = []
    if k:
        whole = x[: k * virtual_batch_size].unflatten(0, (k, virtual_batch_size))  # (k, V, C, *)
        folded = whole.movedim(0, 1).flatten(1, 2)  # (V, k·C, *)
        y = F.batch_norm(
            folded, None, None,
            None if weight is None else weight.repeat(k),
            None if bias is None else bias.repeat(k),
            True, 0.0, eps,
        )  # fmt: skip
        parts.append(y.unflatten(1, (k, c)).movedim(1, 0).flatten(0, 1))  # (k·V, C, *)
    if rest:
        parts.append(
            F.batch_norm(x[k * virtual_batch_size :], None, None, weight, bias, True, 0.0, eps)
        )
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y.contiguous(memory_format=_memory_format_of(x))


class _GhostBatchNorm(_BatchNorm):
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        virtual_batch_size: int,
        **kwargs,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"{type(self).__name__}: virtual_batch_size must be an int >= 1, "
                f"got {virtual_batch_size!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        node = fx_leaf(self, input)
        if node is not None:
            return node
        plan = self._plan(input)
        weight, bias = affine_of(self)
        if (
            not plan.use_batch_stats
            or input.shape[0] <= self.virtual_batch_size
            or input.numel() == 0
        ):
            # One chunk (or none): BatchNorm itself, buffers and all.
            return F.batch_norm(
                input, plan.running_mean, plan.running_var, weight, bias,
                plan.use_batch_stats, plan.momentum, self.eps,
            )  # fmt: skip
        y = ghost_batch_norm(input, self.virtual_batch_size, weight, bias, self.eps)
        if plan.running_mean is not None and plan.running_var is not None:
            # Pooled over the chunks, the statistics are the whole batch's.
            mean, var = reference.batch_stats(input.detach())
            reference.update_running_stats(
                plan.running_mean, plan.running_var, mean, var, plan.momentum,
                input.numel() // input.shape[1],
            )  # fmt: skip
        return y


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Ghost batch norm over (N, C) or (N, C, L) input."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Ghost batch norm over (N, C, H, W) input."""


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    """Ghost batch norm over (N, C, D, H, W) input."""
