"""BatchNorm1d/2d/3d: torch.nn's layers with bnlab's forward and backward.

Each class subclasses the torch.nn class it replaces, so it has that class's
constructor, attributes, buffers, state_dict (version handling included),
``repr`` and rank check, and everything that finds batch norms with
``isinstance`` (``torch.optim.swa_utils.update_bn``,
``torch.func.replace_all_batch_norm_modules_``,
``SyncBatchNorm.convert_sync_batchnorm``, freezing helpers) finds bnlab's
too. Only ``forward`` is bnlab's: it chooses the statistics and the buffers
that move, and hands the math to :func:`bnlab.functional.batch_norm`:

================  ======================  ==========================
mode              buffers exist           buffers are None
================  ======================  ==========================
train             batch stats; update     batch stats
eval              running stats           batch stats
================  ======================  ==========================

(``track_running_stats=False`` at construction means no buffers; setting the
attribute to False later keeps them, so eval still normalizes with them.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, fx, nn

from .. import functional as F
from ..errors import ChannelMismatchError
from ..kernels.protocol import captured

_ONE = torch.ones((), dtype=torch.long)


class Plan(NamedTuple):
    """What a batch norm module hands to :func:`bnlab.functional.batch_norm` for one call."""

    running_mean: Tensor | None  # the buffers to pass: moved (train) or used (eval)
    running_var: Tensor | None
    use_batch_stats: bool
    momentum: float | Tensor


def fx_leaf(module: nn.Module, input: object) -> fx.Proxy | None:
    """A call_module node when ``input`` is an fx Proxy: torch.fx traces torch.nn's
    layers as leaves, and so bnlab's."""
    if not isinstance(input, fx.Proxy):
        return None
    tracer = input.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,), {})


def affine_of(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """``module``'s weight and bias, read from its dictionary (Module.__getattr__ costs
    as much as a small batch norm), or as attributes where a tool moved them out:
    ``torch.nn.utils.parametrize`` makes one a property, ``prune`` an attribute its
    hook sets before each call."""
    params = module._parameters
    try:
        return params["weight"], params["bias"]
    except KeyError:
        return module.weight, module.bias


def running_of(module: nn.Module) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``module``'s running mean, variance and batch counter, read as :func:`affine_of`
    reads weight and bias."""
    buffers = module._buffers
    try:
        return buffers["running_mean"], buffers["running_var"], buffers["num_batches_tracked"]
    except KeyError:
        return module.running_mean, module.running_var, module.num_batches_tracked


def check_channels(module: nn.Module, input: Tensor) -> None:
    """The one clear error for a channel count that is not ``module.num_features``."""
    # num_features == 0 is what a lazy module with neither parameters nor
    # buffers keeps after its first call (as in torch): no size declared.
    if input.shape[1] != module.num_features and module.num_features != 0:
        raise ChannelMismatchError(
            f"{type(module).__name__}: expected input with {module.num_features} channels "
            f"(num_features) but got {input.shape[1]} channels, input size {list(input.shape)}"
        )


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    # What forward hands the planned call to (BatchNormReLU's forward hands it on to
    # batch_norm_relu).
    _normalize = staticmethod(F.batch_norm)

    def _plan(self, input: Tensor) -> Plan:
        """Check ``input``, count the batch, and choose statistics, buffers and momentum.

        What every bnlab batch norm (and variant: renorm, ghost batches) does
        before its math; a variant changes only what it hands on.
        """
        self._check_input_dim(input)
        check_channels(self, input)
        running_mean, running_var, counter = running_of(self)
        momentum: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and counter is not None:
            # Counted before the batch is checked, exactly as torch does.
            # A tensor one skips wrapping the int 1 in a tensor on each eager
            # call (half the count's cost); captured graphs take the int (a
            # fake counter cannot add a real tensor).
            counter.add_(1 if captured() else _ONE)
            if self.momentum is None:
                # Cumulative average as a tensor: no host sync, traceable by
                # torch.compile, and one per model under vmap.
                momentum = counter.to(torch.float64).reciprocal()
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        # Buffers are passed where they are updated (training and tracking) or used (eval).
        pass_buffers = not self.training or self.track_running_stats
        return Plan(
            running_mean if pass_buffers else None,
            running_var if pass_buffers else None,
            use_batch_stats,
            momentum,
        )

    def forward(self, input: Tensor) -> Tensor:
        node = fx_leaf(self, input)
        if node is not None:
            return node
        plan = self._plan(input)
        weight, bias = affine_of(self)
        return self._normalize(
            input, plan.running_mean, plan.running_var, weight, bias,
            plan.use_batch_stats, plan.momentum, self.eps,
        )  # fmt: skip


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm over (N, C) or (N, C, L) input; drop-in for ``torch.nn.BatchNorm1d``."""


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm over (N, C, H, W) input; drop-in for ``torch.nn.BatchNorm2d``."""


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm over (N, C, D, H, W) input; drop-in for ``torch.nn.BatchNorm3d``."""
