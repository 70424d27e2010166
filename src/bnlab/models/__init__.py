"""Models whose normalization layer is an argument."""

from bnlab.models.lenet import NORMS, LeNet5, norm_layers

__all__ = ["NORMS", "LeNet5", "norm_layers"]
