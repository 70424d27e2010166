"""bnlab's batch norm modules: drop-in replacements for torch.nn's."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_relu import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from .convert import convert
from .freeze import freeze, unfreeze
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .lazy import LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm
from .torch_quantization import register_with_torch

register_with_torch()

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "convert",
    "freeze",
    "unfreeze",
]
