"""The small-call rule: which calls run on torch's kernel, and that nothing else does.

Which kernel ran is read off the output: torch's kernel leaves its own
autograd node (``NativeBatchNormBackward0``), bnlab's function its
``BatchNormFunctionBackward``; calls without a graph are counted at bnlab's
CPU backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bnlab.nn
from bnlab import small_calls
from bnlab.errors import ChannelMismatchError
from bnlab.kernels import cpu

from .conftest import count_calls

MAX = small_calls.MAX_BYTES // 4  # float32 values


def _kernel_of(y: torch.Tensor) -> str:
    name = type(y.grad_fn).__name__
    if "NativeBatchNorm" in name:
        return "torch"
    assert "BatchNormFunction" in name, name
    return "bnlab"


def _rows(elements: int, channels: int = 16) -> torch.Tensor:
    return torch.randn(elements // channels, channels)


@pytest.mark.parametrize(
    "elements, kernel", [(64, "torch"), (MAX, "torch"), (MAX + 16, "bnlab")], ids=str
)
@pytest.mark.parametrize("train", [True, False])
def test_graph_recording_calls_switch_at_the_crossover(elements, kernel, train):
    m = bnlab.nn.BatchNorm1d(16).train(train)
    y = m(_rows(elements).requires_grad_())
    assert _kernel_of(y) == kernel


@pytest.mark.parametrize("train", [True, False])
def test_small_calls_give_torch_nn_numbers_exactly(train):
    """Below the crossover the numbers are torch's own, buffers and gradients included."""
    ours, theirs = bnlab.nn.BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(8, 6, 4, 4) * 3 + 2
    for m in (ours, theirs):
        m.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    for a, b in [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, theirs.weight.grad)]:
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_training_without_a_graph_stays_on_bnlab_kernels(monkeypatch):
    """A training forward under no_grad takes batch statistics: bnlab's kernels, at every size."""
    calls = count_calls(monkeypatch, cpu, "eager_forward_train")
    with torch.no_grad():
        bnlab.nn.BatchNorm1d(16)(_rows(64))
    assert len(calls) == 1


@pytest.mark.parametrize("elements, kernel", [(MAX, "torch"), (MAX + 16, "bnlab")], ids=str)
def test_inference_switches_at_the_crossover(elements, kernel, monkeypatch):
    """Inference (running statistics, one elementwise pass) is exact on either kernel."""
    calls = count_calls(monkeypatch, cpu, "eager_forward_eval")
    m = bnlab.nn.BatchNorm1d(16).eval()
    x = _rows(elements)
    with torch.no_grad():
        y = m(x)
    assert len(calls) == (kernel == "bnlab")
    expected = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_forward_ad_keeps_bnlab_path():
    m = bnlab.nn.BatchNorm1d(16)
    x = _rows(64)
    with fwAD.dual_level():
        y = m(fwAD.make_dual(x, torch.ones_like(x)))
        tangent = fwAD.unpack_dual(y).tangent
    # Batch norm removes a constant shift: the tangent of x + t·1 is zero.
    torch.testing.assert_close(tangent, torch.zeros_like(x), atol=1e-5, rtol=0)


def test_checks_come_first():
    """A small call still gets bnlab's clear error, not torch's."""
    m = bnlab.nn.BatchNorm1d(16)
    with pytest.raises(ChannelMismatchError, match="expected input with 16 channels"):
        m(torch.randn(4, 8, requires_grad=True))


def _call_args(x_dtype=torch.float32, param=None, buffer=None, momentum=0.1, elements=64):
    x = _rows(elements).to(x_dtype)
    param, buffer = param or x_dtype, buffer or x_dtype
    return (
        x,
        torch.ones(16, dtype=param),
        torch.zeros(16, dtype=param),
        torch.zeros(16, dtype=buffer),
        torch.ones(16, dtype=buffer),
        momentum,
    )


@pytest.mark.parametrize(
    "case, kwargs, expected",
    [
        ("float32", {}, True),
        ("float64", {"x_dtype": torch.float64}, True),
        (
            "bf16 input, float32 parameters and buffers",
            {"x_dtype": torch.bfloat16, "param": torch.float32, "buffer": torch.float32},
            True,
        ),
        (
            "bf16 parameters, float32 buffers",
            {"x_dtype": torch.bfloat16, "buffer": torch.float32},
            True,
        ),
        # bnlab rounds a 16-bit buffer's update once; torch's kernel would round it more.
        ("bf16 buffers", {"x_dtype": torch.bfloat16}, False),
        ("float64 parameters for float32 input", {"param": torch.float64}, False),
        ("momentum as a tensor (momentum=None)", {"momentum": torch.tensor(0.5)}, False),
        ("above the crossover", {"elements": MAX + 16}, False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_rule(case, kwargs, expected):
    assert small_calls.use_torch_kernel(*_call_args(**kwargs)) is expected, case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_the_crossover_is_in_bytes(dtype):
    """16-bit inputs switch at twice float32's values, float64 at half (MAX_BYTES)."""
    values = small_calls.MAX_BYTES // dtype.itemsize
    m = bnlab.nn.BatchNorm1d(16, dtype=torch.float64 if dtype == torch.float64 else None)
    for elements, kernel in ((values, "torch"), (values + 16, "bnlab")):
        y = m(_rows(elements).to(dtype).requires_grad_())
        assert _kernel_of(y) == kernel, (dtype, elements)


def test_switch_off(monkeypatch):
    """BNLAB_SMALL_CALLS=bnlab (read at import as ENABLED) keeps every call on bnlab."""
    monkeypatch.setattr(small_calls, "ENABLED", False)
    assert not small_calls.use_torch_kernel(*_call_args())
    y = bnlab.nn.BatchNorm1d(16)(_rows(64).requires_grad_())
    assert _kernel_of(y) == "bnlab"
