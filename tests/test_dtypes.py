"""Reduced precision, mixed precision and memory formats."""

from __future__ import annotations

import pytest
import torch

import bnlab.nn

from .conftest import SHAPES


def _run(module, x, train=True):
    module.train(train)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(
        torch.ones_like(y).mul_(0.5) + torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype)
    )
    return y, x.grad, module.weight.grad


@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("train", [True, False])
def test_float32_close_to_float64_truth(rank, train):
    """float32 has no exact answer; measure both libraries against the float64 truth.

    Per-channel sums of n terms in float32 carry a relative error of about
    log2(n)·2^-24 with pairwise summation and n·2^-24 at worst; with n ≤ 512
    here, 1e-5 of the result's scale bounds both and is what torch itself meets.
    """
    cls_name, shape = SHAPES[rank]
    shape = (shape[0] * 16, *shape[1:])  # longer sums
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 2
    truth = getattr(torch.nn, cls_name)(3, dtype=torch.float64)
    ours = getattr(bnlab.nn, cls_name)(3)
    theirs = getattr(torch.nn, cls_name)(3)
    for m in (truth, ours, theirs):
        m.running_var.fill_(2.0)
    ref = _run(truth, x64, train)
    for m in (ours, theirs):
        out = _run(m, x64.float(), train)
        for name, a, r in zip(("y", "dx", "dweight"), out, ref, strict=True):
            scale = max(1.0, r.abs().max().item())
            err = (a.double() - r).abs().max().item()
            assert err <= 1e-5 * scale, (type(m).__module__, name, err, scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False])
def test_half_input_with_float32_parameters(dtype, train):
    """Statistics in float32, output in the input's dtype.

    Both libraries compute in float32 and round once to the low precision, so
    outputs may differ by one rounding step: one ulp of the output's dtype
    (2^-7 relative for bf16, 2^-10 for half), which is what rtol allows.
    """
    ours, theirs = bnlab.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = (torch.randn(8, 3, 6, 6) * 2 + 1).to(dtype)
    ya, dxa, dwa = _run(ours, x, train)
    yb, dxb, dwb = _run(theirs, x, train)
    assert ya.dtype == dtype and dxa.dtype == dtype and dwa.dtype == torch.float32
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=rtol)
    torch.testing.assert_close(dxa, dxb, rtol=rtol, atol=4 * rtol)
    torch.testing.assert_close(dwa, dwb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_cpu_autocast_bfloat16():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    ours, theirs = bnlab.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ours(conv(x)), theirs(conv(x))
    assert ya.dtype == yb.dtype
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shape, fmt",
    [((4, 3, 5, 6), torch.channels_last), ((2, 3, 3, 4, 5), torch.channels_last_3d)],
)
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_in_channels_last_out(shape, fmt, train):
    cls = bnlab.nn.BatchNorm2d if len(shape) == 4 else bnlab.nn.BatchNorm3d
    ours = cls(3, dtype=torch.float64)
    ref = getattr(torch.nn, cls.__name__)(3, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    y, dx, _ = _run(ours, x, train)
    y_ref, dx_ref, _ = _run(ref, x, train)
    assert y.is_contiguous(memory_format=fmt)
    assert dx.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(dx, dx_ref, atol=1e-10, rtol=0)
