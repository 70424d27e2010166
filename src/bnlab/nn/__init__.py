"""bnlab's batch norm modules: drop-in replacements for torch.nn's."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert",
]
