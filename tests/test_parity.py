"""bnlab.nn vs torch.nn in float64: outputs, gradients and buffers over train/eval sequences."""

from __future__ import annotations

import pytest
import torch

from .conftest import SHAPES, TORCH_HAS_BIAS_ARG, make_pair

# Unit-scale data in float64: both sides compute the same sums in a different
# order, so they agree to a few ulps; 1e-10 leaves room for the longest sums.
ATOL = 1e-10

SEQUENCES = {
    "train-eval-train-eval": ["train", "train", "eval", "train", "eval"],
    "eval-first": ["eval", "train", "eval"],
}


def _step(module, x, dy, mode):
    module.train(mode == "train")
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad


def _assert_same_state(ours, theirs):
    for (name, a), (tname, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert name == tname
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)
    for name in ("weight", "bias"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None)
        if a is not None and b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=0, msg=f"{name}.grad")


@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_module_matches_torch(rank, affine, track, momentum, sequence):
    cls_name, shape = SHAPES[rank]
    ours, theirs = make_pair(cls_name, affine=affine, track_running_stats=track, momentum=momentum)
    if affine:  # non-trivial γ, β so the affine part of every gradient is tested
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64))
                m.bias.copy_(torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64))
    for mode in SEQUENCES[sequence]:
        x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
        dy = torch.randn(shape, dtype=torch.float64)
        y_ours, dx_ours = _step(ours, x, dy, mode)
        y_theirs, dx_theirs = _step(theirs, x, dy, mode)
        torch.testing.assert_close(y_ours, y_theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(dx_ours, dx_theirs, atol=ATOL, rtol=0)
        _assert_same_state(ours, theirs)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_eps_is_honoured(eps, mode):
    ours, theirs = make_pair("BatchNorm2d", eps=eps)
    for m in (ours, theirs):  # non-default running stats, so eval has something to use
        m.running_var.fill_(0.3)
        m.running_mean.fill_(0.2)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.1
    dy = torch.randn_like(x)
    a, da = _step(ours, x, dy, mode)
    b, db = _step(theirs, x, dy, mode)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(da, db, atol=ATOL, rtol=0)
    _assert_same_state(ours, theirs)


@pytest.mark.parametrize("momentum", [-0.5, 2.0])
def test_momentum_is_not_validated(momentum):
    ours, theirs = make_pair("BatchNorm1d", momentum=momentum)
    for _ in range(2):
        x = torch.randn(6, 3, dtype=torch.float64)
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
    _assert_same_state(ours, theirs)


def test_tracking_switched_off_after_construction_keeps_buffers():
    ours, theirs = make_pair("BatchNorm2d")
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    ours(x), theirs(x)
    for m in (ours, theirs):
        m.track_running_stats = False
    before = ours.running_mean.clone()
    torch.testing.assert_close(
        ours(x), theirs(x), atol=ATOL, rtol=0
    )  # train: batch stats, no update
    assert torch.equal(ours.running_mean, before)
    for m in (ours, theirs):
        m.eval()
    torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)  # eval: the kept buffers
    _assert_same_state(ours, theirs)


def test_bias_false_matches_torch():
    if not TORCH_HAS_BIAS_ARG:
        pytest.skip("this torch's BatchNorm has no bias= argument to compare against")
    ours, theirs = make_pair("BatchNorm2d", bias=False)
    assert ours.bias is None and theirs.bias is None
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    dy = torch.randn_like(x)
    a, da = _step(ours, x, dy, "train")
    b, db = _step(theirs, x, dy, "train")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(da, db, atol=ATOL, rtol=0)
    _assert_same_state(ours, theirs)
