"""The autograd function behind every bnlab batch norm: hand-written backward.

Forward saves ``mean`` and ``invstd`` (float32 or wider) and hands the
arithmetic to a kernel backend. Backward computes the three gradients with
the same backend; when a graph of the backward itself is wanted
(``create_graph=True``, double backward) it runs the differentiable
reference formulas instead, recomputing the statistics from ``x`` so their
dependence on ``x`` is part of that graph.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from . import kernels
from .kernels import _build, cpu, reference

_F32, _F64 = torch.float32, torch.float64


class Statistics(NamedTuple):
    """Which statistics normalize ``x``, and which running buffers move.

    ``running_mean``/``running_var`` given: they are the statistics
    (evaluation). Otherwise the batch's are, and ``update_mean``/``update_var``
    (when given) move in place toward them, ``r ← (1 − m)·r + m·s`` with
    ``m = momentum`` and the unbiased variance
    (:func:`bnlab.kernels.update_running_stats`); a backend that can does
    this inside its pass over ``x``. One argument rather than six: every
    argument of the autograd function costs time on each call.
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float
    update_mean: Tensor | None = None
    update_var: Tensor | None = None
    momentum: float | Tensor = 0.0


def _forward(
    backend: ModuleType,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    s: Statistics,
    need_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, invstd) from ``backend``; see :class:`Statistics`.

    ``need_stats=False``: only y will be used (a backend may skip the rest).
    """
    if s.running_mean is None:
        if s.update_mean is not None and hasattr(backend, "forward_train_update"):
            return backend.forward_train_update(
                x, weight, bias, s.eps, s.update_mean, s.update_var, s.momentum
            )
        y, mean, var, invstd = backend.forward_train(x, weight, bias, s.eps)
        if s.update_mean is not None:
            n = x.numel() // x.size(1)
            kernels.update_running_stats(s.update_mean, s.update_var, mean, var, s.momentum, n)
        return y, mean, var, invstd
    if hasattr(backend, "forward_eval"):
        return backend.forward_eval(
            x, weight, bias, s.running_mean, s.running_var, s.eps, need_stats
        )
    acc = reference.acc_dtype(x.dtype)
    mean, var = s.running_mean.to(acc), s.running_var.to(acc)
    invstd = torch.rsqrt(var + s.eps)
    return backend.normalize(x, mean, invstd, weight, bias), mean, var, invstd


class BatchNormFunction(torch.autograd.Function):
    """y = (x − mean)·invstd·γ + β, the statistics chosen by a :class:`Statistics`."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, statistics: Statistics
    ) -> Tensor:
        backend = kernels.select(x)
        y, mean, _, invstd = _forward(backend, x, weight, bias, statistics)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend = backend
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        ctx.batch_stats_used = statistics.running_mean is None
        ctx.eps = statistics.eps
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dweight, dbias = _differentiable_backward(
                dy, x, weight, mean, invstd, ctx.batch_stats_used, ctx.eps
            )
        else:
            dx, dweight, dbias = ctx.backend.backward(
                dy, x, mean, invstd, weight, ctx.batch_stats_used
            )
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx if need_x else None,
            _as_dtype(dweight, weight_dtype) if need_weight else None,
            _as_dtype(dbias, bias_dtype) if need_bias else None,
            None,
        )


def _differentiable_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    batch_stats_used: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Double backward: the reference formulas, with batch statistics rebuilt from x
    so that their dependence on x is part of the graph (running ones are constants)."""
    if batch_stats_used:
        mean, var = reference.batch_stats(x)
        invstd = torch.rsqrt(var + eps)
    return reference.backward(dy, x, mean, invstd, weight, batch_stats_used)


def _records_graph(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd would record this call: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def batch_norm_autograd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, statistics: Statistics
) -> Tensor:
    """Normalize ``x`` with a hand-written backward. See :class:`Statistics`.

    Without a graph to record (no grad mode, or nothing requires grad) the
    backend is called directly: the same results without the autograd
    function's per-call cost.
    """
    if _records_graph(x, weight, bias):
        return BatchNormFunction.apply(x, weight, bias, statistics)
    return _forward(kernels.select(x), x, weight, bias, statistics, need_stats=False)[0]


# ---- eager fast path ----------------------------------------------------------------
#
# A small batch norm costs less than the Python around it, so the common eager
# case skips the layers above: the module hands its tensors to batch_norm_eager,
# which checks with plain comparisons that the general path would take the same
# decisions and raise nothing, then calls the CPU kernels directly. Anything
# else (errors included) is left to the general path.


class _EagerBatchNormFunction(torch.autograd.Function):
    """:class:`BatchNormFunction` for the inputs :func:`batch_norm_eager` takes.

    Saves x, weight and the kernels' flat float64 statistics [mean | var | invstd].
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, args: tuple) -> Tensor:
        geometry, eps, running_mean, running_var, momentum, batch_stats = args
        y, stats = cpu.eager_forward(
            x, geometry, weight, bias, eps, running_mean, running_var, momentum, batch_stats, True
        )
        ctx.save_for_backward(x, weight, stats)
        ctx.args = args
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, stats = ctx.saved_tensors
        geometry, eps, _, _, _, batch_stats = ctx.args
        if torch.is_grad_enabled():
            c = geometry[1]
            dx, dweight, dbias = _differentiable_backward(
                dy, x, weight, stats[:c], stats[2 * c :], batch_stats, eps
            )
            dweight, dbias = _as_dtype(dweight, x.dtype), _as_dtype(dbias, x.dtype)
        else:
            dx, dweight, dbias = cpu.eager_backward(dy, x, geometry, stats, weight, batch_stats)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight if need_weight else None,
            dbias if need_bias else None,
            None,
        )


# Function.apply minus what batch_norm_eager has already settled: no
# setup_context to bind, functorch transforms inactive (checked per call).
# These are torch internals; a torch without them gets the public apply.
try:
    _eager_apply = super(torch.autograd.Function, _EagerBatchNormFunction).apply
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
    _transforms_active = torch._C._are_functorch_transforms_active
except AttributeError:
    _eager_apply = _EagerBatchNormFunction.apply

    def _unwrap_if_dead(t: Tensor) -> Tensor:
        return t

    def _transforms_active() -> bool:
        return False


def batch_norm_eager(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor | None:
    """``functional.batch_norm(x, ..., training=batch_stats, ...)`` on the CPU kernels, or None.

    None: not the common case (another backend, device or dtype, an odd
    layout, an empty batch, anything that raises); the caller then takes the
    general path, which decides and raises everything itself. The caller
    guarantees eager mode (not compiling), ``type(x) is Tensor``, ``x.dim() >= 2``
    and a float ``momentum``.
    """
    dtype = x.dtype
    if not (x.is_cpu and (dtype is _F32 or dtype is _F64)):
        return None
    ahead = kernels._AHEAD_OF_CPU
    if ahead is None or _build.native() is None:
        return None
    for supports in ahead:
        if supports(x):
            return None
    c = x.shape[1]
    numel = x.numel()
    if numel == 0:
        return None
    if batch_stats:
        # n == 1 and eps <= 0 raise; buffers move only as a pair.
        if numel == c or not eps > 0.0 or (running_mean is None) != (running_var is None):
            return None
    elif not eps >= 0.0 or running_mean is None or running_var is None:
        return None
    if running_mean is not None and not (
        running_mean.is_cpu
        and running_var.is_cpu
        and (running_mean.dtype is _F32 or running_mean.dtype is _F64)
        and running_var.dtype is running_mean.dtype
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
        and running_mean.numel() == c
        and running_var.numel() == c
    ):
        return None
    if weight is not None and not (
        weight.dtype is dtype and weight.is_cpu and weight.is_contiguous() and weight.numel() == c
    ):
        return None
    if bias is not None and not (
        bias.dtype is dtype and bias.is_cpu and bias.is_contiguous() and bias.numel() == c
    ):
        return None
    if x.is_contiguous():
        outer = x.shape[0]
        geometry = (outer, c, numel // (outer * c))
    else:
        geometry = cpu._geometry(x)
        if geometry is None:
            return None
    if _records_graph(x, weight, bias):
        if _transforms_active():
            return None
        # As Function.apply: a tensor left over from a finished transform is unwrapped.
        return _eager_apply(
            _unwrap_if_dead(x),
            None if weight is None else _unwrap_if_dead(weight),
            None if bias is None else _unwrap_if_dead(bias),
            (geometry, eps, running_mean, running_var, momentum, batch_stats),
        )
    return cpu.eager_forward(
        x, geometry, weight, bias, eps, running_mean, running_var, momentum, batch_stats, False
    )[0]
