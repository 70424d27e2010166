"""Swap torch.nn batch norm layers for bnlab's (and back) in a model, in place.

The swapped-in module takes over the very same Parameter and buffer objects,
hooks and flags, so an optimizer built before the swap keeps working and
state_dicts are unchanged.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from . import batchnorm, lazy, sync

_TORCH_TO_BNLAB: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    nn.BatchNorm3d: batchnorm.BatchNorm3d,
    nn.LazyBatchNorm1d: lazy.LazyBatchNorm1d,
    nn.LazyBatchNorm2d: lazy.LazyBatchNorm2d,
    nn.LazyBatchNorm3d: lazy.LazyBatchNorm3d,
    nn.SyncBatchNorm: sync.SyncBatchNorm,
}
_BNLAB_TO_TORCH = {v: k for k, v in _TORCH_TO_BNLAB.items()}
_LAZY_HOOK_ATTRS = ("_initialize_hook", "_load_hook")


def _swap_plain(module: nn.Module, target: type[nn.Module]) -> nn.Module:
    """A ``target`` instance sharing ``module``'s parameters, buffers, hooks and attributes."""
    new = target.__new__(target)
    # Copy containers one level deep: the new module owns its dicts but shares
    # the Parameter, buffer and hook objects in them.
    new.__dict__.update(
        {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    )
    return new


def _swap_lazy(module: nn.Module, target: type[nn.Module]) -> nn.Module:
    """Lazy modules hold hooks bound to themselves: build a fresh one, move the rest over."""
    new = target(
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    own_hooks = {getattr(module, a).id for a in _LAZY_HOOK_ATTRS if hasattr(module, a)}
    for name in ("_parameters", "_buffers"):
        getattr(new, name).update(getattr(module, name))
    for name, hooks in module.__dict__.items():
        if (
            name.endswith("_hooks")
            and isinstance(hooks, dict)
            and name != "_forward_pre_hooks_with_kwargs"
        ):
            for hook_id, hook in hooks.items():
                if hook_id not in own_hooks:
                    getattr(new, name)[hook_id] = hook
    new.num_features = module.num_features
    new.train(module.training)
    return new


def _swap(module: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    target = mapping.get(type(module))
    if target is None:
        for name, child in module.named_children():
            setattr(module, name, _swap(child, mapping))
        return module
    lazy_types = (nn.modules.lazy.LazyModuleMixin,)
    return (
        _swap_lazy(module, target)
        if isinstance(module, lazy_types)
        else _swap_plain(module, target)
    )


def convert(module: nn.Module, to: Literal["bnlab", "torch"] = "bnlab") -> nn.Module:
    """Replace every batch norm layer of ``module``, at any depth, by the ``to`` library's.

    ``to="bnlab"`` swaps torch.nn's BatchNorm1d/2d/3d, their Lazy variants and
    SyncBatchNorm for bnlab's; ``to="torch"`` swaps back (for ONNX or TorchScript export). Only
    those exact classes are swapped; subclasses are left alone. The model is
    changed in place; the return value is the model, or the new module when
    ``module`` itself was a batch norm layer.
    """
    if to == "bnlab":
        return _swap(module, _TORCH_TO_BNLAB)
    if to == "torch":
        return _swap(module, _BNLAB_TO_TORCH)
    raise ValueError(f"convert: to must be 'bnlab' or 'torch', got {to!r}")
