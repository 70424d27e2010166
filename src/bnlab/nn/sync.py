"""SyncBatchNorm: training statistics over the batches of every process in a group.

In training the layer normalizes with the mean and variance of the batches of
all processes in ``process_group`` (default: the whole world), on CPU tensors
(gloo) as on CUDA ones (NCCL), through
:func:`bnlab.sync_functional.sync_batch_norm`. Evaluation, a group of one, or
no initialized process group is plain BatchNorm, as in torch.

It has torch.nn.SyncBatchNorm's constructor, attributes, state_dict and
``repr``, but subclasses torch's ``_BatchNorm`` (as bnlab's other layers do)
rather than torch.nn.SyncBatchNorm: DistributedDataParallel refuses any
torch.nn.SyncBatchNorm in a CPU model ("SyncBatchNorm layers only work with
GPU modules"). Helpers that find batch norms with ``isinstance(m, _BatchNorm)``
(``update_bn``, ``replace_all_batch_norm_modules_``, ``convert_sync_batchnorm``,
freezing helpers) find it.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import sync_functional
from .batchnorm import _BatchNorm, affine_of, fx_leaf

_HAS_BIAS_ARG = "bias" in inspect.signature(nn.modules.batchnorm._BatchNorm.__init__).parameters


class SyncBatchNorm(_BatchNorm):
    """Batch norm over (N, C, *) input whose training statistics span a process group.

    Drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU tensors (gloo).
    """

    _channels_checked = False  # set once the group has agreed on num_features

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # A torch without the bias argument still builds every layer it could.
        extra = {"bias": bias} if _HAS_BIAS_ARG or not bias else {}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            device=device, dtype=dtype, **extra,
        )  # fmt: skip
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        node = fx_leaf(self, input)
        if node is not None:
            return node
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = sync_functional.active_group(self.process_group) if self.training else None
        if group is None:
            return super().forward(input)  # nothing to share: plain BatchNorm
        plan = self._plan(input)
        # Once per layer (a compiled graph cannot raise on what it gathered):
        # the size of the statistics' collective follows num_features.
        if not self._channels_checked and not torch.compiler.is_compiling():
            sync_functional.agree_on_channels(self.num_features, group, input.device)
            self._channels_checked = True
        weight, bias = affine_of(self)
        return sync_functional.sync_batch_norm(
            input, plan.running_mean, plan.running_var, weight, bias,
            plan.momentum, self.eps, group,
        )  # fmt: skip

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> nn.Module:
        """Replace every batch norm layer of ``module`` (torch's or bnlab's) by this class.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every subclass
        of torch's ``_BatchNorm`` at any depth becomes a SyncBatchNorm over
        ``process_group`` that takes over its Parameter and buffer objects,
        training flag and ``qconfig``; the return value is the model, or the
        new layer when ``module`` itself was one.
        """
        module_output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            extra = {"bias": module.bias is not None} if _HAS_BIAS_ARG else {}
            module_output = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group, **extra,
            )  # fmt: skip
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module_output
