"""The same code path on CUDA tensors: parity with torch.nn on the GPU.

These run where a CUDA device is present and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

import bnlab.nn

from .conftest import vmap_ensembles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = {"BatchNorm1d": (16, 5), "BatchNorm2d": (8, 5, 7, 6), "BatchNorm3d": (4, 5, 3, 4, 5)}


def _pair(cls_name, dtype, **kwargs):
    ours = getattr(bnlab.nn, cls_name)(5, device="cuda", dtype=dtype, **kwargs)
    theirs = getattr(torch.nn, cls_name)(5, device="cuda", dtype=dtype, **kwargs)
    return ours, theirs


def _step(m, x, dy, train):
    m.train(train)
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("cls_name", list(SHAPES))
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_on_cuda(cls_name, dtype, atol, momentum):
    ours, theirs = _pair(cls_name, dtype, momentum=momentum)
    for train in (True, True, False, True, False):
        x = torch.randn(SHAPES[cls_name], device="cuda", dtype=dtype) * 2 + 1
        dy = torch.randn_like(x)
        for a, b in zip(_step(ours, x, dy, train), _step(theirs, x, dy, train), strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=k)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=atol * 10, rtol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_float32_parameters_on_cuda(dtype):
    ours, theirs = _pair("BatchNorm2d", torch.float32)
    x = (torch.randn(8, 5, 6, 6, device="cuda") * 2 + 1).to(dtype)
    dy = torch.randn_like(x)
    ya, dxa = _step(ours, x, dy, True)
    yb, dxb = _step(theirs, x, dy, True)
    assert ya.dtype == dtype
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10  # one rounding step of the output dtype
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    torch.testing.assert_close(dxa, dxb, atol=4 * tol, rtol=tol)


def test_channels_last_on_cuda():
    ours, theirs = _pair("BatchNorm2d", torch.float32)
    x = torch.randn(8, 5, 6, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    ya, dxa = _step(ours, x, dy, True)
    yb, dxb = _step(theirs, x, dy, True)
    assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dxa, dxb, atol=1e-5, rtol=1e-5)


def test_compiled_fullgraph_cumulative_average_on_cuda():
    ours, theirs = _pair("BatchNorm2d", torch.float32, momentum=None)
    step = torch.compile(ours, fullgraph=True)
    for _ in range(3):
        x = torch.randn(8, 5, 6, 6, device="cuda")
        torch.testing.assert_close(step(x), theirs(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_cuda_graph_capture_matches_torch(momentum):
    """A captured training step (forward and backward) replays with torch's numbers.

    torch's own module cannot be captured with momentum=None (it reads the counter on
    the host), so the reference is torch's module run eagerly on the same inputs.
    """
    ours, theirs = _pair("BatchNorm2d", torch.float32, momentum=momentum)
    shape = (8, 5, 7, 6)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    dy = torch.randn(shape, device="cuda")

    def step(m, inp):
        y = m(inp)
        y.backward(dy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
        for _ in range(3):
            step(ours, x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        step(theirs, x.detach().clone().requires_grad_())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step(ours, x)
    for _ in range(3):
        new = torch.randn(shape, device="cuda") * 2 + 1
        with torch.no_grad():
            x.copy_(new)
            x.grad.zero_()
        graph.replay()
        xr = new.clone().requires_grad_()
        yr = step(theirs, xr)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)


def test_vmap_ensemble_on_cuda():
    """torch.func model ensembling runs on the GPU with torch's numbers."""
    models = [_pair("BatchNorm2d", torch.float32) for _ in range(3)]
    x = torch.randn(8, 5, 6, 6, device="cuda") * 2 + 1
    (ya, ba), (yb, bb) = vmap_ensembles(models, x)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], atol=1e-5, rtol=1e-5, msg=k)
