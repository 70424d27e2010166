"""The GPU backend: batch norm as Triton kernels (:mod:`bnlab.kernels._triton_kernels`).

Same contract as the reference backend (:mod:`bnlab.kernels.protocol`), for
float32, float64, bfloat16 and float16 CUDA tensors when triton is installed
(the ``triton`` extra); without it, CUDA tensors take the reference backend.

* ``forward_train`` — per-program statistics (Chan's merge of tile moments),
  then one small kernel merges them in float64, writes mean and invstd, and
  moves the running buffers; then normalize-and-affine.
* ``forward_eval`` — one elementwise pass, which also writes the statistics.
* ``backward`` — per-program sums of dy and dy·(x − mean), one small kernel
  that merges them and writes the weight and bias gradients, then dx.

x is read in its own layout when contiguous, channels_last or
channels_last_3d (other strides are copied to contiguous first); dy is given
x's layout. Statistics come in float32 (float64 for float64 input), as do
weight and bias gradients. Running buffers the merge cannot move in place (a
momentum per channel, strided or on another device) move by the reference
rule.

Under ``torch.compile`` the same calls run behind the custom ops of
:mod:`bnlab.kernels._gpu_ops`. ``TritonBackend(devices=("cpu",))`` runs the
kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported): that is how they are tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import struct
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _build, reference
from ._layout import geometry
from .protocol import captured

_F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# BNLAB_BACKEND=reference turns this backend off as it does the CPU's.
HAVE_TRITON = _build.ENABLED and importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    """The kernels module, imported on first use (importing triton takes a while)."""
    from . import _triton_kernels

    return _triton_kernels


@functools.cache
def _importable() -> bool:
    """Whether triton imports here; if not, says why once (CUDA tensors then take the
    reference backend)."""
    try:
        _kernels()
    except Exception as exc:  # a broken or mismatched install: any error, not only ImportError
        warnings.warn(
            f"bnlab: triton is installed but does not import ({type(exc).__name__}: {exc}); "
            "CUDA tensors run the reference backend",
            stacklevel=3,
        )
        return False
    return True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute, and return statistics, in: float64 for float64, else float32."""
    return _F64 if dtype is _F64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype is _F64 else tl.float32


# Tiles of at most this many values: one load per thread of a 4-warp program
# per 32 values, enough in flight to cover memory latency.
_TILE = 4096


@dataclass(frozen=True)
class Plan:
    """How a call's (outer, C, inner) is cut into tiles and programs."""

    bo: int
    bc: int
    bi: int
    chunk_o: int
    chunk_i: int
    grid: tuple[int, int, int]

    @property
    def splits(self) -> int:
        return self.grid[1] * self.grid[2]


def plan(outer: int, c: int, inner: int, programs: int) -> Plan:
    """Tiles along the memory (runs of a plane, or a row's channels), and about
    ``programs`` programs: channel blocks first, then splits of inner and outer."""
    if inner == 1:  # rows: neighbouring channels side by side
        bc, bi = min(64, next_pow2(c)), 1
    else:  # planes: one channel's runs
        bc, bi = 1, min(1024, next_pow2(inner))
    bo = max(1, min(next_pow2(outer), _TILE // (bc * bi)))
    blocks = -(-c // bc)
    tiles_o, tiles_i = -(-outer // bo), -(-inner // bi)
    want = max(1, programs // blocks)
    split_i = min(tiles_i, want)
    split_o = min(tiles_o, max(1, want // split_i))
    chunk_o = -(-tiles_o // split_o) * bo
    chunk_i = -(-tiles_i // split_i) * bi
    grid = (blocks, -(-outer // chunk_o), -(-inner // chunk_i))
    return Plan(bo, bc, bi, chunk_o, chunk_i, grid)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs worth launching: four per SM on a GPU; a few under the interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _dense(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    g = geometry(x)
    if g is None:
        x = x.contiguous()
        g = geometry(x)
    return x, (int(g[0]), int(g[1]), int(g[2]))


def _like(t: Tensor, x: Tensor) -> Tensor:
    """t with x's dtype and strides (a copy if needed)."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _vector(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A (C,) parameter as the kernels read it: contiguous, on x's device."""
    if t is None:
        return None
    return t.detach().to(device=x.device).contiguous()


def _momentum(momentum: float | Tensor, x: Tensor) -> float | Tensor | None:
    """momentum as the fused update reads it: a float, or a one-element tensor on x's
    device (read by the kernel: no host sync, and CUDA graphs can capture it); None
    when it is per channel."""
    if not isinstance(momentum, Tensor):
        return momentum
    if momentum.numel() != 1:
        return None
    return momentum.detach().to(device=x.device).reshape(1)


def _fusable(buffer: Tensor | None, x: Tensor) -> bool:
    return buffer is not None and buffer.device == x.device and buffer.is_contiguous()


def _eps_halves(eps: float) -> tuple[float, float]:
    """eps as two float32 values whose sum is eps to 48 bits: a kernel's float
    arguments are float32, which would round a float64 batch norm's eps."""
    hi = struct.unpack("f", struct.pack("f", eps))[0]
    return hi, eps - hi


def _launch(kernel, p: Plan, x: Tensor, *args, **meta) -> None:
    kernel[p.grid](*args, ACC=_tl_dtype(x.dtype), BO=p.bo, BC=p.bc, BI=p.bi, **meta)


def statistics(
    x: Tensor,
    eps: float,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float | Tensor = 0.0,
    want_var: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(stats, var) of dense x, var biased (None unless wanted); moves the
    running buffers when given (they must be contiguous, on x's device)."""
    k = _kernels()
    outer, c, inner = geometry(x)
    p = plan(outer, c, inner, _programs(x.device))
    acc = acc_dtype(x.dtype)
    part = torch.empty((3, p.splits, c), dtype=acc, device=x.device)
    _launch(k.stats_partial, p, x, x, part, outer, c, inner, p.chunk_o, p.chunk_i)
    stats = torch.empty((2, c), dtype=acc, device=x.device)
    var = torch.empty(c, dtype=acc, device=x.device) if want_var else None
    n = outer * inner
    bc = min(128, next_pow2(c))
    in_memory = isinstance(momentum, Tensor)
    k.stats_finish[(-(-c // bc),)](
        part, p.splits, c, *_eps_halves(float(eps)), stats, var, running_mean, running_var,
        momentum if in_memory else float(momentum), n / max(n - 1, 1),
        HAS_VAR=var is not None, HAS_RUNNING=running_mean is not None,
        MOMENTUM_IN_MEMORY=in_memory, BC=bc,
    )  # fmt: skip
    return stats, var


def normalize(
    x: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    relu: bool = False,
    running: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """y = (x − mean)·invstd·γ + β for dense x; max(y, 0) with ``relu``. With ``running``
    (running_mean, running_var, eps), mean and invstd come from those buffers and are
    written into ``stats``."""
    outer, c, inner = geometry(x)
    p = plan(outer, c, inner, _programs(x.device))
    y = torch.empty_like(x)
    w, b = _vector(weight, x), _vector(bias, x)
    rm, rv, eps = (None, None, 0.0) if running is None else running
    _launch(
        _kernels().normalize, p, x, x, y, stats, w, b, _vector(rm, x), _vector(rv, x),
        *_eps_halves(float(eps)), outer, c, inner, p.chunk_o, p.chunk_i,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, RELU=relu,
        FROM_RUNNING=running is not None,
    )  # fmt: skip
    return y


def grad_sums(
    dy: Tensor,
    x: Tensor,
    stats: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(sums, dweight, dbias): sums (2, C) float64 Σ dy and Σ dy·(x − mean), dy laid out
    as dense x; dweight = Σ dy·xhat and dbias = Σ dy in the statistics' dtype. With
    ``relu``, dy only where the forward's y (from ``weight`` and ``bias``) was positive."""
    outer, c, inner = geometry(x)
    p = plan(outer, c, inner, _programs(x.device))
    part = torch.empty((2, p.splits, c), dtype=acc_dtype(x.dtype), device=x.device)
    w, b = (_vector(weight, x), _vector(bias, x)) if relu else (None, None)
    _launch(
        _kernels().grad_sums_partial, p, x, dy, x, stats, w, b, part,
        outer, c, inner, p.chunk_o, p.chunk_i,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, RELU=relu,
    )  # fmt: skip
    sums = torch.empty((2, c), dtype=_F64, device=x.device)
    dweight, dbias = torch.empty_like(stats[0]), torch.empty_like(stats[0])
    bc = min(128, next_pow2(c))
    _kernels().grad_finish[(-(-c // bc),)](part, p.splits, c, stats, sums, dweight, dbias, BC=bc)
    return sums, dweight, dbias


def grad_input(
    dy: Tensor,
    x: Tensor,
    stats: Tensor,
    weight: Tensor | None,
    g: Tensor | None,
    g_scale: float = 1.0,
    g_of_xmu: bool = False,
    bias: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """dx = γ·invstd·(dy − g1 − xhat·g2), g1, g2 = g·g_scale (see the kernel); γ·invstd·dy
    without g. With ``relu``, dy counts only where the forward's y was positive."""
    outer, c, inner = geometry(x)
    p = plan(outer, c, inner, _programs(x.device))
    dx = torch.empty_like(x)
    w = _vector(weight, x)
    b = _vector(bias, x) if relu else None
    _launch(
        _kernels().grad_input, p, x, dy, x, dx, stats, w, b, g, float(g_scale),
        outer, c, inner, p.chunk_o, p.chunk_i,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, RELU=relu,
        HAS_G=g is not None, G_OF_XMU=g_of_xmu,
    )  # fmt: skip
    return dx


# Eager calls, shared by the backend and its custom ops.


def eager_forward_train(
    x, weight, bias, eps, running_mean, running_var, momentum, want_var=False, relu=False
):
    """(y, stats, var); moves the running buffers when given. var is None unless wanted
    or needed to move buffers the merge cannot. ``relu``: y is max(y, 0)."""
    x, (outer, _, inner) = _dense(x)
    m = _momentum(momentum, x)
    fused = m is not None and _fusable(running_mean, x) and _fusable(running_var, x)
    if fused:
        stats, var = statistics(x, eps, running_mean, running_var, m, want_var)
        # Written by the kernel: tell autograd, as an in-place op would.
        torch.autograd.graph.increment_version((running_mean, running_var))
    else:
        stats, var = statistics(x, eps, want_var=want_var or running_mean is not None)
        if running_mean is not None:
            reference.update_running_stats(
                running_mean, running_var, stats[0], var, momentum, outer * inner
            )
    return normalize(x, stats, weight, bias, relu), stats, var


def eager_forward_eval(x, weight, bias, running_mean, running_var, eps, relu=False):
    x, _ = _dense(x)
    acc = acc_dtype(x.dtype)
    stats = torch.empty((2, x.shape[1]), dtype=acc, device=x.device)
    return normalize(x, stats, weight, bias, relu, (running_mean, running_var, eps)), stats


def eager_backward(dy, x, weight, stats, batch_stats, bias=None, relu=False):
    """(dx, dweight, dbias); with ``relu``, of max(y, 0) (``bias`` is the forward's β)."""
    x, (outer, _, inner) = _dense(x)
    dy = _like(dy, x)
    stats = stats.to(acc_dtype(x.dtype)).contiguous()
    sums, dweight, dbias = grad_sums(dy, x, stats, weight, bias, relu)
    if batch_stats:
        g_scale = 1.0 / (outer * inner)
        dx = grad_input(dy, x, stats, weight, sums, g_scale, True, bias, relu)
    else:
        dx = grad_input(dy, x, stats, weight, None, bias=bias, relu=relu)
    return dx, dweight, dbias


class TritonBackend:
    """:class:`~bnlab.kernels.protocol.Backend` on Triton kernels."""

    name = "triton"

    def __init__(self, devices: tuple[str, ...] = ("cuda",)):
        self.devices = devices

    def supports(self, x: Tensor) -> bool:
        """Float32/float64/bfloat16/float16 tensors of (N, C, ...) with at least one element,
        on one of ``devices``, when triton is installed (and ``BNLAB_BACKEND`` is not
        ``reference``)."""
        if not (
            HAVE_TRITON
            and x.device.type in self.devices
            and x.dtype in DTYPES
            and x.dim() >= 2
            and x.numel() > 0
        ):
            return False
        # Under torch.compile decided without importing anything (the ops import at run time).
        return torch.compiler.is_compiling() or _importable()

    def forward_train(
        self, x, weight, bias, eps, running_mean, running_var, momentum, want_stats=True
    ):
        if captured():
            y, stats, var = torch.ops.bnlab.triton_forward_train(x, weight, bias, eps)
            if running_mean is not None:
                n = x.numel() // x.size(1)
                reference.update_running_stats(
                    running_mean, running_var, stats[0], var, momentum, n
                )
            return y, stats
        y, stats, _ = eager_forward_train(x, weight, bias, eps, running_mean, running_var, momentum)
        return y, stats

    def forward_eval(self, x, weight, bias, running_mean, running_var, eps, want_stats=True):
        if captured():
            return torch.ops.bnlab.triton_forward_eval(
                x, weight, bias, running_mean, running_var, eps
            )
        return eager_forward_eval(x, weight, bias, running_mean, running_var, eps)

    def backward(self, dy, x, weight, stats, batch_stats):
        if captured():
            return torch.ops.bnlab.triton_backward(dy, x, weight, stats, batch_stats)
        return eager_backward(dy, x, weight, stats, batch_stats)

    # Batch norm followed by ReLU in the same passes (bnlab.nn.BatchNormReLU2d and
    # kin): y = max(bn(x), 0). The backward recomputes bn(x) > 0 from x, which it
    # reads anyway, rather than saving a mask: no extra memory and no extra pass.

    fuses_relu = True

    def forward_train_relu(self, x, weight, bias, eps, running_mean, running_var, momentum):
        y, stats, _ = eager_forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, relu=True
        )
        return y, stats

    def forward_eval_relu(self, x, weight, bias, running_mean, running_var, eps):
        return eager_forward_eval(x, weight, bias, running_mean, running_var, eps, relu=True)

    def backward_relu(self, dy, x, weight, bias, stats, batch_stats):
        return eager_backward(dy, x, weight, stats, batch_stats, bias, relu=True)

    # Batch norm across processes.

    def batch_stats(self, x):
        x, (outer, _, inner) = _dense(x)
        stats, var = statistics(x, 0.0, want_var=True)
        return outer * inner, stats[0], var

    def backward_reduce(self, dy, x, stats):
        x, _ = _dense(x)
        stats = stats.to(acc_dtype(x.dtype)).contiguous()
        _, sum_dy_xhat, sum_dy = grad_sums(_like(dy, x), x, stats)
        return sum_dy, sum_dy_xhat

    def backward_elemt(self, dy, x, weight, stats, mean_dy, mean_dy_xhat):
        x, _ = _dense(x)
        acc = acc_dtype(x.dtype)
        g = torch.stack([mean_dy.to(acc), mean_dy_xhat.to(acc)])
        return grad_input(_like(dy, x), x, stats.to(acc).contiguous(), weight, g)


TRITON = TritonBackend()
