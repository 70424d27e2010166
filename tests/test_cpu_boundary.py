"""The native CPU kernels' boundary: a wrong tensor raises, it never reaches the kernels.

Each case hands :mod:`bnlab.kernels._cpu_native` a tensor that does not fit
what the kernel would read or write (dtype, device-side type, size, layout,
or an argument swapped for another of another size) and expects a clear
Python error, with x and every output left as they were.
"""

from __future__ import annotations

import pytest
import torch

from bnlab.kernels import _build, _cpu_native

pytestmark = pytest.mark.skipif(
    _build.native() is None, reason="native CPU kernels unavailable (no C++ compiler?)"
)

F32, F64 = torch.float32, torch.float64
C = 3


def _good():
    x = torch.randn(4, C, 5, 5)
    return {
        "x": x,
        "weight": torch.rand(C) + 0.5,
        "bias": torch.randn(C),
        "running_mean": torch.zeros(C),
        "running_var": torch.ones(C),
    }


def _forward(a):
    return _cpu_native.forward_train(
        a["x"], a["weight"], a["bias"], 1e-5, a["running_mean"], a["running_var"], 0.1
    )


BAD = {
    "weight of another dtype": ("weight", lambda t: t.double(), TypeError),
    "weight too short": ("weight", lambda t: t[:2], ValueError),
    "weight too long": ("weight", lambda t: torch.cat([t, t]), ValueError),
    "strided bias": ("bias", lambda t: torch.zeros(2 * C)[::2], ValueError),
    "running_var of another dtype": ("running_var", lambda t: t.double(), TypeError),
    "running buffer too short": ("running_mean", lambda t: t[:1], ValueError),
    "integer input": ("x", lambda t: t.long(), TypeError),
    "transposed input": ("x", lambda t: t.transpose(2, 3), ValueError),
    "complex input": ("x", lambda t: t.to(torch.complex64), TypeError),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_tensor_raises_before_the_kernel(case):
    name, spoil, error = BAD[case]
    a = _good()
    a[name] = spoil(a[name])
    before = {k: v.clone() for k, v in a.items()}
    with pytest.raises(error, match=name.split("_")[0] if name != "x" else "x"):
        _forward(a)
    for k, v in a.items():  # nothing was written
        assert torch.equal(v, before[k]), k


def test_swapped_arguments_raise():
    """x where a per-channel tensor belongs (and the reverse): sizes disagree, so it raises."""
    a = _good()
    with pytest.raises(ValueError, match="weight"):
        _cpu_native.forward_train(a["weight"].view(1, C), a["x"], None, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        _cpu_native.forward_train(a["x"], a["x"], a["bias"], 1e-5)
    with pytest.raises(TypeError, match="running_mean and running_var"):
        _cpu_native.forward_train(a["x"], None, None, 1e-5, a["running_mean"], None)


def test_backward_checks_dy_and_statistics():
    a = _good()
    _, stats, _ = _cpu_native.forward_train(a["x"], a["weight"], a["bias"], 1e-5)
    dy = torch.randn_like(a["x"])
    with pytest.raises(ValueError, match="dy"):
        _cpu_native.backward(dy[:2], a["x"], a["weight"], stats, True)
    with pytest.raises(ValueError, match="dy"):
        _cpu_native.backward(dy.transpose(2, 3).contiguous().transpose(2, 3), a["x"], None,
                             stats, True)  # fmt: skip
    with pytest.raises(TypeError, match="dy"):
        _cpu_native.backward(dy.double(), a["x"], a["weight"], stats, True)
    with pytest.raises(TypeError, match="stats"):
        _cpu_native.backward(dy, a["x"], a["weight"], stats.float(), True)
    with pytest.raises(ValueError, match="stats"):
        _cpu_native.backward(dy, a["x"], a["weight"], stats[:, :2], True)
    with pytest.raises(ValueError, match="stats"):
        _cpu_native.backward(dy, a["x"], a["weight"], stats[0], True)  # one row, not two
    dx, dw, db = _cpu_native.backward(dy, a["x"], a["weight"], stats, True)
    assert dx.shape == a["x"].shape and dw.shape == db.shape == (C,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_input_takes_float32_parameters(dtype):
    """The kernels compute 16-bit input in float32: parameters in x's own dtype would be
    read as float32 (twice their length), so they raise."""
    a = _good()
    x = a["x"].to(dtype)
    y, _, _ = _cpu_native.forward_train(x, a["weight"], a["bias"], 1e-5)
    assert y.dtype == dtype
    with pytest.raises(TypeError, match=r"weight must be a contiguous torch\.float32"):
        _cpu_native.forward_train(x, a["weight"].to(dtype), None, 1e-5)
    with pytest.raises(TypeError, match=r"bias must be a contiguous torch\.float32"):
        _cpu_native.forward_eval(x, None, a["bias"].to(dtype), a["running_mean"],
                                 a["running_var"], 1e-5)  # fmt: skip


def test_unknown_dtype_code_is_refused_by_the_kernels():
    """The last line of defence: the module itself refuses a dtype code it does not know."""
    with pytest.raises(ValueError, match="unknown dtype code"):
        _cpu_native._kernels().plan(4, 3, 5, 9, 1)


def test_eval_needs_both_buffers():
    a = _good()
    with pytest.raises(TypeError, match="running_mean and running_var"):
        _cpu_native.forward_eval(a["x"], None, None, a["running_mean"], None, 1e-5)
