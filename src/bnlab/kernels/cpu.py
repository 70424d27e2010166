"""The CPU backend: fused native kernels for float32, float64, bfloat16 and float16 tensors.

Same contract as the reference backend (:mod:`bnlab.kernels.protocol`),
computed by ``cpu_kernels.cpp`` through the checked calls of
:mod:`bnlab.kernels._cpu_native`, one native call per function:

* ``forward_train`` — statistics from shifted sums with a float64 carry, the
  running-buffer update and normalize-and-affine, in one call;
* ``forward_eval`` — one elementwise pass;
* ``backward`` — the two channel sums, then dx.

This module fits the arguments to what the kernels read: x contiguous,
channels_last or channels_last_3d (other strides are copied to contiguous
first), weight and bias in x's compute dtype (float32 for bfloat16 and
float16 input, whose parameters torch keeps in float32 too), statistics in
float64 (wider than the reference's float32, so backward keeps full
precision when |mean| >> std). Running buffers the kernels cannot write in
place (a 16-bit dtype, strided, a momentum per channel) move by the
reference rule.

Calls being captured (:func:`bnlab.kernels.protocol.captured`: by
``torch.compile``, ``torch.jit.trace`` or a Python dispatch mode) run behind
the custom ops of :mod:`bnlab.kernels._cpu_ops`, which those keep whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build, _cpu_native, reference
from ._cpu_native import DTYPE_CODES, compute_dtype
from ._layout import geometry
from .protocol import captured

_F64 = torch.float64


def _dense(x: Tensor) -> Tensor:
    """x in a layout the kernels read (a contiguous copy if needed)."""
    return x if geometry(x) is not None else x.contiguous()


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A (C,) tensor as the kernels read it: contiguous, of ``dtype``."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


def _scalar(momentum: float | Tensor) -> float | None:
    """momentum as one float for the fused update, or None when it is per channel."""
    if isinstance(momentum, Tensor):
        return float(momentum) if momentum.numel() == 1 else None
    return momentum


# Each call first hands its arguments to the kernels as they are: the
# boundary checks them all and raises Mismatch before touching anything.
# Only then are they converted (a copy of x, parameters in x's dtype,
# buffers the kernels cannot write updated by the reference rule), so the
# common case pays for one set of checks.


def eager_forward_train(
    x, weight, bias, eps, running_mean, running_var, momentum, want_stats=True, want_var=False
):
    """(y, stats, var); moves the running buffers when given (see the backend).

    var is None unless wanted, or needed to move buffers the kernels cannot write.
    """
    m = _scalar(momentum)
    if m is not None:
        try:
            return _cpu_native.forward_train(
                x, weight, bias, eps, running_mean, running_var, m, want_stats, want_var
            )
        except _cpu_native.Mismatch:
            pass
    x = _dense(x)
    param = compute_dtype(x.dtype)
    y, stats, var = _cpu_native.forward_train(x, _as(weight, param), _as(bias, param), eps)
    if running_mean is not None:
        reference.update_running_stats(
            running_mean, running_var, stats[0], var, momentum, x.numel() // x.size(1)
        )
    return y, stats, var


def eager_forward_eval(x, weight, bias, running_mean, running_var, eps, want_stats=True):
    try:
        return _cpu_native.forward_eval(x, weight, bias, running_mean, running_var, eps, want_stats)
    except _cpu_native.Mismatch:
        x, param = _dense(x), compute_dtype(x.dtype)
        return _cpu_native.forward_eval(
            x, _as(weight, param), _as(bias, param),
            _as(running_mean, _F64), _as(running_var, _F64), eps, want_stats,
        )  # fmt: skip


def eager_backward(dy, x, weight, stats, batch_stats):
    try:
        return _cpu_native.backward(dy, x, weight, stats, batch_stats)
    except _cpu_native.Mismatch:
        x = _dense(x)
        if dy.dtype != x.dtype or dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        weight = _as(weight, compute_dtype(x.dtype))
        return _cpu_native.backward(dy, x, weight, _as(stats, _F64), batch_stats)


class CPUBackend:
    """:class:`~bnlab.kernels.protocol.Backend` on the native CPU kernels."""

    name = "cpu"

    def supports(self, x: Tensor) -> bool:
        """Float32/float64/bfloat16/float16 CPU tensors with at least one element, when the
        kernels can be built.

        Under ``torch.compile`` this is decided without building anything: the
        custom ops fall back to the reference formulas at run time if they must.
        """
        if not (x.is_cpu and x.dtype in DTYPE_CODES and x.numel() > 0):
            return False
        if torch.compiler.is_compiling():
            return _build.ENABLED
        return _build.native() is not None

    def forward_train(
        self, x, weight, bias, eps, running_mean, running_var, momentum, want_stats=True
    ):
        if captured():
            y, stats, var = torch.ops.bnlab.cpu_forward_train(x, weight, bias, eps)
            if running_mean is not None:
                reference.update_running_stats(
                    running_mean, running_var, stats[0], var, momentum, x.numel() // x.size(1)
                )
            return y, stats
        y, stats, _ = eager_forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, want_stats
        )
        return y, stats

    def forward_eval(self, x, weight, bias, running_mean, running_var, eps, want_stats=True):
        if captured():
            return torch.ops.bnlab.cpu_forward_eval(x, weight, bias, running_mean, running_var, eps)
        return eager_forward_eval(x, weight, bias, running_mean, running_var, eps, want_stats)

    def backward(self, dy, x, weight, stats, batch_stats):
        if captured():
            return torch.ops.bnlab.cpu_backward(dy, x, weight, stats, batch_stats)
        return eager_backward(dy, x, weight, stats, batch_stats)

    # Batch norm across processes, composed from the calls above (no kernels
    # of its own): each does one more pass over memory than a dedicated kernel.

    def batch_stats(self, x):
        """The training forward's statistics (shifted sums, float64); its y is discarded."""
        if captured():
            _, stats, var = torch.ops.bnlab.cpu_forward_train(x, None, None, 1.0)
        else:
            _, stats, var = eager_forward_train(x, None, None, 1.0, None, None, 0.0, True, True)
        return x.numel() // x.size(1), stats[0], var

    def backward_reduce(self, dy, x, stats):
        """The sums of the evaluation-mode backward (float64 carry, x's compute dtype); its dx
        is discarded."""
        _, sum_dy_xhat, sum_dy = self.backward(dy, x, None, stats, False)
        return sum_dy, sum_dy_xhat

    def backward_elemt(self, dy, x, weight, stats, mean_dy, mean_dy_xhat):
        """dx = a·dy + ((x − mean)·k + c), a = γ·invstd, k = −a·invstd·mean_dy_xhat, c = −a·mean_dy.

        The bracket is the evaluation kernel's per-channel affine map of x
        (unit variance, eps 0), which subtracts the mean in float64 first, so
        float32 data with a large mean keeps its precision; a·dy is added in place.
        """
        mean, invstd = stats.to(_F64)
        a = invstd if weight is None else invstd * weight.to(_F64)
        k = -a * invstd * mean_dy_xhat.to(_F64)
        c = -a * mean_dy.to(_F64)
        param = compute_dtype(x.dtype)
        dx, _ = self.forward_eval(
            x, k.to(param), c.to(param), mean, torch.ones_like(mean), 0.0, False
        )
        return dx.addcmul_(dy, a.to(param).view([1, -1] + [1] * (x.dim() - 2)))


CPU = CPUBackend()
