"""bnlab's BatchNorm1d/2d/3d in torch's eager-mode fusion (``torch.ao.quantization.fuse_modules``).

torch looks a fuser up by the exact types of the modules to fuse, so a
subclass of ``torch.nn.BatchNorm2d`` is not found: ``fuse_modules(model,
[["conv", "bn", "relu"]])`` stopped with "did not find fuser method". Each of
torch's entries that names one of its batch norms gets a twin that names
bnlab's, with the same fuser. The fusers read what bnlab's layers share with
torch's (weight, bias, running buffers, eps, momentum, training), and the
fused modules are torch's own: folded convolutions in eval, ``ConvBn2d`` and
the like for quantization-aware training. Those accept only torch's layer
types, so the twin hands them torch's layer, sharing bnlab's parameters and
buffers (:func:`bnlab.nn.convert`): the numbers are the same.
"""

from __future__ import annotations

from torch import nn
from torch.ao.quantization import fuser_method_mappings

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert

TWINS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def register_fusers() -> None:
    """Add bnlab's twins to torch's table of eager-mode fusers (once; again is a no-op)."""
    # A private table: a torch without it keeps its own behaviour, fusers not found.
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if table is None:
        return
    for types, fuser in list(table.items()):
        if any(t in TWINS for t in types):
            table.setdefault(tuple(TWINS.get(t, t) for t in types), _on_torch_layers(fuser))


def _on_torch_layers(fuser):
    """``fuser`` handed torch's batch norm layers in place of bnlab's, sharing their state."""

    def fuse(is_qat, *modules):
        bnlab_layers = tuple(TWINS.values())
        return fuser(
            is_qat, *(convert(m, to="torch") if type(m) in bnlab_layers else m for m in modules)
        )

    return fuse
