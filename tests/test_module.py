"""Module behaviour beyond the numbers: state_dict, lazy init, errors, copying, attributes."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch

import bnlab
import bnlab.nn

from .conftest import SHAPES, make_pair

ALL = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


@pytest.mark.parametrize("cls_name", ALL)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_attributes_buffers_repr_like_torch(cls_name, affine, track):
    ours, theirs = make_pair(
        cls_name, affine=affine, track_running_stats=track, eps=1e-3, momentum=None
    )
    assert repr(ours) == repr(theirs)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k


def test_reset_methods():
    m = bnlab.nn.BatchNorm2d(3)
    m(torch.randn(4, 3, 2, 2) + 3)
    with torch.no_grad():
        m.weight.fill_(7)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3)) and torch.equal(m.running_var, torch.ones(3))
    assert m.num_batches_tracked.item() == 0 and m.weight[0].item() == 7
    m(torch.randn(4, 3, 2, 2) + 3)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))
    assert m.num_batches_tracked.item() == 0


def test_dtype_and_device_arguments():
    m = bnlab.nn.BatchNorm1d(4, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.running_var.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.int64


@pytest.mark.parametrize("direction", ["torch->bnlab", "bnlab->torch"])
def test_state_dicts_interchange(direction):
    ours, theirs = make_pair("BatchNorm2d", momentum=None)
    src, dst = (theirs, ours) if direction == "torch->bnlab" else (ours, theirs)
    for _ in range(3):
        src(torch.randn(4, 3, 2, 2, dtype=torch.float64) * 2 + 1)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst.load_state_dict(torch.load(buffer, weights_only=True))
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    src.eval(), dst.eval()
    torch.testing.assert_close(src(x), dst(x), atol=1e-12, rtol=0)


def test_version_1_checkpoint_without_counter_keeps_current_counter():
    ours, theirs = make_pair("BatchNorm1d")
    for m in (ours, theirs):
        for _ in range(2):
            m(torch.randn(5, 3, dtype=torch.float64))
    old = OrderedDict((k, v) for k, v in theirs.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})
    for m in (ours, theirs):
        m.load_state_dict(old)  # strict: no missing-key error
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
    fresh = bnlab.nn.BatchNorm1d(3, dtype=torch.float64)
    fresh.load_state_dict(old)
    assert fresh.num_batches_tracked.item() == 0


def test_version_2_checkpoint_missing_counter_is_reported():
    m = bnlab.nn.BatchNorm1d(3)
    sd = m.state_dict()
    del sd["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        m.load_state_dict(sd)


@pytest.mark.parametrize("cls_name", ALL)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_lazy_becomes_plain_bnlab_class(cls_name, affine, track):
    shape = {"BatchNorm1d": (4, 5), "BatchNorm2d": (4, 5, 2, 2), "BatchNorm3d": (2, 5, 2, 2, 2)}[
        cls_name
    ]
    ours = getattr(bnlab.nn, "Lazy" + cls_name)(affine=affine, track_running_stats=track)
    theirs = getattr(torch.nn, "Lazy" + cls_name)(affine=affine, track_running_stats=track)
    assert repr(ours) == repr(theirs)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    assert type(ours) is getattr(bnlab.nn, cls_name)
    assert type(ours).__name__ == type(theirs).__name__
    # Both inherit torch's quirk: with neither parameters nor buffers nothing is
    # uninitialized, so num_features stays 0.
    assert ours.num_features == theirs.num_features
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=k)


def test_lazy_loads_a_checkpoint_before_first_call_like_torch():
    src = bnlab.nn.BatchNorm2d(4)
    src(torch.randn(3, 4, 2, 2))
    ours, theirs = bnlab.nn.LazyBatchNorm2d(), torch.nn.LazyBatchNorm2d()
    for m in (ours, theirs):
        m.load_state_dict(src.state_dict())
        m.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), src.eval()(x), atol=0, rtol=0)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    assert type(ours) is bnlab.nn.BatchNorm2d
    assert ours.num_features == theirs.num_features  # torch leaves it at 0 on this path


@pytest.mark.parametrize("rank", list(SHAPES))
def test_wrong_rank_raises_like_torch(rank):
    cls_name, shape = SHAPES[rank]
    ours, theirs = make_pair(cls_name)
    bad = torch.randn(2, 3, 2, 2) if cls_name == "BatchNorm1d" else torch.randn(*shape, 2)
    with pytest.raises(ValueError) as expected:
        theirs(bad)
    with pytest.raises(ValueError) as got:
        ours(bad)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_channel_mismatch_always_raises_clear_error(affine, track, train):
    m = bnlab.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).train(train)
    with pytest.raises(
        bnlab.ChannelMismatchError, match=r"expected input with 3 channels .* got 4"
    ):
        m(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError):
        m(torch.randn(2, 4, 2, 2))
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 4, 2, 2))


def test_one_value_per_channel_counts_the_batch_then_raises_like_torch():
    ours, theirs = make_pair("BatchNorm1d")
    for m in (ours, theirs):
        with pytest.raises(
            ValueError, match="Expected more than 1 value per channel when training"
        ):
            m(torch.randn(1, 3, dtype=torch.float64))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    for m in (ours, theirs):
        m.eval()
        m(torch.randn(1, 3, dtype=torch.float64))  # running stats: fine


def test_eval_without_buffers_uses_batch_stats_and_checks_batch():
    ours, theirs = make_pair("BatchNorm1d", track_running_stats=False)
    ours.eval(), theirs.eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        ours(torch.randn(1, 3, dtype=torch.float64))


def test_empty_batch_counts_but_leaves_stats():
    ours, theirs = make_pair("BatchNorm2d")
    for m in (ours, theirs):
        y = m(torch.randn(0, 3, 2, 2, dtype=torch.float64))
        assert y.shape == (0, 3, 2, 2)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)


def _trained():
    m = bnlab.nn.BatchNorm2d(3, momentum=None)
    for _ in range(2):
        m(torch.randn(4, 3, 2, 2) + 1)
    return m


def _assert_equivalent(a, b):
    assert type(a) is type(b) and a.momentum == b.momentum
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(a.eval()(x), b.eval()(x), atol=0, rtol=0)


def test_deepcopy_pickle_and_torch_save():
    m = _trained()
    _assert_equivalent(m, copy.deepcopy(m))
    _assert_equivalent(m, pickle.loads(pickle.dumps(m)))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    # A whole module is pickled code: only load files you trust this way.
    _assert_equivalent(m, torch.load(buffer, weights_only=False))
