"""BatchNormReLU1d/2d/3d and the fused ReLU of the Triton backend, against torch's
``relu(BatchNorm(x))``. Tolerances as in test_triton.py."""

from __future__ import annotations

import pytest
import torch

import bnlab.nn
from bnlab.functional import batch_norm_relu
from bnlab.kernels import gpu
from bnlab.kernels.reference import REFERENCE as REF
from bnlab.toolkit import fold
from bnlab.toolkit._population import batch_norms

from .conftest import count_calls
from .test_triton import DEVICE, DTYPES, LAYOUTS, TRI, _acc, _check, _input, _params, _wide

F64 = torch.float64
SHAPES = {"1d": (8, 3), "2d": (4, 3, 5, 4), "3d": (2, 3, 3, 4, 2)}


def _reference_relu(x, w, b, stats, dy, batch_stats):
    """The composition in float64: y = relu(bn(x)), and its gradients."""
    mean, invstd = stats.double()
    pre = (x.double() - mean.view(-1, *[1] * (x.dim() - 2))) * (invstd * w.double()).view(
        -1, *[1] * (x.dim() - 2)
    ) + b.double().view(-1, *[1] * (x.dim() - 2))
    live = pre > 0
    grads = REF.backward(dy.double() * live, x.double(), w.double(), stats.double(), batch_stats)
    return pre.clamp_min(0), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC", "NCL"])
def test_fused_kernels_match_the_composition(layout, dtype):
    x = _input(layout, dtype)
    w, b = _params(x.shape[1], dtype)
    acc = _acc(dtype)
    y, stats = TRI.forward_train_relu(x, w, b, 1e-5, None, None, 0.1)
    _, stats_ref = REF.forward_train(*_wide(x, w, b), 1e-5, None, None, 0.1)
    _check(stats, stats_ref, acc, "stats")
    dy = torch.randn(x.shape, dtype=F64).to(dtype).to(DEVICE)
    y_ref, grads_ref = _reference_relu(x, w, b, stats, dy, True)
    assert bool((y >= 0).all()) and bool((y == 0).any())
    _check(y, y_ref, acc, "y")
    grads = TRI.backward_relu(dy, x, w, b, stats, True)
    for r, t, name in zip(grads, grads_ref, ("dx", "dweight", "dbias"), strict=True):
        _check(r, t, acc, name)
    rm, rv = torch.randn(x.shape[1], device=DEVICE), torch.rand(x.shape[1], device=DEVICE) + 0.5
    y, stats = TRI.forward_eval_relu(x, w, b, rm, rv, 1e-5)
    y_ref, grads_ref = _reference_relu(x, w, b, stats, dy, False)
    _check(y, y_ref, acc, "eval y")
    for r, t, name in zip(
        TRI.backward_relu(dy, x, w, b, stats, False), grads_ref, "xwb", strict=True
    ):
        _check(r, t, acc, f"eval d{name}")


@pytest.fixture
def on_triton(monkeypatch, bnlab_kernels_only):
    monkeypatch.setattr(bnlab.kernels, "_FAST", (TRI,))
    return count_calls(monkeypatch, gpu, "eager_backward")


def _pair(rank, **kwargs):
    ours = getattr(bnlab.nn, f"BatchNormReLU{rank}")(3, dtype=F64, **kwargs).to(DEVICE)
    theirs = getattr(torch.nn, f"BatchNorm{rank}")(3, dtype=F64, **kwargs).to(DEVICE)
    return ours, theirs


def _steps(ours, theirs, shape):
    for train in (True, True, False, True):
        ours.train(train), theirs.train(train)
        x = torch.randn(shape, dtype=F64, device=DEVICE) * 2 + 0.5
        dy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), torch.relu(theirs(xb))
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(ya, yb, atol=1e-12, rtol=0)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    if ours.affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-11, rtol=0)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, atol=1e-11, rtol=0)


@pytest.mark.parametrize("rank", list(SHAPES))
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}])
def test_fused_layers_match_torch(on_triton, rank, kwargs):
    ours, theirs = _pair(rank, **kwargs)
    _steps(ours, theirs, SHAPES[rank])
    assert len(on_triton) == 4  # every backward was the fused one


@pytest.mark.parametrize("rank", list(SHAPES))
def test_composed_layers_match_torch(rank):
    """On the CPU backend the layer is relu(batch_norm(x)) as composed."""
    ours, theirs = _pair(rank)
    _steps(ours, theirs, SHAPES[rank])


def test_double_backward_through_the_reference(on_triton):
    m = bnlab.nn.BatchNormReLU2d(3, dtype=F64).to(DEVICE)
    x = torch.randn(3, 3, 2, 2, dtype=F64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradgradcheck(lambda t: m(t).square(), (x,))
    m.eval()
    assert torch.autograd.gradgradcheck(lambda t: m(t).square(), (x,))


def test_transforms_take_the_composition(on_triton):
    """Under torch.func (here jvp and vmap) the layer is the composition, with torch's numbers."""
    ours, theirs = _pair("2d", track_running_stats=False)  # nothing mutated under jvp
    x, t = torch.randn(4, 3, 5, 4, dtype=F64, device=DEVICE), torch.randn(4, 3, 5, 4, dtype=F64)
    t = t.to(DEVICE)
    a = torch.func.jvp(ours, (x,), (t,))
    b = torch.func.jvp(lambda v: torch.relu(theirs(v)), (x,), (t,))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=1e-12, rtol=0)
    xs = torch.randn(2, 4, 3, 5, 4, dtype=F64, device=DEVICE)
    torch.testing.assert_close(
        torch.func.vmap(ours)(xs), torch.func.vmap(lambda v: torch.relu(theirs(v)))(xs)
    )


def test_functional_checks_as_batch_norm():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_relu(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(Exception, match="3"):
        batch_norm_relu(x, torch.zeros(4), torch.ones(4))
    y = batch_norm_relu(x, torch.zeros(3), torch.ones(3), eps=0.0)
    torch.testing.assert_close(y, torch.relu(x))


def test_layer_errors_and_state_as_batch_norm():
    m = bnlab.nn.BatchNormReLU2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(3, 5, 5))
    with pytest.raises(Exception, match="3 channels"):
        m(torch.randn(2, 4, 5, 5))
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 5, 5) * 3 + 1)
    m.load_state_dict(bn.state_dict())
    m.eval(), bn.eval()
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(m(x), torch.relu(bn(x)))


def test_helpers_that_replace_batch_norms_leave_it_whole():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), bnlab.nn.BatchNormReLU2d(3)).eval()
    model[1].running_mean.normal_()
    x = torch.randn(2, 2, 6, 6)
    for converted in (
        bnlab.nn.freeze(model),
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model),
        bnlab.nn.SyncBatchNorm.convert_sync_batchnorm(model),
        fold(model),
    ):
        torch.testing.assert_close(converted.eval()(x), model(x))
        assert bool((converted(x) >= 0).all())
    assert list(batch_norms(model)) == ["1"]  # PreciseBN and diagnose see its statistics


def test_layouts_keep_their_format(on_triton):
    m = bnlab.nn.BatchNormReLU2d(3).to(DEVICE)
    shape, fmt = LAYOUTS["NHWC"]
    x = torch.randn(shape, device=DEVICE).contiguous(memory_format=fmt)
    assert m(x).is_contiguous(memory_format=fmt)
