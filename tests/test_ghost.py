"""GhostBatchNorm against the paper's formulas (Hoffer, Hubara & Soudry 2017) in float64.

The reference normalizes each ghost batch on its own, with autograd through
its statistics, and moves the running statistics once per step from the
chunks' statistics pooled exactly (Chan's formula), BatchNorm's update rule
(see ``bnlab.nn.ghost`` for why). virtual_batch_size ≥ N must be BatchNorm,
bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call, jacrev, jvp, stack_module_state, vmap

import bnlab.nn

from ._twins import F64, randomize_
from .conftest import step_matches_eager

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-10, "atol": 1e-10}
# rank -> (class suffix, sample shape without N)
RANKS = {
    "1d-NC": ("1d", (3,)),
    "1d-NCL": ("1d", (3, 2)),
    "2d": ("2d", (3, 2, 2)),
    "3d": ("3d", (3, 2, 1, 2)),
}


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5


def _layer(rank, v, **kwargs):
    suffix, sample = RANKS[rank]
    layer = getattr(bnlab.nn, f"GhostBatchNorm{suffix}")(
        sample[0], dtype=F64, virtual_batch_size=v, **kwargs
    )
    return randomize_(layer), sample


def _view(t, x):
    return t.view([1, -1] + [1] * (x.dim() - 2))


def chunk_stats(x, v):
    """Each ghost batch's (count, mean, biased variance) per channel."""
    out = []
    for chunk in x.split(v):
        dims = [d for d in range(x.dim()) if d != 1]
        mean = chunk.mean(dims)
        out.append(
            (chunk.numel() // x.shape[1], mean, (chunk - _view(mean, chunk)).square().mean(dims))
        )
    return out


def paper_forward(x, v, gamma, beta, eps):
    """Algorithm 1: y = γ·(x − μ_l)/σ_l + β on each ghost batch l, σ_l = sqrt(var_l + eps)."""
    ys = []
    for chunk, (_, mean, var) in zip(x.split(v), chunk_stats(x, v), strict=True):
        xhat = (chunk - _view(mean, chunk)) / _view((var + eps).sqrt(), chunk)
        ys.append(xhat * _view(gamma, chunk) + _view(beta, chunk))
    return torch.cat(ys)


def pooled(stats):
    """The chunks' statistics pooled (Chan et al.): (n, mean, unbiased variance)."""
    n, mean, m2 = 0, 0.0, 0.0
    for count, mu, var in stats:
        total = n + count
        delta = mu - mean
        m2 = m2 + var * count + delta.square() * n * count / total
        mean = mean + delta * count / total
        n = total
    return n, mean, m2 / (n - 1)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(("n", "v"), [(12, 4), (11, 4)], ids=["whole-chunks", "smaller-last"])
@pytest.mark.parametrize("rank", list(RANKS))
def test_training_matches_the_paper(rank, n, v, affine, momentum):
    """Outputs, dx/dγ/dβ (autograd through each chunk's statistics), running stats, counter."""
    layer, sample = _layer(rank, v, affine=affine, momentum=momentum)
    layer.num_batches_tracked.zero_()
    c = sample[0]
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    for step in range(1, 3):
        x = _randn(n, *sample, seed=step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        gamma = (
            layer.weight.detach().clone().requires_grad_() if affine else torch.ones(c, dtype=F64)
        )
        beta = layer.bias.detach().clone().requires_grad_() if affine else torch.zeros(c, dtype=F64)
        dy = _randn(n, *sample, seed=10 + step)
        y, expected = layer(x), paper_forward(xr, v, gamma, beta, 1e-5)
        torch.testing.assert_close(y, expected, **TOL)
        y.backward(dy)
        expected.backward(dy)
        torch.testing.assert_close(x.grad, xr.grad, **TOL)
        if affine:
            torch.testing.assert_close(layer.weight.grad, gamma.grad, **TOL)
            torch.testing.assert_close(layer.bias.grad, beta.grad, **TOL)
            layer.weight.grad = layer.bias.grad = None
        _, mean, unbiased = pooled(chunk_stats(x.detach(), v))
        m = 1 / step if momentum is None else momentum
        mu, var = (1 - m) * mu + m * mean, (1 - m) * var + m * unbiased
        torch.testing.assert_close(layer.running_mean, mu, **TOL)
        torch.testing.assert_close(layer.running_var, var, **TOL)
        assert layer.num_batches_tracked.item() == step
    layer.eval()
    x = _randn(5, *sample, seed=9)
    expected = (x - _view(mu, x)) / _view((var + 1e-5).sqrt(), x)
    if affine:
        expected = expected * _view(layer.weight, x) + _view(layer.bias, x)
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_pooled_statistics_are_the_whole_batch_s_and_not_keras_s():
    """Pooling keeps the spread of the chunk means; tf-keras's average of the chunks'
    biased variances leaves it out."""
    x = _randn(12, 3) + torch.arange(12, dtype=F64)[:, None] / 3  # a trend across chunks
    stats = chunk_stats(x, 4)
    _, mean, var = pooled(stats)
    torch.testing.assert_close(mean, x.mean(0), **TOL)
    torch.testing.assert_close(var, x.var(0), **TOL)
    keras = torch.stack([s[2] for s in stats]).mean(0)
    assert (keras < 0.8 * var).all()


@pytest.mark.parametrize("rank", list(RANKS))
def test_one_chunk_is_batch_norm_exactly(rank):
    """virtual_batch_size ≥ N: bnlab's BatchNorm bit for bit (outputs, grads, state)."""
    ghost, sample = _layer(rank, 8)
    bn = getattr(bnlab.nn, type(ghost).__name__.replace("Ghost", ""))(sample[0], dtype=F64)
    bn.load_state_dict(ghost.state_dict())
    for n in (8, 5):
        results = []
        for m in (ghost, bn):
            x = _randn(n, *sample).requires_grad_()
            y = m(x)
            y.backward(_randn(n, *sample, seed=1))
            results.append([y, x.grad, m.weight.grad, m.bias.grad, *m.state_dict().values()])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)


def test_eval_is_batch_norm_eval_and_nothing_moves():
    ghost, _ = _layer("2d", 2)
    bn = bnlab.nn.BatchNorm2d(3, dtype=F64)
    bn.load_state_dict(ghost.state_dict())
    ghost.eval(), bn.eval()
    x = _randn(8, 3, 2, 2)
    assert torch.equal(ghost(x), bn(x))
    assert all(
        torch.equal(a, b)
        for a, b in zip(ghost.state_dict().values(), bn.state_dict().values(), strict=True)
    )


def test_channels_last_in_channels_last_out():
    layer = bnlab.nn.GhostBatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x.contiguous()))


def test_not_tracking_normalizes_chunks_without_buffers():
    layer = bnlab.nn.GhostBatchNorm1d(3, dtype=F64, virtual_batch_size=3, track_running_stats=False)
    x = _randn(8, 3)  # chunks of 3, 3 and 2
    torch.testing.assert_close(layer(x), paper_forward(x, 3, layer.weight, layer.bias, 1e-5), **TOL)
    layer.eval()  # no buffers: eval uses batch statistics, of the chunks too
    torch.testing.assert_close(layer(x), paper_forward(x, 3, layer.weight, layer.bias, 1e-5), **TOL)


def test_arguments_errors_and_state_dict():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bnlab.nn.GhostBatchNorm2d(3, virtual_batch_size=0)
    with pytest.raises(TypeError):
        bnlab.nn.GhostBatchNorm2d(3)  # virtual_batch_size is required
    layer = bnlab.nn.GhostBatchNorm1d(3, 1e-3, None, virtual_batch_size=4)
    assert layer.eps == 1e-3 and layer.momentum is None  # BatchNorm's positional arguments
    assert repr(layer).endswith("virtual_batch_size=4)")
    layer.load_state_dict(nn.BatchNorm1d(3).state_dict(), strict=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(5, 3))  # the last chunk holds one sample
    with pytest.raises(bnlab.ChannelMismatchError):
        layer(torch.randn(8, 4))
    x = torch.randn(0, 3, requires_grad=True)
    layer(x).sum().backward()
    # Counted as bnlab's BatchNorm counts: the one-value batch and the empty one, not the
    # batch refused for its channel count.
    assert layer.num_batches_tracked.item() == 2
    assert fx.symbolic_trace(nn.Sequential(layer)).graph.find_nodes(op="call_module", target="0")


# ---- transforms and graph capture --------------------------------------------------


def test_vmap_over_stacked_models_updates_each_model():
    models = [
        randomize_(bnlab.nn.GhostBatchNorm2d(3, dtype=F64, virtual_batch_size=2), seed=s)
        for s in range(3)
    ]
    x = torch.stack([_randn(5, 3, 2, 2, seed=s) for s in range(3)])
    params, buffers = stack_module_state([copy.deepcopy(m) for m in models])
    base = copy.deepcopy(models[0]).to("meta")
    y = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(y[i], m(x[i]), **TOL)
        for name, t in m.named_buffers():
            torch.testing.assert_close(buffers[name][i], t, **TOL)


def test_vmap_refuses_moving_unbatched_buffers_from_batched_input():
    """As torch's BatchNorm under vmap: an in-place update of shared buffers is refused."""
    layer = bnlab.nn.GhostBatchNorm1d(3, dtype=F64, virtual_batch_size=2)
    with pytest.raises(RuntimeError):
        vmap(layer)(_randn(2, 6, 3))


@pytest.mark.parametrize("rank", ["1d-NC", "2d"])
def test_grad_transforms_match_the_paper(rank):
    """jacrev and jvp wrt input, jacrev wrt γ and β, without running statistics."""
    suffix, sample = RANKS[rank]
    layer = randomize_(
        getattr(bnlab.nn, f"GhostBatchNorm{suffix}")(
            3, dtype=F64, virtual_batch_size=2, track_running_stats=False
        )
    )
    x, tx = _randn(6, *sample), _randn(6, *sample, seed=1)

    def reference(x):
        return paper_forward(x, 2, layer.weight, layer.bias, 1e-5)

    torch.testing.assert_close(jacrev(layer)(x), jacrev(reference)(x), **TOL)
    torch.testing.assert_close(jvp(layer, (x,), (tx,)), jvp(reference, (x,), (tx,)), **TOL)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    torch.testing.assert_close(
        jacrev(lambda p: functional_call(layer, p, (x,)))(params),
        jacrev(lambda p: paper_forward(x, 2, p["weight"], p["bias"], 1e-5))(params),
        **TOL,
    )


def test_compile_fullgraph_training():
    eager = bnlab.nn.GhostBatchNorm2d(3, virtual_batch_size=3, momentum=None)
    compiled_module = copy.deepcopy(eager)
    step = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for i in range(3):
        x = _randn(8, 3, 3, 3, seed=i).float()
        step_matches_eager(eager, step, x, atol=1e-5, grad_atol=1e-4)
    for a, b in zip(
        eager.state_dict().values(), compiled_module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
