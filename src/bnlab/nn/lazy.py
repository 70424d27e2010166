"""LazyBatchNorm1d/2d/3d: infer ``num_features`` from ``input.shape[1]`` on the first call.

torch.nn's lazy layers with bnlab's forward: after the first call the module
becomes bnlab's plain class (``cls_to_become``). With ``affine=False`` and
``track_running_stats=False`` there is nothing to materialize, so, as in
torch, ``num_features`` stays 0 and the module accepts any channel count.
"""

from __future__ import annotations

from torch import nn

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm


class LazyBatchNorm1d(_BatchNorm, nn.LazyBatchNorm1d):
    """:class:`BatchNorm1d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_BatchNorm, nn.LazyBatchNorm2d):
    """:class:`BatchNorm2d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_BatchNorm, nn.LazyBatchNorm3d):
    """:class:`BatchNorm3d` whose ``num_features`` comes from the first input."""

    cls_to_become = BatchNorm3d
