"""LeNet-5 for 32x32 RGB images, with the normalization layer as an argument.

The architecture is the one of the classic "LeNet-5 + BN" CIFAR-10 script:

    conv 3->6 k5, [BN2d], ReLU, maxpool 2      # (N, 6, 14, 14)
    conv 6->16 k5, [BN2d], ReLU, maxpool 2     # (N, 16, 5, 5)
    flatten                                    # (N, 400)
    linear 400->120, [BN1d], ReLU              # (N, 120)
    linear 120->84, [BN1d], ReLU               # (N, 84)
    linear 84->10                              # (N, 10)

"With or without BN" is the `norm` argument, so every variant is built by the
same code and, for a given torch seed, starts from the same conv/linear weights
(normalization layers draw no random numbers at initialization).
"""

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from bnlab.nn import BatchNorm1d, BatchNorm2d

NormFactory = Callable[[int], nn.Module]


def _no_norm(num_features: int) -> nn.Module:
    return nn.Identity()


# name -> (factory for conv features, factory for linear features)
NORMS: dict[str, tuple[NormFactory, NormFactory]] = {
    "bn": (BatchNorm2d, BatchNorm1d),
    "torch-bn": (nn.BatchNorm2d, nn.BatchNorm1d),
    "none": (_no_norm, _no_norm),
}


def norm_layers(norm: str) -> tuple[NormFactory, NormFactory]:
    """The (2d, 1d) norm-layer factories for `norm`; ValueError names the choices."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    return NORMS[norm]


class LeNet5(nn.Sequential):
    """LeNet-5; each child is one stage, so iterating the model walks the stages."""

    def __init__(self, norm: str = "bn", num_classes: int = 10) -> None:
        norm2d, norm1d = norm_layers(norm)
        super().__init__(
            OrderedDict(
                conv1=nn.Sequential(
                    nn.Conv2d(3, 6, 5), norm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2)
                ),
                conv2=nn.Sequential(
                    nn.Conv2d(6, 16, 5), norm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2)
                ),
                flatten=nn.Flatten(),
                fc1=nn.Sequential(nn.Linear(16 * 5 * 5, 120), norm1d(120), nn.ReLU(inplace=True)),
                fc2=nn.Sequential(nn.Linear(120, 84), norm1d(84), nn.ReLU(inplace=True)),
                fc3=nn.Linear(84, num_classes),
            )
        )
        self.norm = norm
