"""BatchNormReLU1d/2d/3d: batch norm and a ReLU after it, one layer, fused on the GPU.

``BatchNormReLU2d(C)`` computes ``relu(BatchNorm2d(C)(x))`` with the same
arguments, parameters, buffers and state_dict keys as ``BatchNorm2d`` (a
batch norm's state loads into it unchanged). With the Triton backend (CUDA
tensors) both run in the batch norm's passes; elsewhere it is the
composition (:mod:`bnlab.fused_relu`).

It derives from torch's ``_NormBase``, not from ``_BatchNorm``: helpers that
replace every ``_BatchNorm`` by another class (``convert_sync_batchnorm``,
:func:`bnlab.nn.freeze`, :func:`bnlab.toolkit.fold`) would drop its ReLU, so
they leave it alone. bnlab's statistics tools (PreciseBN, diagnose) include
it; ``torch.optim.swa_utils.update_bn`` does not.
"""

from __future__ import annotations

from torch import nn

from .. import functional as F
from .batchnorm import _BatchNorm


class _BatchNormReLU(nn.modules.batchnorm._NormBase):
    # bnlab's batch norm's checks, batch count, choice of statistics and call, handed to
    # batch_norm_relu.
    _plan = _BatchNorm._plan
    forward = _BatchNorm.forward
    _normalize = staticmethod(F.batch_norm_relu)


class BatchNormReLU1d(_BatchNormReLU):
    """relu(BatchNorm1d(x)) over (N, C) or (N, C, L) input."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchNormReLU2d(_BatchNormReLU):
    """relu(BatchNorm2d(x)) over (N, C, H, W) input."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchNormReLU3d(_BatchNormReLU):
    """relu(BatchNorm3d(x)) over (N, C, D, H, W) input."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim
