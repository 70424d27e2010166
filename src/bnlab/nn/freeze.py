"""Freeze every batch norm of a model into FrozenBatchNorm, in place, and back.

``freeze`` turns each batch norm, torch's or bnlab's (any subclass of
torch's ``_BatchNorm``: BatchNorm, SyncBatchNorm, BatchRenorm, GhostBatchNorm),
into the :class:`FrozenBatchNorm` of its rank (2d for SyncBatchNorm, which takes
any) with its current affine and
running statistics: the eval-mode function it computes now, fixed. ``unfreeze``
turns each FrozenBatchNorm into a trainable :class:`bnlab.nn.BatchNorm` of the
same rank, whose eval mode computes the same. Both keep device and dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import batchnorm
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm

_FROZEN_OF = (  # bnlab's layers and the variants subclass torch's classes
    (nn.BatchNorm1d, FrozenBatchNorm1d),
    (nn.BatchNorm2d, FrozenBatchNorm2d),
    (nn.BatchNorm3d, FrozenBatchNorm3d),
)
_TRAINABLE_OF = {
    FrozenBatchNorm1d: batchnorm.BatchNorm1d,
    FrozenBatchNorm2d: batchnorm.BatchNorm2d,
    FrozenBatchNorm3d: batchnorm.BatchNorm3d,
}


def _frozen(module: nn.modules.batchnorm._BatchNorm, name: str) -> nn.Module:
    # A layer of any rank (SyncBatchNorm) becomes the 2d one, as detectron2 freezes it.
    target = next((f for t, f in _FROZEN_OF if isinstance(module, t)), FrozenBatchNorm2d)
    running_mean, running_var = module.running_mean, module.running_var
    problem = None
    if running_mean is None or running_var is None:
        problem = "it has no running statistics (track_running_stats=False)"
    elif isinstance(running_mean, nn.parameter.UninitializedBuffer):
        problem = "it is a lazy layer that has not seen an input yet"
    if problem is not None:
        warnings.warn(f"freeze: left {name or 'the model'} as it is: {problem}", stacklevel=3)
        return module
    frozen = target(
        module.num_features, module.eps, device=running_mean.device, dtype=running_mean.dtype
    )
    with torch.no_grad():
        frozen.running_mean.copy_(running_mean)
        frozen.running_var.copy_(running_var)
        if module.weight is not None:
            frozen.weight.copy_(module.weight)
        if module.bias is not None:
            frozen.bias.copy_(module.bias)
    frozen.train(module.training)
    return frozen


def _trainable(module: _FrozenBatchNorm) -> nn.Module:
    b = module._buffers
    target = next(t for f, t in _TRAINABLE_OF.items() if isinstance(module, f))
    bn = target(
        module.num_features, module.eps, device=b["running_mean"].device,
        dtype=b["running_mean"].dtype,
    )  # fmt: skip
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(b[name])
    bn.train(module.training)
    return bn


def _replace(module: nn.Module, convert, name: str = "") -> nn.Module:
    new = convert(module, name)
    if new is not None:
        return new
    for child_name, child in module.named_children():
        setattr(module, child_name, _replace(child, convert, f"{name}.{child_name}".lstrip(".")))
    return module


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch norm in ``model``, at any depth, by a FrozenBatchNorm, in place.

    The frozen layer computes the batch norm's eval-mode output from its current
    affine (γ = 1, β = 0 without one) and running statistics, in training and
    eval. A batch norm without running statistics stays, with a warning.
    Returns ``model``, or the frozen layer when ``model`` itself is a batch norm.
    """

    def convert(m: nn.Module, name: str) -> nn.Module | None:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return _frozen(m, name)
        return None

    return _replace(model, convert)


def unfreeze(model: nn.Module) -> nn.Module:
    """Replace every FrozenBatchNorm in ``model`` by a trainable :class:`bnlab.nn.BatchNorm`.

    The new layer has the frozen one's eps, affine (as Parameters) and running
    statistics, momentum 0.1 and a batch counter of 0; its eval mode computes
    what the frozen layer computed. Returns ``model``, or the new layer when
    ``model`` itself is a FrozenBatchNorm.
    """

    def convert(m: nn.Module, name: str) -> nn.Module | None:
        return _trainable(m) if isinstance(m, _FrozenBatchNorm) else None

    return _replace(model, convert)
