"""diagnose: how far each batch norm's eval mode is from what training showed it.

One row per batch norm (torch's or bnlab's), from one pass over some batches,
each batch run twice: in training mode with no running statistic moving (the
input each layer sees in training, pooled exactly over all batches) and in
eval mode (what inference computes). Nothing in the model changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._population import (
    ChannelStats,
    batch_norms,
    model_inputs,
    recording_inputs,
    training_without_updates,
)


@dataclass(frozen=True)
class LayerDiagnosis:
    """One batch norm layer's diagnosis (errors are over the channels that vary)."""

    name: str
    kind: str  # class name
    num_features: int
    mean_error: float  # max over channels of |running_mean − μ|/σ (μ, σ: population, train mode)
    var_error: float  # max over channels of |running_var − σ²|/σ² (σ² unbiased)
    output_gap: float  # ‖y_train − y_eval‖/‖y_train‖ on the inputs eval mode feeds the layer
    dead_channels: list[int] = field(default_factory=list)  # eval output never above 0
    constant_channels: list[int] = field(default_factory=list)  # input never varies (train mode)
    momentum: float | None = 0.1
    horizon: float = 10.0  # batches the running statistics average over (see momentum_horizon)
    values_per_channel: int = 0  # values each channel's population statistics pool


def momentum_horizon(momentum: float | None, num_batches_tracked: int) -> float:
    """How many recent batches the running statistics effectively average.

    An EMA with momentum m weighs the batch k steps back by m·(1 − m)^k: its
    time constant is 1/m batches (those hold 1 − (1 − m)^(1/m) ≈ 63% of the
    weight). momentum=None is the plain average of all batches counted so far.
    """
    if momentum is None:
        return float(num_batches_tracked)
    return math.inf if momentum <= 0 else 1.0 / momentum


def relative_errors(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, varies: Tensor
) -> tuple[float, float]:
    """max |running_mean − μ|/σ and max |running_var − σ²|/σ² over the channels that vary.

    The mean's error is in units of the channel's standard deviation: the shift
    eval mode applies to a normalized activation.
    """
    if not bool(varies.any()):
        return math.nan, math.nan
    rm, rv = running_mean.to(torch.float64)[varies], running_var.to(torch.float64)[varies]
    mean, var = mean[varies], var[varies]
    mean_error = ((rm - mean).abs() / var.sqrt()).max().item()
    var_error = ((rv - var).abs() / var).max().item()
    return mean_error, var_error


class _EvalRecord:
    """Per layer, over the eval-mode batches: Σ(y_train − y_eval)², Σy_train², max y_eval."""

    def __init__(self) -> None:
        self.diff2 = 0.0
        self.train2 = 0.0
        self.maximum: Tensor | None = None

    def add(self, layer: nn.Module, x: Tensor, y_eval: Tensor) -> None:
        y_train = _train_mode_output(layer, x).to(torch.float64)
        y_eval = y_eval.detach().to(torch.float64)
        self.diff2 += (y_train - y_eval).square().sum().item()
        self.train2 += y_train.square().sum().item()
        dims = [d for d in range(y_eval.dim()) if d != 1]
        top = y_eval.amax(dims)
        self.maximum = top if self.maximum is None else torch.maximum(self.maximum, top)

    def gap(self) -> float:
        return math.sqrt(self.diff2 / self.train2) if self.train2 > 0 else math.nan


def _train_mode_output(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's training-mode output on x (batch statistics), its state left as it is."""
    training, tracking = layer.training, layer.track_running_stats
    layer.training, layer.track_running_stats = True, False
    try:
        return layer.forward(x)  # forward, not __call__: the recording hooks stay out of it
    finally:
        layer.training, layer.track_running_stats = training, tracking


def diagnose(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> list[LayerDiagnosis]:
    """One :class:`LayerDiagnosis` per batch norm of ``model``, in module order.

    ``batches`` as for :func:`bnlab.precise_bn` (a tensor whole, a tuple or
    list's first element, at most ``num_batches``, moved to ``device``). Per layer:

    * ``mean_error``, ``var_error``: running statistics against the population
      statistics of the layer's training-mode input over all batches (what
      :func:`bnlab.precise_bn` would set);
    * ``output_gap``: on the input eval mode gives the layer, its
      training-mode output (batch statistics; chunks for ghost batch norm,
      corrections for renorm) against its eval-mode output, relative;
    * ``dead_channels``: eval-mode output never above 0 (a ReLU after it
      passes nothing); ``constant_channels``: training-mode input never varies;
    * ``horizon``: :func:`momentum_horizon`.

    A layer without running statistics gets NaN errors, gap and horizon.
    """
    layers = batch_norms(model)
    population = {name: ChannelStats() for name in layers}
    evals = {name: _EvalRecord() for name in layers}
    by_module = {m: name for name, m in layers.items()}

    def record_train(name: str, layer: nn.Module, x: Tensor) -> None:
        population[name].add(x)

    def record_eval(layer: nn.Module, args: tuple, output: Tensor) -> None:
        evals[by_module[layer]].add(layer, args[0], output)

    modes = {m: m.training for m in model.modules()}
    with torch.no_grad():
        for item in model_inputs(batches, num_batches, device):
            with training_without_updates(model), recording_inputs(layers, record_train):
                model(item)
            handles = [layer.register_forward_hook(record_eval) for layer in layers.values()]
            try:
                model.eval()
                model(item)
            finally:
                for handle in handles:
                    handle.remove()
                for m, flag in modes.items():
                    m.training = flag

    rows = []
    for name, layer in layers.items():
        stats, ev = population[name], evals[name]
        has_running = layer.running_mean is not None and layer.running_var is not None
        if stats.count > 1:
            varies = stats.maximum > stats.minimum
            constant = (~varies).nonzero().flatten().tolist()
        else:
            varies, constant = None, []
        if has_running and varies is not None:
            mean_error, var_error = relative_errors(
                layer.running_mean, layer.running_var, stats.mean, stats.var(), varies
            )
            gap = ev.gap()
        else:
            mean_error = var_error = gap = math.nan
        dead = [] if ev.maximum is None else (ev.maximum <= 0).nonzero().flatten().tolist()
        counter = layer.num_batches_tracked
        horizon = (
            momentum_horizon(layer.momentum, 0 if counter is None else int(counter))
            if has_running
            else math.nan
        )
        rows.append(
            LayerDiagnosis(
                name=name,
                kind=type(layer).__name__,
                num_features=layer.num_features,
                mean_error=mean_error,
                var_error=var_error,
                output_gap=gap,
                dead_channels=dead,
                constant_channels=constant,
                momentum=layer.momentum,
                horizon=horizon,
                values_per_channel=stats.count,
            )
        )
    return rows


def _channels(indices: list[int], limit: int = 4) -> str:
    if not indices:
        return "0"
    shown = ",".join(map(str, indices[:limit])) + (",…" if len(indices) > limit else "")
    return f"{len(indices)} ({shown})"


def format_diagnosis(rows: list[LayerDiagnosis]) -> str:
    """The rows as a markdown table, one line per layer."""
    lines = [
        "| layer | kind | C | mean err (σ) | var err | train/eval gap | dead | constant "
        "| momentum | horizon (batches) |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        momentum = "None (average)" if r.momentum is None else f"{r.momentum:g}"
        lines.append(
            f"| {r.name or '(model)'} | {r.kind} | {r.num_features} | {r.mean_error:.3g} | "
            f"{r.var_error:.3g} | {r.output_gap:.3g} | {_channels(r.dead_channels)} | "
            f"{_channels(r.constant_channels)} | {momentum} | {r.horizon:.3g} |"
        )
    return "\n".join(lines)
