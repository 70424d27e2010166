"""The fused ReLU + 2x2 max pooling: bit-identical to torch's two ops, and the model rewrite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models import LeNet5, ReLUMaxPool2d, fuse_relu_maxpool
from bnlab.speedups import _ext
from bnlab.speedups.relu_maxpool import _native_ok, relu_maxpool2d

needs_native = pytest.mark.skipif(not _ext.available(), reason="native CPU kernels unavailable")


def _both(x, dy):
    results = []
    for fn in (relu_maxpool2d, lambda t: F.max_pool2d(F.relu(t), 2)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        results.append((y, xi.grad))
    return results


@needs_native
@pytest.mark.parametrize(
    "shape",
    [
        (4, 3, 6, 6),
        (2, 5, 7, 9),
        (3, 6, 28, 28),  # LeNet-5's two pools
        (2, 16, 10, 10),
        (1, 2, 4, 1030),  # rows longer than the kernel's stack chunk: pooled in pieces
        (2, 3, 7, 10),  # NCHW even width, odd height: the last row is in no window
        (1, 2, 50, 100),  # NCHW rows grouped 10 at a time, a shorter last group
        (1, 1, 2, 1024),  # NCHW rows as wide as the stack chunk: one per group
        (1, 600, 4, 6),  # channels_last windows wider than that chunk: one by one
        *(
            (2, c, 6, 9) for c in range(1, 10)
        ),  # channels_last lanes fixed at compile time (2-8) or not
    ],
    ids=str,
)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_to_relu_then_maxpool(shape, fmt, dtype):
    x = torch.randn(shape, dtype=dtype)
    x[0, 0, :2, :2] = 1.5  # a tie: the first position wins, as in torch
    x[0, -1, :2, :2] = -1.0  # a window with nothing above zero: no gradient
    x[-1, 0, 2:4, 2:4] = 0.0
    x = x.contiguous(memory_format=fmt)
    assert _native_ok(x)
    dy = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    (y, dx), (y_ref, dx_ref) = _both(x, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@needs_native
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_nan_propagates_like_torch(fmt):
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 1, 0] = float("nan")  # one NaN in a window
    x[1, 2, 2:4, 2:4] = torch.tensor([[float("nan"), 5.0], [float("nan"), -1.0]])  # two: the last
    x[1, 0, 0:2, 0:2] = torch.tensor([[float("nan"), -3.0], [-2.0, -1.0]])  # NaN among negatives
    x = x.contiguous(memory_format=fmt)
    dy = torch.arange(1.0, 25.0).view(2, 3, 2, 2)  # distinct: a gradient sent astray shows
    (y, dx), (y_ref, dx_ref) = _both(x, dy)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(2, 3, 6, 6, dtype=torch.float16),  # dtype the kernels do not take
        torch.randn(2, 3, 6, 8)[..., ::2],  # strides they do not take
    ],
    ids=["half", "strided"],
)
def test_other_inputs_take_the_torch_ops(x):
    assert not _native_ok(x)
    dy = torch.ones(2, 3, 3, x.shape[3] // 2, dtype=x.dtype)
    (y, dx), (y_ref, dx_ref) = _both(x, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_fuse_rewrites_only_plain_relu_pool_pairs():
    model = LeNet5("bn")
    keys = list(model.state_dict())
    fuse_relu_maxpool(model)
    assert list(model.state_dict()) == keys
    for stage in (model.conv1, model.conv2):
        assert isinstance(stage[2], nn.Identity) and isinstance(stage[3], ReLUMaxPool2d)
    assert isinstance(model.fc1[2], nn.ReLU)  # no pool after it
    odd = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(), nn.MaxPool2d(3))
    fuse_relu_maxpool(odd)
    assert [type(m) for m in odd] == [nn.ReLU, nn.MaxPool2d, nn.ReLU, nn.MaxPool2d]


@needs_native
@pytest.mark.usefixtures("one_thread")
def test_fused_model_trains_bit_identically():
    torch.manual_seed(0)
    plain = LeNet5("bn").to(memory_format=torch.channels_last)
    fused = fuse_relu_maxpool(copy.deepcopy(plain))
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (plain, fused)]
    for _ in range(3):
        x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,))
        for model, opt in zip((plain, fused), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (k, a), (_, b) in zip(plain.state_dict().items(), fused.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ---- the checked native boundary ---------------------------------------------------------------


def _backward_call() -> dict:
    """A valid ``_ext.relu_maxpool_backward`` call on a (2, 3, 6, 8) NCHW input."""
    return {
        "dy": torch.randn(2, 3, 3, 4),
        "x": torch.randn(2, 3, 6, 8),
        "y": torch.randn(2, 3, 3, 4),
        "dx": torch.full((2, 3, 6, 8), 7.0),
    }


def _rejects(call, args: dict, error: type[Exception]) -> None:
    """``call(**args)`` raises ``error`` and leaves every CPU tensor of the call as it was."""
    before = {
        k: v.clone()
        for k, v in args.items()
        if isinstance(v, torch.Tensor) and v.device.type == "cpu"
    }
    with pytest.raises(error):
        call(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written"


FORWARD_MISTAKES = {
    "y-float64": ({"y": torch.zeros(2, 3, 3, 4, dtype=torch.float64)}, TypeError),
    "x-float16": ({"x": torch.randn(2, 3, 6, 8).half()}, TypeError),
    "x-int64": ({"x": torch.ones(2, 3, 6, 8, dtype=torch.int64)}, TypeError),
    "y-not-a-tensor": ({"y": [0.0] * 72}, TypeError),
    "y-ceil-size": ({"y": torch.zeros(2, 3, 4, 4)}, ValueError),
    "y-too-few-channels": ({"y": torch.zeros(2, 2, 3, 4)}, ValueError),
    "y-channels-last-x-not": (
        {"y": torch.zeros(2, 3, 3, 4).contiguous(memory_format=torch.channels_last)},
        ValueError,
    ),
    "x-strided": ({"x": torch.randn(2, 3, 6, 16)[..., ::2]}, ValueError),
    "x-one-row": ({"x": torch.randn(2, 3, 1, 8), "y": torch.zeros(2, 3, 0, 4)}, ValueError),
    "x-3d": ({"x": torch.randn(3, 6, 8), "y": torch.zeros(3, 3, 4)}, ValueError),
    "x-on-meta": ({"x": torch.randn(2, 3, 6, 8, device="meta")}, ValueError),
    "x-and-y-swapped": ({"x": torch.zeros(2, 3, 3, 4), "y": torch.randn(2, 3, 6, 8)}, ValueError),
}


@needs_native
@pytest.mark.parametrize("case", FORWARD_MISTAKES)
def test_boundary_rejects_a_wrong_forward_call(case):
    """A mistake raises before any pointer reaches the kernel: nothing is written."""
    change, error = FORWARD_MISTAKES[case]
    args = {"x": torch.randn(2, 3, 6, 8), "y": torch.full((2, 3, 3, 4), 7.0)}
    args.update(change)
    _rejects(_ext.relu_maxpool_forward, args, error)


BACKWARD_MISTAKES = {
    "dy-float64": (lambda a: {"dy": a["dy"].double()}, TypeError),
    "dx-float64": (lambda a: {"dx": a["dx"].double()}, TypeError),
    "y-wrong-size": (lambda a: {"y": torch.randn(2, 3, 3, 3)}, ValueError),
    "dx-pooled-size": (lambda a: {"dx": torch.zeros(2, 3, 3, 4)}, ValueError),
    "dy-transposed": (lambda a: {"dy": torch.randn(2, 3, 4, 3).transpose(2, 3)}, ValueError),
    "dx-channels-last-x-not": (
        lambda a: {"dx": a["dx"].contiguous(memory_format=torch.channels_last)},
        ValueError,
    ),
    "dy-and-dx-swapped": (lambda a: {"dy": a["dx"], "dx": a["dy"]}, ValueError),
    "x-and-y-swapped": (lambda a: {"x": a["y"], "y": a["x"]}, ValueError),
    "dx-is-x": (lambda a: {"dx": a["x"]}, ValueError),
    "y-inside-dx": (lambda a: {"y": a["dx"].view(-1)[:72].view(2, 3, 3, 4)}, ValueError),
}


@needs_native
@pytest.mark.parametrize("case", BACKWARD_MISTAKES)
def test_boundary_rejects_a_wrong_backward_call(case):
    change, error = BACKWARD_MISTAKES[case]
    args = _backward_call()
    args.update(change(args))
    _rejects(_ext.relu_maxpool_backward, args, error)


@needs_native
def test_boundary_accepts_a_valid_call():
    args = _backward_call()
    x = args["x"].clone().requires_grad_()
    y = F.max_pool2d(F.relu(x), 2)
    args["y"] = y.detach()
    _ext.relu_maxpool_backward(**args)
    (want,) = torch.autograd.grad(y, x, args["dy"])
    assert torch.equal(args["dx"], want)
