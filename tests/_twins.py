"""Twins for the transform tests: the same layer or model built from torch.nn and from bnlab.

Every twin pair holds identical float64 random parameters and buffers (and a
non-zero batch counter, so ``momentum=None`` is not just "copy the first
batch"), so any transform applied to both must give equal numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import bnlab.nn

F64 = torch.float64
# Unit-scale data in float64: both sides sum in a different order, a few ulps apart.
TOL = {"rtol": 1e-10, "atol": 1e-10}

# rank id -> (class name, tiny input shape)
SHAPES = {
    "1d-NC": ("BatchNorm1d", (4, 3)),
    "1d-NCL": ("BatchNorm1d", (4, 3, 2)),
    "2d": ("BatchNorm2d", (4, 3, 2, 2)),
    "3d": ("BatchNorm3d", (2, 3, 2, 2, 2)),
}


def randomize_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Fill γ, β and the running buffers with random float64 values (var > 0), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                t.fill_(3)  # num_batches_tracked: momentum=None then averages with weight 1/4
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=F64) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=F64))
    return module


def make_twins(cls_name: str, num_features: int = 3, seed: int = 1, **kwargs):
    """(torch module, bnlab module): same class name and arguments, identical float64 state."""
    theirs = getattr(nn, cls_name)(num_features, dtype=F64, **kwargs)
    ours = getattr(bnlab.nn, cls_name)(num_features, dtype=F64, **kwargs)
    randomize_(theirs, seed)
    copy_state_(ours, theirs)
    return theirs, ours


def copy_state_(dst: nn.Module, src: nn.Module) -> None:
    """dst's parameters and buffers := src's, matched by name (not by load_state_dict, so
    these tests do not depend on state_dict interchange)."""
    src_tensors = dict(src.named_parameters()) | dict(src.named_buffers())
    dst_tensors = dict(dst.named_parameters()) | dict(dst.named_buffers())
    assert src_tensors.keys() == dst_tensors.keys()
    with torch.no_grad():
        for name, t in dst_tensors.items():
            t.copy_(src_tensors[name])


def assert_same_tensors(ours, theirs, msg: str = "") -> None:
    """Equal pytrees of tensors (or None), dtype included."""
    a_leaves, a_spec = torch.utils._pytree.tree_flatten(ours)
    b_leaves, b_spec = torch.utils._pytree.tree_flatten(theirs)
    assert a_spec == b_spec, f"{msg}: structure {a_spec} != {b_spec}"
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves, strict=True)):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{msg}[{i}]: {type(a)} is not a tensor"
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"{msg}[{i}]: {m}")
        else:
            assert a == b, f"{msg}[{i}]: {a!r} != {b!r}"


def assert_same_state(ours: nn.Module, theirs: nn.Module) -> None:
    """Same state_dict (names, dtypes, values: running buffers and counter included)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        torch.testing.assert_close(a[name], b[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def run_both(fn: Callable, theirs_args: tuple, ours_args: tuple):
    """``fn(*theirs_args)`` and then ``fn(*ours_args)``.

    Returns (torch result, bnlab result). Where torch raises, bnlab must raise
    the same exception type, and (None, None) is returned so the caller can stop.
    """
    try:
        expected = fn(*theirs_args)
    except Exception as exc:  # torch's behaviour decides, read at run time
        with pytest.raises(type(exc)):
            fn(*ours_args)
        return None, None
    return expected, fn(*ours_args)


def check_like_torch(
    fn: Callable, theirs_args: tuple, ours_args: tuple, reference: Callable | None = None
) -> None:
    """``fn(*ours_args)`` equals ``fn(*theirs_args)``, or raises the same exception type.

    ``reference``: for cases where torch's refusal is a limitation of its
    implementation rather than of the semantics (it turns the batch counter into
    a Python number for ``momentum=None``), a callable computing the right answer
    another way. Where torch then raises, bnlab may raise anything, but if it
    returns, its result must equal ``reference()``.
    """
    try:
        expected = fn(*theirs_args)
    except Exception as exc:  # torch's behaviour decides, read at run time
        if reference is None:
            with pytest.raises(type(exc)):
                fn(*ours_args)
            return
        try:
            actual = fn(*ours_args)
        except Exception:
            return
        assert_same_tensors(actual, reference(), "vs reference where torch refuses")
        return
    assert_same_tensors(fn(*ours_args), expected)


def norm_factory(library: str, momentum: float | None = 0.1) -> Callable[[int], nn.Module]:
    """BatchNorm2d of ``library`` ("torch" or "bnlab") as a norm-layer factory."""
    cls = nn.BatchNorm2d if library == "torch" else bnlab.nn.BatchNorm2d
    return lambda c: cls(c, momentum=momentum, dtype=F64)


def small_net(norm: Callable[[int], nn.Module], in_ch: int = 2, ch: int = 3) -> nn.Module:
    """conv -> BN -> ReLU -> pool -> linear: the smallest model that has a BN inside."""
    return nn.Sequential(
        nn.Conv2d(in_ch, ch, 3, padding=1, dtype=F64),
        norm(ch),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(ch, 2, dtype=F64),
    )


def net_twins(momentum: float | None = 0.1, seed: int = 1):
    """(torch model, bnlab model): small_net with identical random weights and buffers."""
    torch.manual_seed(seed)
    theirs = randomize_(small_net(norm_factory("torch", momentum)), seed)
    ours = small_net(norm_factory("bnlab", momentum))
    copy_state_(ours, theirs)
    return theirs, ours
