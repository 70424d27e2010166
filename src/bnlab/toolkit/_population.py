"""Exact per-channel statistics of what each batch norm layer sees, over many batches.

Shared by :func:`bnlab.precise_bn` and :func:`bnlab.diagnose`: forward
pre-hooks record every batch norm's input, batch by batch, into float64
running sums that pool the batches exactly (Chan, Golub & LeVeque's parallel
variance), and a context puts the model in training mode without moving any
running statistics.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..nn.batchnorm_relu import _BatchNormReLU


def batch_norms(model: nn.Module) -> dict[str, nn.modules.batchnorm._NormBase]:
    """Every batch norm in ``model`` by name: torch's and bnlab's (any ``_BatchNorm``),
    and bnlab's BatchNormReLU layers, whose statistics are their batch norm's."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, _BatchNormReLU))
    }


def _reduce_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def merge(
    count_a: int, mean_a: Tensor, m2_a: Tensor, count_b: int, mean_b: Tensor, m2_b: Tensor
) -> tuple[int, Tensor, Tensor]:
    """Pool two groups' (count, mean, M2 = Σ(x − mean)²), per channel:

        n = n_a + n_b,  δ = mean_b − mean_a
        mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

    The δ² term is the spread of the group means: pooled, the variance is that
    of all values, not the average of the groups' variances.
    """
    n = count_a + count_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (count_b / n), m2_a + m2_b + delta.square() * (count_a * count_b / n)


@dataclass
class ChannelStats:
    """Per-channel count, mean, M2, min and max of every value seen, in float64."""

    count: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    minimum: Tensor | None = None
    maximum: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Pool one batch (N, C, *) into the statistics."""
        x = x.detach().to(torch.float64)
        dims = _reduce_dims(x)
        count = x.numel() // x.shape[1] if x.shape[1] else 0
        if count == 0:
            return
        mean = x.mean(dims)
        m2 = (x - mean.view([1, -1] + [1] * (x.dim() - 2))).square().sum(dims)
        lo, hi = x.amin(dims), x.amax(dims)
        if self.count == 0:
            self.count, self.mean, self.m2, self.minimum, self.maximum = count, mean, m2, lo, hi
            return
        self.count, self.mean, self.m2 = merge(self.count, self.mean, self.m2, count, mean, m2)
        self.minimum, self.maximum = (
            torch.minimum(self.minimum, lo),
            torch.maximum(self.maximum, hi),
        )

    def var(self, unbiased: bool = True) -> Tensor:
        """Σ(x − mean)²/(n − 1) (``unbiased``, BatchNorm's running_var convention) or /n."""
        return self.m2 / (self.count - 1 if unbiased else self.count)


@contextlib.contextmanager
def recording_inputs(
    layers: dict[str, nn.Module], record: Callable[[str, nn.Module, Tensor], None]
) -> Iterator[None]:
    """Call ``record(name, layer, input)`` before each call of each layer."""
    handles = []
    try:
        for name, layer in layers.items():

            def hook(module, args, name=name):
                record(name, module, args[0])

            handles.append(layer.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def training_without_updates(model: nn.Module) -> Iterator[None]:
    """The model in training mode, its batch norms with running statistics left as they are.

    Batch norms normalize with batch statistics, as in training, but with
    ``track_running_stats`` off they neither move their buffers nor count the
    batch (their eval mode would still read the buffers). Every module's flags
    come back afterwards.
    """
    modes = {m: m.training for m in model.modules()}
    tracking = {m: m.track_running_stats for m in batch_norms(model).values()}
    try:
        model.train()
        for m in tracking:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in tracking.items():
            m.track_running_stats = flag
        for m, flag in modes.items():
            m.training = flag


def model_inputs(
    batches: Iterable, num_batches: int | None, device: torch.device | str | None
) -> Iterator:
    """What to call the model with: a tensor whole, a tuple or list's first element
    (``torch.optim.swa_utils.update_bn``'s convention), anything else as it is;
    at most ``num_batches`` of them, moved to ``device`` when given."""
    for item in itertools.islice(batches, num_batches):
        if isinstance(item, (list, tuple)):
            item = item[0]
        if device is not None and isinstance(item, Tensor):
            item = item.to(device)
        yield item
