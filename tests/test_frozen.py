"""FrozenBatchNorm against its formula in float64; freeze and unfreeze over nested models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call, jacrev, jvp, vmap

import bnlab.nn

from ._twins import F64, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-10, "atol": 1e-10}
SHAPES = {"1d": (4, 3), "1d-NCL": (4, 3, 2), "2d": (2, 3, 2, 2), "3d": (2, 3, 2, 1, 2)}


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5


def _frozen(rank):
    cls = getattr(bnlab.nn, f"FrozenBatchNorm{rank[:2]}")
    return randomize_(cls(3, eps=1e-3, dtype=F64)), SHAPES[rank]


def reference(x, layer):
    """y = (x − running_mean)/sqrt(running_var + eps)·weight + bias."""

    def v(t):
        return t.view([1, -1] + [1] * (x.dim() - 2))

    scale = layer.weight / (layer.running_var + layer.eps).sqrt()
    return (x - v(layer.running_mean)) * v(scale) + v(layer.bias)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rank", list(SHAPES))
def test_forward_and_backward_are_the_formula_in_both_modes(rank, train):
    layer, shape = _frozen(rank)
    layer.train(train)
    state = copy.deepcopy(layer.state_dict())
    x = _randn(*shape).requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, reference(x.detach(), layer), **TOL)
    dy = _randn(*shape, seed=1)
    y.backward(dy)
    torch.testing.assert_close(x.grad, torch.autograd.grad(reference(x, layer), x, dy)[0], **TOL)
    assert list(layer.parameters()) == []
    assert all(
        torch.equal(a, b) for a, b in zip(state.values(), layer.state_dict().values(), strict=True)
    )


def test_checkpoints_of_torchvision_detectron2_and_batch_norm_load():
    """torchvision's and detectron2's FrozenBatchNorm2d hold exactly these four buffers;
    a BatchNorm2d checkpoint's counter is dropped."""
    keys = ["weight", "bias", "running_mean", "running_var"]
    layer = bnlab.nn.FrozenBatchNorm2d(3)
    assert list(layer.state_dict()) == keys
    layer.load_state_dict(
        {k: torch.full((3,), float(i + 1)) for i, k in enumerate(keys)}, strict=True
    )
    assert torch.equal(layer.running_var, torch.full((3,), 4.0))
    bn = randomize_(nn.BatchNorm2d(3))
    layer.load_state_dict(bn.state_dict(), strict=True)
    bn.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn(x))
    assert repr(layer) == "FrozenBatchNorm2d(3, eps=1e-05)"


def test_errors():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnlab.nn.FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        bnlab.nn.FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(bnlab.ChannelMismatchError, match="expected input with 3 channels"):
        bnlab.nn.FrozenBatchNorm1d(3)(torch.randn(2, 4))


def test_transforms_and_fx():
    layer, shape = _frozen("2d")
    x, tx = _randn(3, *shape), _randn(*shape, seed=1)
    torch.testing.assert_close(vmap(layer)(x), torch.stack([reference(t, layer) for t in x]), **TOL)
    x = x[0]

    def ref(x):
        return reference(x, layer)

    torch.testing.assert_close(jacrev(layer)(x), jacrev(ref)(x), **TOL)
    torch.testing.assert_close(jvp(layer, (x,), (tx,)), jvp(ref, (x,), (tx,)), **TOL)
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    gamma_grad = jacrev(lambda w: functional_call(layer, {**buffers, "weight": w}, (x,)))(
        buffers["weight"]
    )
    expected = jacrev(
        lambda w: reference(x, type("L", (), {**buffers, "weight": w, "eps": layer.eps}))
    )(buffers["weight"])
    torch.testing.assert_close(gamma_grad, expected, **TOL)
    gm = fx.symbolic_trace(nn.Sequential(nn.Identity(), layer))
    assert gm.graph.find_nodes(op="call_module", target="1")


def test_compile_fullgraph():
    layer = randomize_(bnlab.nn.FrozenBatchNorm2d(3))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad(layer(x).sum(), x)[0])


# ---- freeze / unfreeze ---------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, dtype=F64)
        self.inner = nn.Sequential(bnlab.nn.BatchRenorm2d(3, dtype=F64), nn.ReLU())
        self.ghost = bnlab.nn.GhostBatchNorm2d(3, dtype=F64, virtual_batch_size=2)

    def forward(self, x):
        return self.ghost(self.inner(self.conv(x)))


def _zoo():
    """torch's and bnlab's batch norms of every rank and kind, nested."""
    return randomize_(
        nn.ModuleDict(
            {
                "a": nn.Sequential(
                    nn.BatchNorm2d(3, dtype=F64),
                    bnlab.nn.BatchNorm2d(3, dtype=F64, affine=False),
                    Block(),
                ),
                "b": nn.Sequential(
                    nn.BatchNorm1d(3, dtype=F64), bnlab.nn.BatchNorm1d(3, dtype=F64)
                ),
                "c": nn.Sequential(
                    nn.BatchNorm3d(3, dtype=F64), bnlab.nn.BatchNorm3d(3, dtype=F64)
                ),
                "sync": nn.SyncBatchNorm(3, dtype=F64),
            }
        )
    )


def _outputs(zoo):
    return [
        zoo["a"](_randn(2, 3, 2, 2)),
        zoo["b"](_randn(4, 3)),
        zoo["c"](_randn(2, 3, 2, 1, 2)),
        zoo["sync"](_randn(2, 3, 2, 2)),
    ]


def test_freeze_computes_the_eval_outputs_in_place_at_any_depth():
    zoo = _zoo().eval()
    expected = _outputs(zoo)
    same = bnlab.nn.freeze(zoo)
    assert same is zoo
    kinds = [type(m).__name__ for m in zoo.modules() if "Norm" in type(m).__name__]
    assert kinds == ["FrozenBatchNorm2d"] * 4 + ["FrozenBatchNorm1d"] * 2 + [
        "FrozenBatchNorm3d"
    ] * 2 + ["FrozenBatchNorm2d"]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in zoo.modules())
    zoo.train()  # frozen: training mode changes nothing
    for a, b in zip(_outputs(zoo), expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(p.dtype == F64 for p in zoo.buffers())


def test_freeze_keeps_device_and_dtype_and_returns_a_lone_layer():
    frozen = bnlab.nn.freeze(nn.BatchNorm2d(3, device="meta", dtype=torch.float16))
    assert isinstance(frozen, bnlab.nn.FrozenBatchNorm2d)
    assert {(b.device.type, b.dtype) for b in frozen.buffers()} == {("meta", torch.float16)}


def test_freeze_leaves_a_layer_without_statistics_with_a_warning():
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"freeze: left 0 as it is: it has no running statistics"):
        bnlab.nn.freeze(model)
    assert type(model[0]) is nn.BatchNorm1d


def test_unfreeze_gives_trainable_batch_norms_with_the_same_eval():
    zoo = _zoo().eval()
    expected = _outputs(zoo)
    bnlab.nn.freeze(zoo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bnlab.nn.unfreeze(zoo)
    kinds = {type(m) for m in zoo.modules() if "Norm" in type(m).__name__}
    assert kinds == {bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm3d}
    for a, b in zip(_outputs(zoo), expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert all(p.requires_grad and p.dtype == F64 for p in zoo.parameters())
    assert not zoo.training
