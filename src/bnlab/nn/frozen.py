"""FrozenBatchNorm1d/2d/3d: batch norm with fixed statistics and affine, all buffers.

    y = (x − running_mean)/sqrt(running_var + eps)·weight + bias

in training and eval alike: BatchNorm's eval, on the same path (eval
forward and backward, dx = dy·weight/sqrt(running_var + eps)). Nothing is a
Parameter, so optimizers and weight decay leave it alone, and nothing moves.

The buffers are torchvision's and detectron2's ``FrozenBatchNorm2d``'s
(``weight``, ``bias``, ``running_mean``, ``running_var``), so their checkpoints
load; a BatchNorm checkpoint loads too (its ``num_batches_tracked`` is
dropped, as those libraries drop it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .batchnorm import check_channels, fx_leaf


class _FrozenBatchNorm(nn.Module):
    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm checkpoint's counter
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._expected_dims:
            wanted = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"expected {wanted} input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        node = fx_leaf(self, input)
        if node is not None:
            return node
        self._check_input_dim(input)
        check_channels(self, input)
        b = self._buffers  # read as batchnorm.affine_of reads a layer's parameters
        try:
            mean, var, weight, bias = b["running_mean"], b["running_var"], b["weight"], b["bias"]
        except KeyError:
            mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        return F.batch_norm(input, mean, var, weight, bias, False, 0.0, self.eps)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, H, W) input; loads torchvision's and detectron2's."""

    _expected_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input."""

    _expected_dims = (5,)
