"""bnlab's BatchNorm1d/2d/3d in torch's eager-mode quantization tables.

torch looks up by a module's exact type both the fuser for a run of modules
(``torch.ao.quantization.fuse_modules``) and the quantized module that
``convert`` puts in a float one's place, so a subclass of
``torch.nn.BatchNorm2d`` is found in neither: ``fuse_modules(model, [["conv",
"bn", "relu"]])`` stopped with "did not find fuser method", and a model
quantized without fusing kept bnlab's float layer, which then met a
quantized tensor. Each of torch's entries that names one of its batch norms
gets a twin that names bnlab's.

The fusers and ``from_float`` read what bnlab's layers share with torch's
(weight, bias, running buffers, eps, momentum, training), and what they
build is torch's own: folded convolutions, ``ConvBn2d``-style modules for
quantization-aware training, quantized batch norms. The fused modules accept
only torch's layer types, so a twin fuser hands them torch's layer, sharing
bnlab's parameters and buffers (:func:`bnlab.nn.convert`): the numbers are
the same.
"""

from __future__ import annotations

from torch import nn
from torch.ao.quantization import fuser_method_mappings, quantization_mappings

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert

TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_BNLAB_LAYERS = frozenset(TWINS.values())


def register_with_torch() -> None:
    """Add bnlab's twins to torch's fuser and quantized-module tables (again: a no-op)."""
    # Module globals (the fusers' private): a torch without them keeps its own behaviour.
    fusers = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if fusers is not None:
        for types, fuser in list(fusers.items()):
            if any(t in TWINS for t in types):
                fusers.setdefault(tuple(TWINS.get(t, t) for t in types), _on_torch_layers(fuser))
    quantized = getattr(quantization_mappings, "DEFAULT_STATIC_QUANT_MODULE_MAPPINGS", None)
    if quantized is not None:
        for theirs, ours in TWINS.items():
            if theirs in quantized:
                quantized.setdefault(ours, quantized[theirs])


def _on_torch_layers(fuser):
    """``fuser`` handed torch's batch norm layers in place of bnlab's, sharing their state."""

    def fuse(is_qat, *modules):
        return fuser(
            is_qat, *(convert(m, to="torch") if type(m) in _BNLAB_LAYERS else m for m in modules)
        )

    return fuse
