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

Besides batch norm, the norms the small-batch and fine-tuning fixes bring:
"renorm" (batch renormalization, its limits opening over `renorm_warmup`
training steps), "ghost" (ghost batch norm over virtual batches of
GHOST_BATCH), "frozen" (batch norm that the training loop freezes after
FREEZE_AFTER_EPOCHS, see train.py) and "gn" (GroupNorm, which uses no batch
statistics at all).
"""

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from torch import nn

from bnlab.nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    SyncBatchNorm,
)

NormFactory = Callable[[int], nn.Module]

RENORM_RMAX = 3.0  # r's final limit: σ_B/σ within [1/3, 3] (Ioffe's schedule ends there)
RENORM_DMAX = 5.0  # d's final limit, in running σ (likewise)
GHOST_BATCH = 16  # samples per virtual batch
GROUPS = 2  # LeNet's widths 6, 16, 120 and 84 share only the divisors 1 and 2
# norm -> epochs it trains as batch norm before the training loop freezes it (bnlab.nn.freeze)
FREEZE_AFTER_EPOCHS = {"frozen": 1}


def _no_norm(num_features: int) -> nn.Module:
    return nn.Identity()


def _group_norm(num_features: int) -> nn.Module:
    return nn.GroupNorm(GROUPS, num_features)


# name -> (factory for conv features, factory for linear features)
NORMS: dict[str, tuple[NormFactory, NormFactory]] = {
    "bn": (BatchNorm2d, BatchNorm1d),
    "torch-bn": (nn.BatchNorm2d, nn.BatchNorm1d),
    "none": (_no_norm, _no_norm),
    "renorm": (
        partial(BatchRenorm2d, rmax=RENORM_RMAX, dmax=RENORM_DMAX),
        partial(BatchRenorm1d, rmax=RENORM_RMAX, dmax=RENORM_DMAX),
    ),
    "ghost": (
        partial(GhostBatchNorm2d, virtual_batch_size=GHOST_BATCH),
        partial(GhostBatchNorm1d, virtual_batch_size=GHOST_BATCH),
    ),
    "frozen": (BatchNorm2d, BatchNorm1d),  # frozen by the training loop, not here
    "gn": (_group_norm, _group_norm),
    # statistics over the batches of every process (torchrun); plain batch norm in one process
    "syncbn": (SyncBatchNorm, SyncBatchNorm),
}


def norm_layers(norm: str, renorm_warmup: int = 0) -> tuple[NormFactory, NormFactory]:
    """The (2d, 1d) norm-layer factories for `norm`; ValueError names the choices.

    `renorm_warmup`: the training steps over which renorm's limits open from
    plain batch norm (the experiment passes one epoch's); other norms ignore it.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    norm2d, norm1d = NORMS[norm]
    if norm == "renorm":
        return partial(norm2d, warmup=renorm_warmup), partial(norm1d, warmup=renorm_warmup)
    return norm2d, norm1d


class LeNet5(nn.Sequential):
    """LeNet-5; each child is one stage, so iterating the model walks the stages."""

    def __init__(self, norm: str = "bn", num_classes: int = 10, *, renorm_warmup: int = 0) -> None:
        norm2d, norm1d = norm_layers(norm, renorm_warmup)
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
