"""CPU backend: fused native kernels for float32 and float64 tensors.

Same contract as :mod:`bnlab.kernels.reference`, computed by the kernels in
``cpu_kernels.cpp`` (built on first use, see :mod:`bnlab.kernels._build`),
one native call per function:

* ``forward_train`` / ``forward_train_update`` — statistics (shifted sums,
  float64 carry) and normalize-and-affine, per channel while its data is in
  cache where that balances the threads; the running buffers move in the
  same call.
* ``forward_eval`` / ``normalize`` — one elementwise pass.
* ``backward`` — the two channel sums, then dx.

Layouts read directly: contiguous (N, C, *), channels_last,
channels_last_3d; other strides are made contiguous first. The statistics
come back in float64 (wider than the reference's float32 for float32 input,
so backward keeps full precision when |mean| >> std); dweight and dbias in
the input's dtype.

Eager calls pass data pointers straight to the kernels (the dispatcher of a
custom op costs more than a small batch norm). Under ``torch.compile`` the
same kernels run behind the custom ops of :mod:`bnlab.kernels._ops`, which
the compiler can trace.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _build, update_running_stats

_F32, _F64 = torch.float32, torch.float64
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def supports(x: Tensor) -> bool:
    """Float32/float64 CPU tensors with at least one element, when the kernels can be built.

    Under ``torch.compile`` this is decided without building anything (the
    custom ops fall back to the reference formulas at run time if they must).
    """
    if not (x.is_cpu and (x.dtype == _F32 or x.dtype == _F64) and x.numel() > 0):
        return False
    if torch.compiler.is_compiling():
        return _build.ENABLED
    return _build.native() is not None


# ---- layouts and arguments ----------------------------------------------------------


def _geometry(x: Tensor) -> tuple[int, int, int] | None:
    """(outer, C, inner) such that x's memory is that array, contiguous; None otherwise."""
    c = x.shape[1]
    if x.is_contiguous():
        outer = x.shape[0]
        return outer, c, x.numel() // (outer * c)
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return x.numel() // c, c, 1
    return None


def _dense(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x in a layout the kernels read, with its geometry (a contiguous copy if needed)."""
    geometry = _geometry(x)
    if geometry is None:
        x = x.contiguous()
        geometry = _geometry(x)
    return x, geometry


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with x's dtype and strides (x dense): a copy unless they already agree."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _per_channel(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A per-channel tensor as the kernels read it: contiguous, of ``dtype``.

    The caller keeps the result referenced until the kernel has run: a
    converted copy must outlive the pointer handed to the kernel.
    """
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.detach().to(dtype).contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _native_buffers(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether the kernels can read/write a pair of per-channel buffers directly."""
    return (
        a is not None
        and a.is_cpu
        and (a.dtype == _F32 or a.dtype == _F64)
        and b.dtype == a.dtype
        and b.is_cpu
        and a.is_contiguous()
        and b.is_contiguous()
    )


# ---- native calls (eager; also the real implementations of the custom ops) ----------
#
# x is dense with the given geometry; the running buffers, when given, pass
# _native_buffers; mean, var and invstd are float64.


def _native_forward_train(
    x: Tensor,
    geometry: tuple[int, int, int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, invstd), var biased; moves the running buffers when given."""
    outer, c, inner = geometry
    weight, bias = _per_channel(weight, x.dtype), _per_channel(bias, x.dtype)
    y = torch.empty_like(x)
    mean, var, invstd = (
        torch.empty(c, dtype=_F64, device="cpu"),
        torch.empty(c, dtype=_F64, device="cpu"),
        torch.empty(c, dtype=_F64, device="cpu"),
    )
    _build.native().forward_train(
        x.data_ptr(),
        y.data_ptr(),
        _ptr(weight),
        _ptr(bias),
        mean.data_ptr(),
        var.data_ptr(),
        invstd.data_ptr(),
        _ptr(running_mean),
        _ptr(running_var),
        running_mean is not None and running_mean.dtype == _F64,
        momentum,
        eps,
        x.dtype == _F64,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return y, mean, var, invstd


def _native_forward_eval(
    x: Tensor,
    geometry: tuple[int, int, int],
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    need_stats: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(y, mean, var, invstd) normalized with the running buffers; no statistics unless needed."""
    outer, c, inner = geometry
    weight, bias = _per_channel(weight, x.dtype), _per_channel(bias, x.dtype)
    y = torch.empty_like(x)
    mean = var = invstd = None
    if need_stats:
        mean, var, invstd = (
            torch.empty(c, dtype=_F64, device="cpu"),
            torch.empty(c, dtype=_F64, device="cpu"),
            torch.empty(c, dtype=_F64, device="cpu"),
        )
    _build.native().forward_eval(
        x.data_ptr(),
        y.data_ptr(),
        _ptr(weight),
        _ptr(bias),
        _ptr(mean),
        _ptr(var),
        _ptr(invstd),
        running_mean.data_ptr(),
        running_var.data_ptr(),
        running_mean.dtype == _F64,
        eps,
        x.dtype == _F64,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return y, mean, var, invstd


def _native_normalize(
    x: Tensor,
    geometry: tuple[int, int, int],
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    outer, c, inner = geometry
    weight, bias = _per_channel(weight, x.dtype), _per_channel(bias, x.dtype)
    mean, invstd = _per_channel(mean, _F64), _per_channel(invstd, _F64)
    y = torch.empty_like(x)
    _build.native().normalize(
        x.data_ptr(),
        y.data_ptr(),
        _ptr(weight),
        _ptr(bias),
        mean.data_ptr(),
        invstd.data_ptr(),
        x.dtype == _F64,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return y


def _native_backward(
    dy: Tensor,
    x: Tensor,
    geometry: tuple[int, int, int],
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    batch_stats_used: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dy laid out like x."""
    outer, c, inner = geometry
    weight = _per_channel(weight, x.dtype)
    mean, invstd = _per_channel(mean, _F64), _per_channel(invstd, _F64)
    dx = torch.empty_like(x)
    dweight, dbias = x.new_empty(c), x.new_empty(c)
    _build.native().backward(
        dy.data_ptr(),
        x.data_ptr(),
        dx.data_ptr(),
        _ptr(weight),
        mean.data_ptr(),
        invstd.data_ptr(),
        dweight.data_ptr(),
        dbias.data_ptr(),
        batch_stats_used,
        x.dtype == _F64,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return dx, dweight, dbias


# ---- the backend contract -----------------------------------------------------------


def forward_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with batch statistics. Returns (y, mean, var, invstd); var biased, float64."""
    return forward_train_update(x, weight, bias, eps, None, None, 0.0)


def forward_train_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``forward_train``, also moving the running buffers (when given) in the same call.

    The rule is :func:`bnlab.kernels.update_running_stats`'s; buffers the
    kernel cannot write (another dtype or device, strided) go through it.
    """
    x, geometry = _dense(x)
    if torch.compiler.is_compiling():
        y, mean, var, invstd = torch.ops.bnlab.cpu_forward_train(x, weight, bias, eps)
    elif _native_buffers(running_mean, running_var):
        return _native_forward_train(
            x, geometry, weight, bias, eps, running_mean, running_var, float(momentum)
        )
    else:
        y, mean, var, invstd = _native_forward_train(x, geometry, weight, bias, eps)
    if running_mean is not None:
        n = x.numel() // geometry[1]
        update_running_stats(running_mean, running_var, mean, var, momentum, n)
    return y, mean, var, invstd


def forward_eval(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    need_stats: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Normalize with the running statistics. Returns (y, mean, var, invstd), float64.

    With ``need_stats=False`` (nothing will be differentiated) the statistics
    may come back as None, which saves allocating them.
    """
    x, geometry = _dense(x)
    if torch.compiler.is_compiling() or not _native_buffers(running_mean, running_var):
        mean, var = running_mean.to(_F64), running_var.to(_F64)
        invstd = torch.rsqrt(var + eps)
        return normalize(x, mean, invstd, weight, bias), mean, var, invstd
    return _native_forward_eval(
        x, geometry, weight, bias, running_mean, running_var, eps, need_stats
    )


def normalize(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """y = (x − mean)·invstd·γ + β in one pass."""
    x, geometry = _dense(x)
    if torch.compiler.is_compiling():
        return torch.ops.bnlab.cpu_normalize(x, mean.to(_F64), invstd.to(_F64), weight, bias)
    return _native_normalize(x, geometry, mean, invstd, weight, bias)


def backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    batch_stats_used: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients as ``reference.backward``: (dx, dweight, dbias), the latter in x's dtype."""
    x, geometry = _dense(x)
    dy = _like(dy, x)
    if torch.compiler.is_compiling():
        return torch.ops.bnlab.cpu_backward(
            dy, x, mean.to(_F64), invstd.to(_F64), weight, batch_stats_used
        )
    return _native_backward(dy, x, geometry, mean, invstd, weight, batch_stats_used)


# ---- eager fast path ----------------------------------------------------------------
#
# For the common case (see bnlab.autograd.batch_norm_eager): x dense with the
# given geometry, weight/bias/running buffers contiguous CPU tensors the
# kernels read directly. The statistics live in one flat float64 buffer
# ``stats`` = [mean | var | invstd] (3·C), addressed by pointer offsets: one
# allocation and no views on the hot path. (``t.new_empty(n)`` is cheaper than
# ``torch.empty(n, dtype=...)``: no keyword arguments to parse.)

_F64_CPU = torch.empty(0, dtype=_F64, device="cpu")


def eager_forward(
    x: Tensor,
    geometry: tuple[int, int, int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    batch_stats: bool,
    need_stats: bool,
) -> tuple[Tensor, Tensor | None]:
    """(y, stats): batch statistics (moving the running buffers when given) or running ones.

    ``stats`` is None when not ``need_stats`` and the running statistics normalize.
    """
    outer, c, inner = geometry
    y = torch.empty_like(x)
    is_double = x.dtype == _F64
    if batch_stats:
        stats = _F64_CPU.new_empty(3 * c)
        p = stats.data_ptr()
        _build.native().forward_train(
            x.data_ptr(),
            y.data_ptr(),
            None if weight is None else weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            p,
            p + 8 * c,
            p + 16 * c,
            None if running_mean is None else running_mean.data_ptr(),
            None if running_var is None else running_var.data_ptr(),
            running_mean is not None and running_mean.dtype == _F64,
            momentum,
            eps,
            is_double,
            outer,
            c,
            inner,
            torch.get_num_threads(),
        )
        return y, stats
    stats = None
    if need_stats:
        stats = _F64_CPU.new_empty(3 * c)
        p = stats.data_ptr()
    _build.native().forward_eval(
        x.data_ptr(),
        y.data_ptr(),
        None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        None if stats is None else p,
        None if stats is None else p + 8 * c,
        None if stats is None else p + 16 * c,
        running_mean.data_ptr(),
        running_var.data_ptr(),
        running_mean.dtype == _F64,
        eps,
        is_double,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return y, stats


def eager_backward(
    dy: Tensor,
    x: Tensor,
    geometry: tuple[int, int, int],
    stats: Tensor,
    weight: Tensor | None,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) from the ``stats`` buffer of :func:`eager_forward`."""
    outer, c, inner = geometry
    if dy.dtype != x.dtype or dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)
    dx = torch.empty_like(x)
    dweight, dbias = x.new_empty(c), x.new_empty(c)
    p = stats.data_ptr()
    _build.native().backward(
        dy.data_ptr(),
        x.data_ptr(),
        dx.data_ptr(),
        None if weight is None else weight.data_ptr(),
        p,
        p + 16 * c,
        dweight.data_ptr(),
        dbias.data_ptr(),
        batch_stats,
        x.dtype == _F64,
        outer,
        c,
        inner,
        torch.get_num_threads(),
    )
    return dx, dweight, dbias
