"""Models whose normalization layer is an argument, and exact rewrites of them for speed."""

from bnlab.models.fused import ReLUMaxPool2d, fuse_relu_maxpool
from bnlab.models.lenet import NORMS, LeNet5, norm_layers

__all__ = ["NORMS", "LeNet5", "ReLUMaxPool2d", "fuse_relu_maxpool", "norm_layers"]
