"""BatchNorm1d/2d/3d: state-only modules over :func:`bnlab.functional.batch_norm`.

They mirror ``torch.nn``'s: constructor arguments, attributes, buffers,
state_dict keys and version handling, and the choice of statistics:

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

import inspect
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import Module, Parameter, init

from .. import autograd as BNA
from .. import functional as F
from ..errors import ChannelMismatchError

_REPR_SHOWS_BIAS = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


class _NormBase(Module):
    """Parameters, buffers and their bookkeeping; no math."""

    _version = 2
    __constants__: ClassVar[list[str]] = [
        "track_running_stats",
        "momentum",
        "eps",
        "num_features",
        "affine",
    ]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            # The counter is int64 whatever the float dtype of the module.
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        # Printed like the installed torch's: torch versions without the bias=
        # argument do not show it (bnlab shows it anyway once it is False).
        bias = (
            f"bias={self.bias is not None}, "
            if _REPR_SHOWS_BIAS or (self.affine and self.bias is None)
            else ""
        )
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, {bias}"
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Checkpoints older than version 2 have no num_batches_tracked: keep the
        # module's own counter rather than reporting a missing key.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            counter = self.num_batches_tracked
            state_dict[key] = (
                counter
                if counter is not None and counter.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _BatchNorm(_NormBase):
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # num_features == 0 is what a lazy module with neither parameters nor
        # buffers keeps after its first call (as in torch): no size declared.
        if input.shape[1] != self.num_features and self.num_features != 0:
            raise ChannelMismatchError(
                f"{type(self).__name__}: expected input with {self.num_features} channels "
                f"(num_features) but got {input.shape[1]} channels, input size {list(input.shape)}"
            )
        if type(input) is Tensor and not torch.compiler.is_compiling():
            return self._forward_eager(input)
        return self._forward_general(input)

    def _forward_eager(self, input: Tensor) -> Tensor:
        """:meth:`_forward_general` in eager mode: the common case straight to the kernels.

        The same decisions, read from the attribute dictionaries directly
        (``Module.__getattr__`` is slow), with a float momentum.
        """
        buffers, params = self._buffers, self._parameters
        momentum = self.momentum
        try:
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            counter = buffers["num_batches_tracked"]
            weight, bias = params["weight"], params["bias"]
        except KeyError:
            return self._forward_general(input)
        if momentum is not None and type(momentum) is not float:
            return self._forward_general(input)
        training = self.training
        counted = training and self.track_running_stats and counter is not None
        if counted:
            # Counted before the batch is checked, exactly as torch does. On the
            # CPU fill_ costs about half of add_ for a single element.
            if counter.is_cpu:
                count = counter.item() + 1
                counter.fill_(count)
                if momentum is None:
                    momentum = 1.0 / count
            else:
                counter.add_(1)
                if momentum is None:
                    momentum = 1.0 / counter.item()
        elif momentum is None:
            momentum = 0.0
        if training:
            if not self.track_running_stats:
                running_mean = running_var = None
            y = BNA.batch_norm_eager(
                input, weight, bias, running_mean, running_var, True, momentum, self.eps
            )
        else:
            y = BNA.batch_norm_eager(
                input,
                weight,
                bias,
                running_mean,
                running_var,
                running_mean is None and running_var is None,
                momentum,
                self.eps,
            )
        return self._forward_general(input, counted) if y is None else y

    def _forward_general(self, input: Tensor, counted: bool = False) -> Tensor:
        """Any input, eager or compiled; ``counted``: the batch counter has already moved."""
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if not counted:
                # Counted before the batch is checked, exactly as torch does.
                self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # Cumulative average as a tensor: no host sync, traceable by torch.compile.
                momentum = self.num_batches_tracked.to(torch.float64).reciprocal()
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Buffers are passed where they are updated (training and tracking) or used (eval).
        pass_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; drop-in for ``torch.nn.BatchNorm1d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; drop-in for ``torch.nn.BatchNorm2d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input; drop-in for ``torch.nn.BatchNorm3d``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
