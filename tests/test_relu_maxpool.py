"""The fused ReLU + 2x2 max pooling: bit-identical to torch's two ops, and the model rewrite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.kernels import _build
from bnlab.kernels.relu_maxpool import _native_ok, relu_maxpool2d
from bnlab.models import LeNet5, ReLUMaxPool2d, fuse_relu_maxpool

needs_native = pytest.mark.skipif(_build.native() is None, reason="native CPU kernels unavailable")


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
