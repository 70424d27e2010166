"""BatchRenorm against the paper's formulas (Ioffe 2017, Algorithm 1) in float64.

The reference below is written from the paper, forward and backward (r and d
constants), with the running statistics moved by BatchNorm's rule (what these
layers keep; see ``bnlab.nn.renorm``). rmax = 1, dmax = 0 and the first
warmup step must be BatchNorm, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call, jacrev, jvp, stack_module_state, vmap

import bnlab.nn
from bnlab.nn.renorm import renorm_limits

from ._twins import F64, SHAPES, randomize_
from .conftest import step_matches_eager

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = list(SHAPES)
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _randn(*shape, seed=0):
    """Channels with different scales and offsets, so some r and d clip and some do not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    c = shape[1]
    scale = torch.linspace(0.3, 3.0, c, dtype=F64).view(1, c, *[1] * (len(shape) - 2))
    shift = torch.linspace(-1.5, 1.5, c, dtype=F64).view(1, c, *[1] * (len(shape) - 2))
    return x * scale + shift


def _layer(rank, **kwargs):
    cls_name, shape = SHAPES[rank]
    cls = getattr(bnlab.nn, cls_name.replace("BatchNorm", "BatchRenorm"))
    return randomize_(cls(shape[1], dtype=F64, **kwargs)), shape


def _view(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def paper_forward(x, gamma, beta, mu, var, eps, rmax, dmax):
    """Algorithm 1's training forward: (y, r, d, mu_b, var_b), r and d without gradient."""
    dims = [d for d in range(x.dim()) if d != 1]
    mu_b = x.mean(dims)
    var_b = (x - _view(mu_b, x)).square().mean(dims)
    sigma_b = (var_b + eps).sqrt()
    sigma = (var + eps).sqrt()
    r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
    d = ((mu_b - mu) / sigma).clamp(-dmax, dmax).detach()
    xhat = (x - _view(mu_b, x)) / _view(sigma_b, x) * _view(r, x) + _view(d, x)
    y = xhat * _view(gamma, x) + _view(beta, x)
    return y, r, d, mu_b, var_b


def paper_backward(dy, x, gamma, eps, r, d):
    """Algorithm 1's backward, r and d constants: (dx, dgamma, dbeta).

    ∂ℓ/∂x̂ = ∂ℓ/∂y·γ
    ∂ℓ/∂σ_B = Σ ∂ℓ/∂x̂·(x − μ_B)·(−r/σ_B²),   ∂ℓ/∂μ_B = Σ ∂ℓ/∂x̂·(−r/σ_B)
    ∂ℓ/∂x = ∂ℓ/∂x̂·r/σ_B + ∂ℓ/∂σ_B·(x − μ_B)/(m·σ_B) + ∂ℓ/∂μ_B/m
    ∂ℓ/∂γ = Σ ∂ℓ/∂y·x̂,   ∂ℓ/∂β = Σ ∂ℓ/∂y
    """
    dims = [k for k in range(x.dim()) if k != 1]
    m = x.numel() // x.shape[1]
    mu_b = x.mean(dims)
    centered = x - _view(mu_b, x)
    sigma_b = (centered.square().mean(dims) + eps).sqrt()
    dxhat = dy * _view(gamma, x)
    dsigma = (dxhat * centered * _view(-r / sigma_b.square(), x)).sum(dims)
    dmu = (dxhat * _view(-r / sigma_b, x)).sum(dims)
    dx = (
        dxhat * _view(r / sigma_b, x)
        + _view(dsigma, x) * centered / _view(m * sigma_b, x)
        + _view(dmu / m, x)
    )
    xhat = centered / _view(sigma_b, x) * _view(r, x) + _view(d, x)
    return dx, (dy * xhat).sum(dims), dy.sum(dims)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("rank", RANKS)
def test_training_matches_the_paper(rank, affine, momentum):
    """Outputs, every gradient, r/d clipping both ways, running stats and counter, over
    steps whose warmup limits rise; then eval."""
    warmup, rmax, dmax = 2, 1.8, 0.4
    layer, shape = _layer(
        rank, affine=affine, momentum=momentum, warmup=warmup, rmax=rmax, dmax=dmax
    )
    layer.num_batches_tracked.zero_()
    with torch.no_grad():  # far from the data's (see _randn), so r and d clip both ways
        layer.running_mean.copy_(torch.tensor([1.0, 0.0, -1.0]))
        layer.running_var.copy_(torch.tensor([2.0, 1.0, 0.5]))
    c = shape[1]
    gamma = layer.weight.detach() if affine else torch.ones(c, dtype=F64)
    beta = layer.bias.detach() if affine else torch.zeros(c, dtype=F64)
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    clipped = set()
    for step in range(1, 5):
        x = _randn(*shape, seed=step).requires_grad_()
        dy = _randn(*shape, seed=10 + step)
        progress = min((step - 1) / warmup, 1.0)
        rmax_t, dmax_t = 1 + (rmax - 1) * progress, dmax * progress
        expected, r, d, mu_b, var_b = paper_forward(
            x.detach(), gamma, beta, mu, var, 1e-5, rmax_t, dmax_t
        )
        y = layer(x)
        torch.testing.assert_close(y, expected, **TOL)
        y.backward(dy)
        dx, dgamma, dbeta = paper_backward(dy, x.detach(), gamma, 1e-5, r, d)
        torch.testing.assert_close(x.grad, dx, **TOL)
        if affine:
            torch.testing.assert_close(layer.weight.grad, dgamma, **TOL)
            torch.testing.assert_close(layer.bias.grad, dbeta, **TOL)
            layer.weight.grad = layer.bias.grad = None
        m = 1 / step if momentum is None else momentum
        n = x.numel() // c
        mu = (1 - m) * mu + m * mu_b
        var = (1 - m) * var + m * var_b * n / (n - 1)
        torch.testing.assert_close(layer.running_mean, mu, **TOL)
        torch.testing.assert_close(layer.running_var, var, **TOL)
        assert layer.num_batches_tracked.item() == step
        clipped |= {"r-high" for v in r if v == rmax_t > 1} | {
            "r-low" for v in r if v == 1 / rmax_t < 1
        }
        clipped |= {"d" for v in d if abs(v) == dmax_t > 0}
    if momentum is not None:  # (an average copies the first batch's: little left to clip)
        assert clipped == {"r-high", "r-low", "d"}
    layer.eval()
    x = _randn(*shape, seed=9).requires_grad_()
    expected = (x - _view(mu, x)) / _view((var + 1e-5).sqrt(), x) * _view(gamma, x) + _view(beta, x)
    torch.testing.assert_close(layer(x), expected, **TOL)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, _view(gamma / (var + 1e-5).sqrt(), x).expand_as(x), **TOL)


def _run(layer, shape, steps=3):
    outputs = []
    for step in range(steps):
        x = _randn(*shape, seed=step).requires_grad_()
        y = layer(x)
        y.backward(_randn(*shape, seed=20 + step))
        outputs += [y, x.grad]
    outputs += [p.grad for p in layer.parameters()] + list(layer.state_dict().values())
    return outputs


@pytest.mark.parametrize("case", ["rmax1-dmax0", "first-warmup-step"])
@pytest.mark.parametrize("rank", RANKS)
def test_reduces_to_batch_norm_exactly(rank, case):
    """rmax = 1, dmax = 0 (and the first step of a warmup, which takes the correction
    path with those limits): bnlab's BatchNorm bit for bit, so torch's within rounding."""
    cls_name, shape = SHAPES[rank]
    kwargs = {"rmax": 1.0, "dmax": 0.0} if case == "rmax1-dmax0" else {"warmup": 5}
    steps = 3 if case == "rmax1-dmax0" else 1
    renorm, _ = _layer(rank, **kwargs)
    renorm.num_batches_tracked.zero_()
    bn = getattr(bnlab.nn, cls_name)(shape[1], dtype=F64)
    theirs = getattr(nn, cls_name)(shape[1], dtype=F64)
    for other in (bn, theirs):
        other.load_state_dict(renorm.state_dict())
    ours = _run(renorm, shape, steps)
    for a, b in zip(ours, _run(bn, shape, steps), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours, _run(theirs, shape, steps), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_warmup_limits():
    assert renorm_limits(3.0, 5.0, 0, torch.tensor(1)) == (3.0, 5.0)
    steps = torch.tensor([1, 2, 3, 5, 9])
    rmax, dmax = renorm_limits(3.0, 5.0, 4, steps)
    torch.testing.assert_close(rmax, torch.tensor([1.0, 1.5, 2.0, 3.0, 3.0], dtype=F64))
    torch.testing.assert_close(dmax, torch.tensor([0.0, 1.25, 2.5, 5.0, 5.0], dtype=F64))


def test_state_dicts_interchange_with_batch_norm_and_repr():
    """No new buffer: BatchNorm's state_dicts load strictly, both ways."""
    bn = randomize_(nn.BatchNorm2d(3, dtype=F64))
    renorm = bnlab.nn.BatchRenorm2d(3, dtype=F64, rmax=2.0, dmax=1.0, warmup=7)
    renorm.load_state_dict(bn.state_dict(), strict=True)
    nn.BatchNorm2d(3, dtype=F64).load_state_dict(renorm.state_dict(), strict=True)
    assert list(renorm.state_dict()) == list(bn.state_dict())
    assert repr(renorm).endswith("rmax=2.0, dmax=1.0, warmup=7)")
    assert isinstance(renorm, nn.modules.batchnorm._BatchNorm)
    assert copy.deepcopy(renorm).warmup == 7


@pytest.mark.parametrize("kwargs", [{"rmax": 0.5}, {"dmax": -1.0}, {"warmup": -1}, {"warmup": 1.5}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        bnlab.nn.BatchRenorm1d(3, **kwargs)


def test_errors_and_empty_batch_as_batch_norm():
    layer = bnlab.nn.BatchRenorm2d(3)
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(bnlab.ChannelMismatchError, match="expected input with 3 channels"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bnlab.nn.BatchRenorm1d(3)(torch.randn(1, 3))
    x = torch.randn(0, 3, 2, 2, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3))
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_eval_and_no_running_stats_are_batch_norm():
    x = _randn(6, 3, 4)
    renorm = randomize_(bnlab.nn.BatchRenorm1d(3, dtype=F64)).eval()
    bn = randomize_(bnlab.nn.BatchNorm1d(3, dtype=F64)).eval()
    assert torch.equal(renorm(x), bn(x))
    renorm = bnlab.nn.BatchRenorm1d(3, dtype=F64, track_running_stats=False)
    assert torch.equal(renorm(x), bnlab.nn.BatchNorm1d(3, dtype=F64, track_running_stats=False)(x))


def test_fx_keeps_it_a_leaf():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), bnlab.nn.BatchRenorm2d(3))
    gm = fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2


# ---- transforms and graph capture --------------------------------------------------


def _reference_module_call(layer, x):
    """The paper's training forward for a layer whose buffers do not move."""
    c = x.shape[1]
    w = layer.weight if layer.affine else torch.ones(c, dtype=F64)
    b = layer.bias if layer.affine else torch.zeros(c, dtype=F64)
    return paper_forward(
        x, w, b, layer.running_mean, layer.running_var, layer.eps, layer.rmax, layer.dmax
    )[0]


def test_vmap_over_stacked_models_updates_each_model():
    """functional_call over stacked parameters and buffers: each model normalizes and
    moves its own statistics, as the models one by one (each at its own warmup step)."""
    models = [
        randomize_(bnlab.nn.BatchRenorm2d(3, dtype=F64, rmax=1.5, dmax=0.3, warmup=3), seed=s)
        for s in range(3)
    ]
    for step, m in enumerate(models):
        m.num_batches_tracked.fill_(step)
    x = torch.stack([_randn(4, 3, 2, 2, seed=s) for s in range(3)])
    params, buffers = stack_module_state([copy.deepcopy(m) for m in models])
    base = copy.deepcopy(models[0]).to("meta")
    y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(y[i], m(x[i]), **TOL)
        for name, t in m.named_buffers():
            torch.testing.assert_close(buffers[name][i], t, **TOL)


def test_vmap_refuses_moving_unbatched_buffers_from_batched_input():
    """As torch's BatchNorm under vmap: an in-place update of shared buffers is refused."""
    layer, shape = _layer("2d")
    with pytest.raises(RuntimeError):
        vmap(layer)(torch.stack([_randn(*shape, seed=s) for s in range(2)]))


@pytest.mark.parametrize("rank", ["1d-NC", "2d"])
def test_grad_transforms_match_the_paper(rank):
    """jacrev and jvp (input, and γ/β through functional_call) against the reference's,
    buffers present but not moving (track_running_stats set False after construction)."""
    layer, shape = _layer(rank, rmax=1.5, dmax=0.3)
    layer.track_running_stats = False
    x, tx = _randn(*shape), _randn(*shape, seed=1)
    torch.testing.assert_close(
        jacrev(layer)(x), jacrev(lambda x: _reference_module_call(layer, x))(x), **TOL
    )
    torch.testing.assert_close(
        jvp(layer, (x,), (tx,)), jvp(lambda x: _reference_module_call(layer, x), (x,), (tx,)), **TOL
    )
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def ours(p):
        return functional_call(layer, p, (x,))

    def reference(p):
        return paper_forward(
            x, p["weight"], p["bias"], layer.running_mean, layer.running_var, 1e-5, 1.5, 0.3
        )[0]

    torch.testing.assert_close(jacrev(ours)(params), jacrev(reference)(params), **TOL)


def test_compile_fullgraph_training_with_warmup():
    """aot_eager captures the warmup (a tensor from the counter) and momentum=None."""
    eager = bnlab.nn.BatchRenorm2d(3, momentum=None, warmup=2, rmax=2.0, dmax=0.5)
    compiled_module = copy.deepcopy(eager)
    step = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for i in range(4):
        x = (_randn(4, 3, 3, 3, seed=i) * (1 + i)).float()
        step_matches_eager(eager, step, x, atol=1e-5, grad_atol=1e-4)
    for a, b in zip(
        eager.state_dict().values(), compiled_module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
