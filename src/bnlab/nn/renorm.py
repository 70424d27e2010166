"""BatchRenorm1d/2d/3d: batch renormalization (Ioffe, 2017), on batch norm's one path.

In training, with batch statistics μ_B and σ_B = sqrt(σ²_B + eps) (σ²_B the
biased batch variance, as BatchNorm's) and running ones μ, σ = sqrt(running_var + eps):

    xhat = (x − μ_B)/σ_B · r + d,   y = γ·xhat + β
    r = clip(σ_B/σ, 1/rmax, rmax),   d = clip((μ_B − μ)/σ, −dmax, dmax)

with r and d constants in backward. Since γ·((x − μ_B)/σ_B · r + d) + β
= (r·γ)·(x − μ_B)/σ_B + (d·γ + β), this is batch norm in training with weight
r·γ and bias d·γ + β, r and d detached: the same kernel, hand-written backward
and running-stat update as BatchNorm, exactly (the gradient of γ, r·Σdy·x̂ +
d·Σdy, comes out of the chain rule through the two products). Eval is
BatchNorm's eval; rmax = 1, dmax = 0 is BatchNorm.

Running statistics: the paper keeps a moving σ, σ ← σ + α·(σ_B − σ), an
average of biased batch standard deviations with eps inside. These layers keep
BatchNorm's buffers and rule instead (running_var an average of *unbiased*
batch variances, σ = sqrt(running_var + eps)), so state_dicts interchange with
BatchNorm's and eval is BatchNorm's eval. Both estimate the population's
standard deviation; they differ by the n/(n − 1) correction and, because the
square root of an average exceeds the average of square roots, by a term of the
order of Var(σ_B)/(2σ) when batch standard deviations fluctuate.

warmup: the paper trains with rmax = 1, dmax = 0 (plain batch norm) first, while
the running statistics settle, then relaxes the limits. Here the limits rise
linearly from 1 and 0 over ``warmup`` steps counted by ``num_batches_tracked``
(the first batch is plain batch norm; the limits are reached on step
warmup + 1), so no buffer is added and BatchNorm's state_dicts load strictly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from ..kernels import reference
from .batchnorm import _BatchNorm, affine_of, fx_leaf, running_of


def renorm_limits(
    rmax: float, dmax: float, warmup: int, step: Tensor | None
) -> tuple[float | Tensor, float | Tensor]:
    """(rmax_t, dmax_t) at ``step`` (the batch counter, this batch counted).

        progress = clip((step − 1)/warmup, 0, 1)
        rmax_t = 1 + (rmax − 1)·progress,   dmax_t = dmax·progress

    A tensor when it depends on the counter (no host sync, traceable); the
    full limits without a warmup or a counter.
    """
    if warmup == 0 or step is None:
        return rmax, dmax
    progress = ((step.to(torch.float64) - 1) / warmup).clamp(0.0, 1.0)
    return 1 + (rmax - 1) * progress, dmax * progress


def renorm_correction(
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float | Tensor,
    dmax: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """(r, d) per channel, in the batch statistics' dtype, without gradient.

    σ_B = sqrt(σ²_B + eps),  σ = sqrt(running_var + eps)
    r = clip(σ_B/σ, 1/rmax, rmax),  d = clip((μ_B − μ)/σ, −dmax, dmax)
    """
    dtype = batch_mean.dtype
    if isinstance(rmax, Tensor):
        rmax, dmax = rmax.to(dtype), dmax.to(dtype)
    sigma_b = (batch_var.detach() + eps).sqrt()
    sigma = (running_var.detach().to(dtype) + eps).sqrt()
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax)
    d = torch.clamp((batch_mean.detach() - running_mean.detach().to(dtype)) / sigma, -dmax, dmax)
    return r, d


def renorm_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    """Batch norm's (weight, bias) that apply renorm: γ·(x̂·r + d) + β = (r·γ)·x̂ + (d·γ + β).

    γ = 1 and β = 0 where absent. Returned in the parameters' dtype (r's without them).
    """
    dtype = r.dtype if weight is None else weight.dtype
    r, d = r.to(dtype), d.to(dtype)
    new_weight = r if weight is None else r * weight
    new_bias = d if weight is None else d * weight
    if bias is not None:
        new_bias = new_bias + bias
    return new_weight, new_bias


class _BatchRenorm(_BatchNorm):
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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup: int = 0,
        **kwargs,
    ) -> None:
        if not rmax >= 1.0:
            raise ValueError(f"{type(self).__name__}: rmax must be >= 1, got {rmax}")
        if not dmax >= 0.0:
            raise ValueError(f"{type(self).__name__}: dmax must be >= 0, got {dmax}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"{type(self).__name__}: warmup must be an int >= 0, got {warmup!r}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.rmax, self.dmax, self.warmup = float(rmax), float(dmax), warmup

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, warmup={self.warmup}"

    def forward(self, input: Tensor) -> Tensor:
        node = fx_leaf(self, input)
        if node is not None:
            return node
        plan = self._plan(input)
        weight, bias = affine_of(self)
        running_mean, running_var, counter = running_of(self)
        # Renorm needs running statistics to correct towards; without them
        # (or for an empty batch) training is batch norm's.
        correct = (
            self.training
            and running_mean is not None
            and running_var is not None
            and input.numel() > 0
            and (self.rmax != 1.0 or self.dmax != 0.0)
        )
        if correct:
            rmax, dmax = renorm_limits(self.rmax, self.dmax, self.warmup, counter)
            batch_mean, batch_var = reference.batch_stats(input.detach())
            r, d = renorm_correction(
                batch_mean, batch_var, running_mean, running_var, self.eps, rmax, dmax
            )
            weight, bias = renorm_affine(weight, bias, r, d)
        return F.batch_norm(
            input, plan.running_mean, plan.running_var, weight, bias,
            plan.use_batch_stats, plan.momentum, self.eps,
        )  # fmt: skip


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    """Batch renormalization over (N, C) or (N, C, L) input."""


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W) input."""


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    """Batch renormalization over (N, C, D, H, W) input."""
