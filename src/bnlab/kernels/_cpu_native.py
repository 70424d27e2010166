"""The checked boundary to the native CPU kernels (``cpu_kernels.cpp``).

The kernels take data pointers and sizes, so a wrong argument would read or
write the wrong memory. This module is the only place that takes pointers:
each function accepts tensors, derives the sizes from ``x`` itself,
allocates every output, and checks each other tensor's device, dtype, layout
and size against them before handing over a pointer. A mismatch raises
:class:`Mismatch` (a ``TypeError`` and a ``ValueError``) before anything is
written; :mod:`bnlab.kernels.cpu` catches it to convert what it may.

x is float32, float64, bfloat16 or float16 (``DTYPE_CODES``). Statistics are
float64: ``stats`` (2, C) holds the rows mean and invstd (the backend
contract's layout), var is separate; dy, y and dx have x's dtype; weight,
bias and their gradients have x's compute dtype (``compute_dtype``: float32
for the 16-bit types, as torch keeps their parameters); running buffers are
float32 or float64, the two alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build
from ._layout import geometry

_F32, _F64 = torch.float32, torch.float64
# The kernels' dtype codes (DtypeCode in cpu_kernels.cpp).
DTYPE_CODES = {_F32: 0, _F64: 1, torch.bfloat16: 2, torch.float16: 3}


class Mismatch(TypeError, ValueError):
    """A tensor the kernels cannot take as it is (device, dtype, layout or size)."""


def _kernels():
    module = _build.native()
    if module is None:
        raise RuntimeError(
            "native batch norm: the CPU kernels are unavailable (see the build warning)"
        )
    return module


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute a ``dtype`` input in: float64 for float64, else float32."""
    return _F64 if dtype is _F64 else _F32


def _input(x: Tensor) -> tuple[int, int, int]:
    if x.dtype not in DTYPE_CODES or not x.is_cpu:
        raise Mismatch(
            "native batch norm: x must be a float32/float64/bfloat16/float16 CPU tensor, "
            f"got {x.dtype} on {x.device}"
        )
    g = geometry(x) if x.dim() >= 2 and x.numel() > 0 else None
    if g is None:
        raise Mismatch(
            f"native batch norm: x (size {list(x.shape)}, strides {x.stride()}) must be "
            "non-empty, (N, C, *), and contiguous or channels_last"
        )
    # Plain ints: under torch.jit.trace sizes come back as traced values.
    return int(g[0]), int(g[1]), int(g[2])


def _vector(t: Tensor | None, name: str, dtype: torch.dtype, c: int) -> int | None:
    """The pointer of a contiguous (C,) CPU tensor of ``dtype`` (None passes through)."""
    if t is None:
        return None
    if not t.is_cpu or t.dtype is not dtype or t.numel() != c or not t.is_contiguous():
        raise Mismatch(
            f"native batch norm: {name} must be a contiguous {dtype} CPU tensor of {c} "
            f"elements, got {t.dtype} of size {list(t.shape)}, strides {t.stride()} on {t.device}"
        )
    return t.data_ptr()


def _running(rm: Tensor | None, rv: Tensor | None, c: int) -> tuple[int | None, int | None, bool]:
    if rm is None and rv is None:
        return None, None, False
    if (
        rm is None
        or rv is None
        or rm.dtype is not rv.dtype
        or not (rm.dtype is _F32 or rm.dtype is _F64)
    ):
        raise Mismatch(
            "native batch norm: running_mean and running_var must be given together, "
            "both float32 or both float64"
        )
    rm_p, rv_p = _vector(rm, "running_mean", rm.dtype, c), _vector(rv, "running_var", rv.dtype, c)
    return rm_p, rv_p, rm.dtype is _F64


def _statistics(c: int, want: bool, want_var: bool) -> tuple[Tensor | None, Tensor | None, tuple]:
    """(stats, var, their pointers (mean, var, invstd)); None where not wanted.

    The kernels keep what is not wanted in scratch memory.
    """
    stats = torch.empty(2, c, dtype=_F64) if want else None
    var = torch.empty(c, dtype=_F64) if want and want_var else None
    if stats is None:
        return None, None, (None, None, None)
    p = stats.data_ptr()
    return stats, var, (p, None if var is None else var.data_ptr(), p + 8 * c)


def forward_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.0,
    want_stats: bool = True,
    want_var: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(y, stats, var) with batch statistics, var biased; moves the running buffers when
    given. Statistics not wanted (``want_stats``, ``want_var``) come back as None."""
    outer, c, inner = _input(x)
    param = compute_dtype(x.dtype)
    w, b = _vector(weight, "weight", param, c), _vector(bias, "bias", param, c)
    rm, rv, running_is_double = _running(running_mean, running_var, c)
    y = torch.empty_like(x)
    stats, var, (mean_p, var_p, invstd_p) = _statistics(c, want_stats, want_var)
    _kernels().forward_train(
        x.data_ptr(), y.data_ptr(), w, b, mean_p, var_p, invstd_p,
        rm, rv, running_is_double, float(momentum), float(eps),
        DTYPE_CODES[x.dtype], outer, c, inner, torch.get_num_threads(),
    )  # fmt: skip
    if rm is not None:  # written through pointers: tell autograd, as an in-place op would
        torch.autograd.graph.increment_version((running_mean, running_var))
    return y, stats, var


def forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    want_stats: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """(y, stats) normalized with the running buffers, which are only read."""
    outer, c, inner = _input(x)
    param = compute_dtype(x.dtype)
    w, b = _vector(weight, "weight", param, c), _vector(bias, "bias", param, c)
    if running_mean is None or running_var is None:
        raise Mismatch("native batch norm: evaluation needs running_mean and running_var")
    rm, rv, running_is_double = _running(running_mean, running_var, c)
    y = torch.empty_like(x)
    stats, _, (mean_p, var_p, invstd_p) = _statistics(c, want_stats, False)
    _kernels().forward_eval(
        x.data_ptr(), y.data_ptr(), w, b, mean_p, var_p, invstd_p,
        rm, rv, running_is_double, float(eps),
        DTYPE_CODES[x.dtype], outer, c, inner, torch.get_num_threads(),
    )  # fmt: skip
    return y, stats


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias): dx in x's dtype, the others in its compute dtype; dy must have
    x's dtype and strides."""
    outer, c, inner = _input(x)
    if not dy.is_cpu or dy.dtype is not x.dtype or dy.shape != x.shape or dy.stride() != x.stride():
        raise Mismatch(
            f"native batch norm: dy ({dy.dtype}, size {list(dy.shape)}, strides {dy.stride()}) "
            f"must be laid out like x ({x.dtype}, size {list(x.shape)}, strides {x.stride()})"
        )
    param = compute_dtype(x.dtype)
    w = _vector(weight, "weight", param, c)
    if stats.dim() != 2:
        raise Mismatch(f"native batch norm: stats must be (2, {c}), got size {list(stats.shape)}")
    m = _vector(stats, "stats", _F64, 2 * c)
    s = m + 8 * c  # the invstd row
    dx = torch.empty_like(x)
    dweight, dbias = x.new_empty(c, dtype=param), x.new_empty(c, dtype=param)
    _kernels().backward(
        dy.data_ptr(), x.data_ptr(), dx.data_ptr(), w, m, s,
        dweight.data_ptr(), dbias.data_ptr(), bool(batch_stats),
        DTYPE_CODES[x.dtype], outer, c, inner, torch.get_num_threads(),
    )  # fmt: skip
    return dx, dweight, dbias


def plan(x: Tensor, threads: int | None = None) -> tuple[str, int]:
    """(split, team): how the training passes share out ``x`` over ``threads``
    (default: torch's), e.g. ("planes by channel", 2), or ("planes by channel in
    groups", 2) where the training forward takes planes in groups. For tests and
    benchmarks."""
    outer, c, inner = _input(x)
    threads = torch.get_num_threads() if threads is None else threads
    return _kernels().plan(outer, c, inner, DTYPE_CODES[x.dtype], threads)


def inference_plan(x: Tensor, threads: int | None = None) -> tuple[str, int]:
    """(traversal, team): how inference walks ``x`` over ``threads`` (default:
    torch's), e.g. ("planes in groups", 2). For tests and benchmarks."""
    outer, c, inner = _input(x)
    threads = torch.get_num_threads() if threads is None else threads
    return _kernels().inference_plan(outer, c, inner, DTYPE_CODES[x.dtype], threads)
