"""The one way into the ``_bnlab_speedups`` extension: every data pointer it gets is taken here.

Its C++ functions take raw pointers, sizes and layout flags; a wrong one reads
or writes memory that is not the tensor's. So the functions here take tensors,
derive every size and flag from them, and first check that each tensor is what
those sizes say: a CPU tensor of float32 or float64 (all of one dtype), dense
in a layout the kernel reads (NCHW or channels_last; weights and biases
contiguous), of the shape the others imply, and each output apart from every
other tensor. A wrong tensor raises ``TypeError`` (not a tensor, wrong dtype)
or ``ValueError`` (device, layout, shape, overlap) before any pointer is taken.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from bnlab.native import Extension

EXTENSION = Extension(
    "_bnlab_speedups",  # must match PyInit__bnlab_speedups in module.cpp
    [Path(__file__).with_name(name) for name in ("module.cpp", "conv2d.cpp", "relu_maxpool.cpp")],
    fallback="torch's own convolution and pooling",
)
_DTYPES = (torch.float32, torch.float64)


def module() -> ModuleType | None:
    """The compiled extension, built on first use; None if it cannot be had."""
    return EXTENSION.load()


def available() -> bool:
    return module() is not None


def _loaded() -> ModuleType:
    loaded = module()
    if loaded is None:
        raise RuntimeError("the _bnlab_speedups extension is unavailable (see the warning)")
    return loaded


# ---- checks ----------------------------------------------------------------------------------


def _check(name: str, t: object, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """``t`` is a strided CPU tensor of ``dtype`` and ``shape``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.layout != torch.strided or t.is_neg():
        raise ValueError(f"{name} must be a dense CPU tensor, got {t.device} {t.layout}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _image(name: str, t: object) -> tuple[bool, tuple[int, int, int, int]]:
    """(channels_last, shape) of a non-empty (N, C, H, W) float tensor the kernels can read."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() != 4 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (N, C, H, W) tensor, got {tuple(t.shape)}")
    _check(name, t, t.dtype, tuple(t.shape))
    return _layout_of(name, t), tuple(t.shape)


def _layout_of(name: str, t: Tensor) -> bool:
    """Whether ``t`` is read as channels_last (else NCHW); raises for any other memory layout."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"{name} must be NCHW or channels_last contiguous, got strides {t.stride()}")


def _contiguous(name: str, t: Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _same_layout(name: str, t: Tensor, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not t.is_contiguous(memory_format=fmt):
        raise ValueError(f"{name} must be {fmt} like the input, got strides {t.stride()}")


def _apart(outputs: dict[str, Tensor], inputs: dict[str, Tensor | None]) -> None:
    """No output shares memory with another tensor of the call (all are dense)."""

    def span(t: Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        return start, start + t.numel() * t.element_size()

    others = {k: v for k, v in inputs.items() if v is not None}
    names = list(outputs)
    for i, name in enumerate(names):
        a0, a1 = span(outputs[name])
        rest = {**{n: outputs[n] for n in names[i + 1 :]}, **others}
        for other, t in rest.items():
            b0, b1 = span(t)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{name} overlaps {other} in memory")


def _padding(padding: object) -> tuple[int, int]:
    if (
        not isinstance(padding, tuple)
        or len(padding) != 2
        or not all(isinstance(p, int) and p >= 0 for p in padding)
    ):
        raise ValueError(f"padding must be two non-negative ints, got {padding!r}")
    return padding  # type: ignore[return-value]


def _conv(
    x: Tensor, weight_name: str, weight: Tensor, bias_name: str, bias: Tensor | None, padding
) -> tuple[bool, tuple[int, ...], tuple[int, int, int, int]]:
    """Checks x, the weight (or its gradient) and the bias (or its gradient) of a stride-1
    conv2d(x, weight, bias, padding). Returns x's channels_last flag, the kernels' sizes
    (N, C, H, W, O, KH, KW, PH, PW) and the output's shape (N, O, Ho, Wo)."""
    ph, pw = _padding(padding)
    x_cl, (n, c, h, w) = _image("x", x)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{weight_name} must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.numel() == 0 or weight.shape[1] != c:
        raise ValueError(
            f"{weight_name} must be a non-empty (O, {c}, KH, KW) tensor, got {tuple(weight.shape)}"
        )
    _check(weight_name, weight, x.dtype, tuple(weight.shape))
    _contiguous(weight_name, weight)
    o, _, kh, kw = weight.shape
    if bias is not None:
        _check(bias_name, bias, x.dtype, (o,))
        _contiguous(bias_name, bias)
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {kh}x{kw} kernel does not fit a {h}x{w} image padded by {padding}")
    return x_cl, (n, c, h, w, o, kh, kw, ph, pw), (n, o, ho, wo)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---- calls -----------------------------------------------------------------------------------


def conv2d_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, padding: tuple[int, int]
) -> None:
    """out = conv2d(x, weight, bias, padding=padding), stride 1."""
    x_cl, sizes, out_shape = _conv(x, "weight", weight, "bias", bias, padding)
    _check("out", out, x.dtype, out_shape)
    out_cl = _layout_of("out", out)
    _apart({"out": out}, {"x": x, "weight": weight, "bias": bias})
    _loaded().conv2d_forward(
        x.data_ptr(), weight.data_ptr(), _ptr(bias), out.data_ptr(), x.dtype == torch.float64,
        *sizes, x_cl, out_cl, torch.get_num_threads(),
    )  # fmt: skip


def conv2d_grad_weight(
    x: Tensor, dy: Tensor, dweight: Tensor, dbias: Tensor | None, padding: tuple[int, int]
) -> None:
    """dweight (and dbias) of conv2d(x, weight, bias, padding=padding), given the output's dy."""
    x_cl, sizes, out_shape = _conv(x, "dweight", dweight, "dbias", dbias, padding)
    _check("dy", dy, x.dtype, out_shape)
    dy_cl = _layout_of("dy", dy)
    outputs = {"dweight": dweight} if dbias is None else {"dweight": dweight, "dbias": dbias}
    _apart(outputs, {"x": x, "dy": dy})
    _loaded().conv2d_grad_weight(
        x.data_ptr(), dy.data_ptr(), dweight.data_ptr(), _ptr(dbias), x.dtype == torch.float64,
        *sizes, x_cl, dy_cl, torch.get_num_threads(),
    )  # fmt: skip


def _pooled(x: Tensor) -> tuple[bool, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(channels_last, x's shape, the pooled shape) of an input of at least one 2x2 window."""
    cl, (n, c, h, w) = _image("x", x)
    if h < 2 or w < 2:
        raise ValueError(f"x must be at least 2x2 to pool, got {h}x{w}")
    return cl, (n, c, h, w), (n, c, h // 2, w // 2)


def relu_maxpool_forward(x: Tensor, y: Tensor) -> None:
    """y = max_pool2d(relu(x), 2); y in x's layout."""
    cl, shape, pooled = _pooled(x)
    _check("y", y, x.dtype, pooled)
    _same_layout("y", y, cl)
    _apart({"y": y}, {"x": x})
    _loaded().relu_maxpool_forward(
        x.data_ptr(), y.data_ptr(), x.dtype == torch.float64, *shape, cl, torch.get_num_threads()
    )


def relu_maxpool_backward(dy: Tensor, x: Tensor, y: Tensor, dx: Tensor) -> None:
    """dx of y = max_pool2d(relu(x), 2), given y and its gradient dy; all in x's layout."""
    cl, shape, pooled = _pooled(x)
    for name, t, want in (("dy", dy, pooled), ("y", y, pooled), ("dx", dx, shape)):
        _check(name, t, x.dtype, want)
        _same_layout(name, t, cl)
    _apart({"dx": dx}, {"dy": dy, "x": x, "y": y})
    _loaded().relu_maxpool_backward(
        dy.data_ptr(), x.data_ptr(), y.data_ptr(), dx.data_ptr(), x.dtype == torch.float64,
        *shape, cl, torch.get_num_threads(),
    )  # fmt: skip
