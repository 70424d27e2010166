"""precise_bn: set every batch norm's running statistics to exact population statistics.

An exponential moving average weights recent batches most and mixes
statistics taken while the weights changed. After training, one pass over
data with the weights fixed gives each layer the mean and variance of
everything it sees (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021;
fvcore's ``update_bn_stats``). Each layer's statistics are pooled over all
values seen, batches together: the variance includes the spread of the batch
means. (Averaging per-batch variances, fvcore's approximation, leaves that
out; an EMA is not the population's.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._population import (
    ChannelStats,
    batch_norms,
    model_inputs,
    recording_inputs,
    training_without_updates,
)


def population_statistics(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, ChannelStats]:
    """Each batch norm's pooled input statistics, by name, the model in training mode.

    Every layer sees its input as in training (upstream batch norms normalize
    with batch statistics); no running statistic moves and no flag changes.
    """
    layers = {name: m for name, m in batch_norms(model).items() if m.running_mean is not None}
    stats = {name: ChannelStats() for name in layers}

    def record(name: str, layer: nn.Module, x: Tensor) -> None:
        stats[name].add(x)

    seen = 0
    with torch.no_grad(), training_without_updates(model), recording_inputs(layers, record):
        for item in model_inputs(batches, num_batches, device):
            model(item)
            seen += 1
    if seen == 0:
        raise ValueError("precise_bn: batches gave no batch")
    return stats


def precise_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Recompute every batch norm's running statistics over ``batches``, in place.

    For each batch norm (torch's or bnlab's, any subclass of torch's
    ``_BatchNorm`` that has running statistics), over all n values of each
    channel its input takes in training mode across the batches:

        running_mean = Σx/n,   running_var = Σ(x − running_mean)²/(n − 1)

    the *unbiased* variance, BatchNorm's convention for running_var (its batch
    updates use n/(n − 1) too). Accumulated in float64.

    ``batches``: an iterable of model inputs; a tensor is passed whole, a
    tuple or list passes its first element (``update_bn``'s convention), at most
    ``num_batches`` of them (all by default), moved to ``device`` when given.
    The model runs in training mode (dropout too) under ``torch.no_grad()``;
    its training flags, parameters and batch counters are left as they were.
    A layer that sees no value keeps its statistics, with a warning.
    """
    stats = population_statistics(model, batches, num_batches, device)
    layers = batch_norms(model)
    with torch.no_grad():
        for name, s in stats.items():
            layer = layers[name]
            if s.count < 2:
                warnings.warn(
                    f"precise_bn: {name or 'the model'} saw {s.count} value(s) per channel; "
                    "its running statistics are left as they were",
                    stacklevel=2,
                )
                continue
            layer.running_mean.copy_(s.mean)
            layer.running_var.copy_(s.var(unbiased=True))
