"""bnlab.functional.batch_norm vs torch.nn.functional.batch_norm: results, buffer updates, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F

# torch 2.13 checks eps at forward time; older versions have other rules.
TORCH_213 = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def _args(c=3, affine=True, buffers=True):
    t = lambda *a: torch.randn(*a, dtype=torch.float64)  # noqa: E731
    return dict(
        running_mean=t(c) if buffers else None,
        running_var=t(c).abs() + 0.5 if buffers else None,
        weight=t(c) if affine else None,
        bias=t(c) if affine else None,
    )


def _clone(args):
    return {k: (None if v is None else v.clone()) for k, v in args.items()}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 2)])
def test_matches_torch_and_updates_buffers_in_place(training, affine, momentum, shape):
    x = torch.randn(shape, dtype=torch.float64) * 3 - 1
    ours, theirs = _args(affine=affine), None
    theirs = _clone(ours)
    rm, rv = ours["running_mean"], ours["running_var"]
    y = F.batch_norm(x, **ours, training=training, momentum=momentum, eps=1e-4)
    ref = TF.batch_norm(x, **theirs, training=training, momentum=momentum, eps=1e-4)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    assert ours["running_mean"] is rm and ours["running_var"] is rv  # in place
    torch.testing.assert_close(rm, theirs["running_mean"], atol=1e-12, rtol=0)
    torch.testing.assert_close(rv, theirs["running_var"], atol=1e-12, rtol=0)


def test_training_without_buffers():
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    args = _args(buffers=False)
    torch.testing.assert_close(
        F.batch_norm(x, **args, training=True),
        TF.batch_norm(x, **args, training=True),
        atol=1e-10,
        rtol=0,
    )


def test_tensor_momentum_equals_float_momentum():
    x = torch.randn(6, 3, dtype=torch.float64)
    a, b = _args(), None
    b = _clone(a)
    F.batch_norm(x, **a, training=True, momentum=0.25)
    F.batch_norm(x, **b, training=True, momentum=torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(a["running_var"], b["running_var"], atol=0, rtol=0)


def _torch_error(fn):
    try:
        fn()
    except Exception as e:  # whatever torch raises is the expectation
        return e
    return None


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_matches_torch(shape):
    x = torch.randn(shape)
    args = {k: v.float() for k, v in _args().items()}
    with pytest.raises(ValueError) as expected:
        TF.batch_norm(x, **_clone(args), training=True)
    with pytest.raises(ValueError) as got:
        F.batch_norm(x, **args, training=True)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    "training, eps, message",
    [
        (True, 0.0, "batch_norm eps must be positive during training, but got 0.0"),
        (True, -1.0, "batch_norm eps must be positive during training, but got -1.0"),
        (False, -1e-3, "batch_norm eps must be non-negative, but got -0.001"),
    ],
)
def test_eps_is_checked_at_forward_time(training, eps, message):
    """torch 2.13's rule and message, whatever torch is installed (older ones differ)."""
    x = torch.randn(4, 3)
    args = {k: v.float() for k, v in _args().items()}
    with pytest.raises(ValueError) as got:
        F.batch_norm(x, **args, training=training, eps=eps)
    assert str(got.value) == message
    if TORCH_213:
        with pytest.raises(ValueError, match=message):
            TF.batch_norm(x, **_clone(args), training=training, eps=eps)


def test_zero_eps_is_allowed_with_running_stats():
    x = torch.randn(4, 3, dtype=torch.float64)
    args = _args()
    rm, rv, w, b = (args[k] for k in ("running_mean", "running_var", "weight", "bias"))
    expected = (x - rm) / rv.sqrt() * w + b
    torch.testing.assert_close(F.batch_norm(x, **args, eps=0.0), expected, atol=1e-12, rtol=0)
    if TORCH_213:
        torch.testing.assert_close(
            TF.batch_norm(x, **_clone(args), eps=0.0), expected, atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_sized_tensor_raises_one_clear_error(name):
    args = _args()
    args[name] = torch.ones(4, dtype=torch.float64)
    with pytest.raises(bnlab.ChannelMismatchError, match=rf"{name} has 4 elements .* 3 channels"):
        F.batch_norm(torch.randn(5, 3, dtype=torch.float64), **args, training=True)
    assert issubclass(bnlab.ChannelMismatchError, ValueError)
    assert issubclass(bnlab.ChannelMismatchError, RuntimeError)


@pytest.mark.parametrize("function", [F.batch_norm, F.batch_norm_relu], ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(), (5,)], ids=["0d", "1d"])
def test_input_without_channels_raises_one_clear_error(function, shape):
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # torch's type: it complains about running_mean
        TF.batch_norm(x, **_args(5))
    message = rf"expects input of shape \(N, C, \*\), got {len(shape)}D input of size"
    with pytest.raises(bnlab.InputRankError, match=message):
        function(x, **_args(5))
    assert issubclass(bnlab.InputRankError, ValueError)
    assert issubclass(bnlab.InputRankError, RuntimeError)


@pytest.mark.parametrize("function", [F.batch_norm, F.batch_norm_relu], ids=lambda f: f.__name__)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("buffers", [True, False])
def test_empty_1d_input_returns_empty_as_torch(function, training, buffers):
    """No channels to check sizes against: torch returns the (empty) input, after its eps
    check, whatever buffers come with it; weight and bias get zero gradients."""
    args = _args(4, buffers=buffers)
    weight, bias = (args[k].requires_grad_() for k in ("weight", "bias"))
    x = torch.randn(0, dtype=torch.bfloat16, requires_grad=True)
    y = function(x, **args, training=training)
    assert y.shape == (0,) and y.dtype == torch.bfloat16
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(bias.grad, torch.zeros(4, dtype=torch.float64))
    assert x.grad.shape == (0,)
    if TORCH_213:
        assert TF.batch_norm(x, **_clone(args), training=training).shape == (0,)
    with pytest.raises(ValueError, match="eps must be"):
        function(x, **_clone(args), training=training, eps=-1.0)


def test_empty_batch_leaves_buffers_and_gives_zero_parameter_grads():
    x = torch.randn(0, 3, 4, dtype=torch.float64, requires_grad=True)
    args = _args()
    weight, bias = (args[k].requires_grad_() for k in ("weight", "bias"))
    rm, rv = args["running_mean"].clone(), args["running_var"].clone()
    y = F.batch_norm(x, **args, training=True)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(args["running_mean"], rm) and torch.equal(args["running_var"], rv)
    assert torch.equal(weight.grad, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(bias.grad, torch.zeros(3, dtype=torch.float64))
    assert x.grad.shape == x.shape
