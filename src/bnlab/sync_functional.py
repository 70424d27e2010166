"""Batch norm over the batches of every process in a group: SyncBatchNorm's math.

Forward (training). Process r holds n_r values per channel with mean μ_r and
biased variance σ²_r (its backend's ``batch_stats``: shifted sums, exact for
data with a large mean). ONE all_gather of the float64 row [n_r, μ_r, σ²_r]
(2C + 1 numbers) hands every process every row, and Chan's parallel
combination gives the statistics of the whole batch, the same on every process:

    n      = Σ n_r
    μ      = Σ (n_r/n)·μ_r
    σ²     = Σ (n_r/n)·(σ²_r + (μ_r − μ)²)      (no difference of large sums)
    invstd = 1/sqrt(σ² + eps),   xhat = (x − μ)·invstd,   y = xhat·γ + β

A process with an empty batch sends n_r = 0 and zeros, and weighs nothing.
The running buffers move by the oracle rule
(:func:`bnlab.kernels.reference.update_running_stats`) with the unbiased
σ²·n/(n − 1), identically on every process; when every batch is empty
(n = 0) they stay.

Backward. Through μ and invstd every y depends on every process's x:

    dβ = Σ dy,   dγ = Σ dy·xhat                  (sums over the whole batch)
    dx = γ·invstd·(dy − dβ/n − xhat·dγ/n)

ONE all_reduce (sum) of the row [Σ_r dy, Σ_r dy·xhat] (2C numbers, this
process's sums) gives dβ and dγ for dx. ``weight.grad`` and ``bias.grad`` keep
the local sums Σ_r, as torch's SyncBatchNorm does: DistributedDataParallel
adds them up with every other gradient.

Without an initialized process group, or in a group of one, there is nothing
to combine and :func:`sync_batch_norm` is :func:`bnlab.functional.batch_norm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _compat, functional, kernels
from .errors import ChannelMismatchError, InputRankError
from .kernels import reference

_F64 = torch.float64
# torch 2.12 renamed all_gather_into_tensor to all_gather_single; both are
# public, and torch.compile traces either as a functional collective.
_all_gather = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)


class CollectiveError(RuntimeError):
    """A collective of SyncBatchNorm failed or timed out.

    Another process died, stopped before the layer, or waits in a different
    collective. The process group's timeout (``init_process_group(timeout=...)``)
    bounds the wait.
    """


def active_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group whose processes share statistics, or None when there is nothing to share.

    None without torch.distributed or an initialized default group, and for a
    group of one; ``process_group=None`` means the whole world.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    world = dist.get_world_size(group)
    if world < 0:  # torch's answer for a process outside the group
        raise ValueError(
            f"SyncBatchNorm: this process (rank {dist.get_rank()}) is not a member of its "
            "process_group; give each process a group it belongs to (every process calls "
            "torch.distributed.new_group for every group)"
        )
    return group if world > 1 else None


def _collective(what: str, op, *args, group: dist.ProcessGroup) -> None:
    """``op(*args, group=group)``; a failure or timeout raises :class:`CollectiveError`."""
    if torch.compiler.is_compiling():
        op(*args, group=group)
        return
    try:
        op(*args, group=group)
    except RuntimeError as e:
        raise CollectiveError(
            f"SyncBatchNorm: {what} across the process group (ranks "
            f"{dist.get_process_group_ranks(group)}) failed on rank {dist.get_rank()}: {e}. "
            "Another process may have died, stopped before this layer, or be waiting in a "
            "different collective; the process group's timeout bounds the wait"
        ) from e


def agree_on_channels(channels: int, group: dist.ProcessGroup, device: torch.device) -> None:
    """Raise :class:`ChannelMismatchError` on every process unless all have ``channels``.

    One all_gather of one number. The statistics' own collective cannot tell:
    its size follows the channel count, and gloo aborts a process whose
    collective has another size than its peers'.
    """
    mine = torch.tensor([channels], dtype=torch.int64, device=device)
    every = mine.new_empty(dist.get_world_size(group))
    _collective("the channel-count check", _all_gather, every, mine, group=group)
    counts = every.tolist()
    if len(set(counts)) > 1:
        ranks = dist.get_process_group_ranks(group)
        listed = ", ".join(f"rank {r}: {c}" for r, c in zip(ranks, counts, strict=True))
        raise ChannelMismatchError(
            f"SyncBatchNorm: the processes of the group normalize different numbers of "
            f"channels ({listed}); every process must build the layer with the same "
            "num_features"
        )


def combine(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, mean, var) of the whole batch from the rows [n_r, μ_r (C), σ²_r (C)], one per process.

    Chan's parallel combination (module docstring); n is a 0-dim tensor.
    """
    c = (rows.size(1) - 1) // 2
    counts, means, variances = rows[:, :1], rows[:, 1 : 1 + c], rows[:, 1 + c :]  # (W, 1), (W, C)
    n = counts.sum()
    share = counts / n.clamp(min=1)  # all zero when every batch is empty
    mean = (share * means).sum(0)
    var = (share * (variances + (means - mean).square())).sum(0)
    return n, mean, var


def _forward(x, weight, bias, running_mean, running_var, momentum, eps, group):
    """(y, stats, n): x normalized with the statistics of the whole group's batch."""
    backend = kernels.select(x)
    n_local, mean, var = backend.batch_stats(x)
    row = torch.cat([mean.new_full((1,), n_local, dtype=_F64), mean.to(_F64), var.to(_F64)])
    world = dist.get_world_size(group)
    rows = row.new_empty(world * row.numel())
    _collective("the all_gather of batch statistics", _all_gather, rows, row, group=group)
    n, mean, var = combine(rows.view(world, -1))
    # Every process sees the same n, so every one raises: none is left waiting.
    if not torch.compiler.is_compiling() and int(n) == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 over the whole "
            f"batch of the process group (input size {list(x.shape)} on this process)"
        )
    if running_mean is not None:
        # Zero momentum when every batch was empty; n ≥ 2 otherwise (n = 1 raised above).
        m = (n > 0).to(_F64) * momentum
        reference.update_running_stats(running_mean, running_var, mean, var, m, n.clamp(min=2))
    y, stats = backend.forward_eval(x, weight, bias, mean, var, eps)
    return y, stats, n


class SyncBatchNormFunction(torch.autograd.Function):
    """y = (x − μ)·invstd·γ + β with the statistics of the whole group's batch.

    Returns (y, stats, n): stats the (2, C) rows mean and invstd, n the
    group's values per channel; both non-differentiable, kept for backward.
    """

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps, group):
        return _forward(x, weight, bias, running_mean, running_var, momentum, eps, group)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, _, _, _, group = inputs
        _, stats, n = output
        ctx.mark_non_differentiable(stats, n)
        ctx.save_for_backward(x, weight, stats, n)
        ctx.group = group
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )

    @staticmethod
    def backward(ctx, dy: Tensor, _dstats, _dn):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "SyncBatchNorm does not support double backward (create_graph=True): its "
                "backward communicates and is not itself differentiable"
            )
        x, weight, stats, n = ctx.saved_tensors
        backend = kernels.select(x)
        sum_dy, sum_dy_xhat = backend.backward_reduce(dy, x, stats)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx = None
        # As torch's layer: no input gradient wanted (on every process alike), no collective.
        if need_x:
            sums = torch.cat([sum_dy, sum_dy_xhat]).to(_F64)
            _collective("the all_reduce of gradient sums", dist.all_reduce, sums, group=ctx.group)
            means = sums / n.clamp(min=1)
            c = x.size(1)
            dx = backend.backward_elemt(dy, x, weight, stats, means[:c], means[c:])
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx,
            sum_dy_xhat.to(weight_dtype) if need_weight else None,
            sum_dy.to(bias_dtype) if need_bias else None,
            None,
            None,
            None,
            None,
            None,
        )


_apply = _compat.applier(SyncBatchNormFunction, tensors=5)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    process_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Training-mode batch norm with the statistics of every process's batch in ``process_group``.

    :func:`bnlab.functional.batch_norm` with ``training=True`` over the
    concatenation of the batches of the group's processes (default: the whole
    world): every process must call it, with the same channel count, also
    with an empty batch. The running buffers, when given, move the same on
    every process. Without an initialized process group, or in a group of
    one, it is that function.
    """
    group = active_group(process_group)
    if group is None:
        return functional.batch_norm(
            input, running_mean, running_var, weight, bias, True, momentum, eps
        )
    if input.dim() < 2:  # (an empty 1-d one, which one process alone may take as it is)
        raise InputRankError(
            "sync_batch_norm needs input of shape (N, C, *) on every process, with the same C, "
            f"got {input.dim()}D input of size {list(input.shape)}"
        )
    functional.check_arguments(
        input, running_mean, running_var, weight, bias, True, eps,
        values_per_channel=False, name="sync_batch_norm",
    )  # fmt: skip
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias)
    )
    if records or torch.compiler.is_compiling():
        return _apply(input, weight, bias, running_mean, running_var, momentum, eps, group)[0]
    return _forward(input, weight, bias, running_mean, running_var, momentum, eps, group)[0]
