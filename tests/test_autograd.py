"""The hand-written backward: gradcheck, gradgradcheck, and agreement with torch's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

from bnlab import functional as F

SHAPES = [(6, 3), (4, 3, 5), (3, 3, 2, 3), (2, 3, 2, 2, 2)]


def _inputs(shape, affine=True):
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(shape, training, affine):
    x, w, b = _inputs(shape, affine)
    rm = torch.randn(shape[1], dtype=torch.float64)
    rv = torch.rand(shape[1], dtype=torch.float64) + 0.5
    # Buffers are passed in eval; in training they would be updated on every call.
    buffers = (None, None) if training else (rm, rv)

    def fn(*inputs):
        return F.batch_norm(inputs[0], *buffers, *inputs[1:], training=training, eps=1e-3)

    inputs = (x, w, b) if affine else (x,)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward_matches_torch(training):
    x, w, b = _inputs((4, 3, 3, 3))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64) * 2
    buffers = (None, None) if training else (rm, rv)
    grads = []
    for fn in (F.batch_norm, TF.batch_norm):
        y = fn(x, *buffers, w, b, training=training)
        gx, gw = torch.autograd.grad((y.square() * y).sum(), (x, w), create_graph=True)
        grads.append(
            torch.autograd.grad((gx.square().sum() + gw.sum()), (x, w, b), allow_unused=True)
        )
    for ours, theirs in zip(*grads, strict=True):
        if theirs is None:
            assert ours is None or torch.count_nonzero(ours) == 0
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)


def test_only_requested_gradients_are_returned():
    x, w, b = _inputs((5, 3))
    w.requires_grad_(False)
    F.batch_norm(x, None, None, w, b, training=True).sum().backward()
    assert w.grad is None and b.grad is not None and x.grad is not None
