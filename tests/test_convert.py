"""bnlab.nn.convert: swap torch.nn batch norm for bnlab's, at any depth, and back."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import bnlab.nn


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.Sequential(nn.BatchNorm1d(5))),
        nn.LazyBatchNorm1d(),
    )


def _bn_types(model):
    return [type(m) for m in model.modules() if "BatchNorm" in type(m).__name__]


def test_swaps_every_layer_keeping_objects_and_numbers():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(8, 3, 6, 6)
    model(x)  # materialize the lazy layer
    reference = _model()
    reference.load_state_dict(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    buffers_before = [id(b) for b in model.buffers()]
    converted = bnlab.nn.convert(model)
    assert converted is model
    assert _bn_types(model) == [bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm1d, bnlab.nn.BatchNorm1d]
    assert [id(p) for p in model.parameters()] == params_before
    assert [id(b) for b in model.buffers()] == buffers_before
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_optimizer_built_before_swap_keeps_training_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bnlab.nn.convert(model)
    before = model[1].weight.detach().clone()
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)


def test_hooks_training_flag_dtype_kept_and_swap_back():
    calls = []
    bn = nn.BatchNorm2d(3, dtype=torch.float64, momentum=None)
    bn.register_forward_hook(lambda *_: calls.append("hook"))
    bn.eval()
    swapped = bnlab.nn.convert(bn)
    assert type(swapped) is bnlab.nn.BatchNorm2d and not swapped.training
    assert swapped.weight.dtype == torch.float64 and swapped.momentum is None
    swapped(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert calls == ["hook"]
    back = bnlab.nn.convert(swapped, to="torch")
    assert type(back) is nn.BatchNorm2d
    back(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert calls == ["hook", "hook"]


def test_uninitialized_lazy_layer_is_swapped_and_still_lazy():
    calls = []
    lazy = nn.LazyBatchNorm2d(momentum=0.3)
    lazy.register_forward_pre_hook(lambda *_: calls.append("pre"))
    swapped = bnlab.nn.convert(lazy)
    assert type(swapped) is bnlab.nn.LazyBatchNorm2d and swapped.momentum == 0.3
    swapped(torch.randn(2, 5, 2, 2))
    assert type(swapped) is bnlab.nn.BatchNorm2d and swapped.weight.shape == (5,)
    assert calls == ["pre"]


def test_subclasses_are_left_alone():
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(MyBN(3))
    bnlab.nn.convert(model)
    assert type(model[0]) is MyBN


def test_checkpoints_interchange_between_converted_models():
    torch.manual_seed(0)
    theirs = _model()
    theirs(torch.randn(8, 3, 6, 6))
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = bnlab.nn.convert(_model())
    ours(torch.randn(8, 3, 6, 6))
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bad_target():
    with pytest.raises(ValueError, match="'bnlab' or 'torch'"):
        bnlab.nn.convert(nn.BatchNorm2d(3), to="tensorflow")
