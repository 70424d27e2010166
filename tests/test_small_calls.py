"""Small calls: which run behind the C++ autograd node, and that it is bnlab's batch norm.

Which path ran is read off the output: the node leaves a ``CppNode<BatchNormNode>``
as y's grad_fn, the Python function its ``BatchNormFunctionBackward``; calls
without a graph are counted at bnlab's CPU backend, which the node does not call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab.nn
from bnlab import functional as F
from bnlab import small_calls
from bnlab.errors import ChannelMismatchError
from bnlab.functional import check_arguments
from bnlab.kernels import _build, cpu

from ._twins import make_twins
from .conftest import count_calls

# A limit for graph-recording calls, as small_calls.MAX_BYTES may set (it sets none):
# the tests of the mechanism use this one.
LIMIT = 1 << 20
MAX = LIMIT // 4  # float32 values


@pytest.fixture
def limited(monkeypatch):
    monkeypatch.setattr(small_calls, "MAX_BYTES", LIMIT)


_NODE = _build.node()


def test_the_node_builds_and_loads():
    """Where the kernels build, the node must too: without it every small call would be
    slower than torch's, and the tests below would test the Python function."""
    assert _build.native() is not None
    assert _NODE is not None, "the autograd node did not build or load (see the warning)"


def _path_of(y: torch.Tensor) -> str:
    name = y.grad_fn.name()
    if "BatchNormNode" in name:
        return "node"
    assert "BatchNormFunction" in name, name
    return "function"


def _rows(elements: int, channels: int = 16, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(elements // channels, channels, dtype=dtype)


@pytest.mark.parametrize(
    "elements, path", [(64, "node"), (MAX, "node"), (MAX + 16, "function")], ids=str
)
@pytest.mark.parametrize("train", [True, False])
def test_graph_recording_calls_switch_at_the_crossover(elements, path, train, limited):
    m = bnlab.nn.BatchNorm1d(16).train(train)
    y = m(_rows(elements).requires_grad_())
    assert _path_of(y) == path


@pytest.mark.parametrize("train", [True, False])
def test_graph_recording_calls_of_every_size_take_the_node(train):
    """As shipped there is no limit: a 4 MiB training step runs behind the node, with torch's
    numbers and gradients."""
    theirs, ours = (m.float().train(train) for m in make_twins("BatchNorm1d", 16))
    x = _rows(4 * MAX) * 2 + 1
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(t) for m, t in zip((ours, theirs), xs, strict=True)]
    assert _path_of(ys[0]) == "node"
    for y in ys:
        y.backward(torch.ones_like(y) + x)
    torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_the_crossover_is_in_bytes(dtype, limited):
    """16-bit inputs switch at twice float32's values, float64 at half (MAX_BYTES)."""
    values = LIMIT // dtype.itemsize
    m = bnlab.nn.BatchNorm1d(16, dtype=torch.float64 if dtype == torch.float64 else None)
    for elements, path in ((values, "node"), (values + 16, "function")):
        y = m(_rows(elements, dtype=dtype).requires_grad_())
        assert _path_of(y) == path, (dtype, elements)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "cls, shape, layout",
    [
        ("BatchNorm1d", (32, 6), None),
        ("BatchNorm1d", (8, 6, 5), None),
        ("BatchNorm2d", (8, 6, 4, 4), None),
        ("BatchNorm2d", (8, 6, 4, 4), torch.channels_last),
        ("BatchNorm3d", (4, 6, 2, 3, 3), torch.channels_last_3d),
    ],
    ids=["NC", "NCL", "NCHW", "NHWC", "NDHWC"],
)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}],
    ids=["default", "noaffine", "notrack", "cumulative"],
)
def test_node_matches_torch_nn_in_float64(cls, shape, layout, kwargs, train):
    """Outputs, every gradient and the running buffers, over three steps (the cumulative
    momentum takes a tensor momentum, which the node declines: the function runs)."""
    theirs, ours = make_twins(cls, 6, **kwargs)
    for m in (ours, theirs):
        m.train(train)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 2
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-11, rtol=1e-11)
        for pa, pb in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-11, rtol=1e-11)
        for ba, bb in zip(ours.buffers(), theirs.buffers(), strict=True):
            torch.testing.assert_close(ba, bb, atol=1e-13, rtol=1e-13)
        assert ya.stride() == yb.stride()
    if kwargs.get("momentum", 0.1) is not None:
        assert _path_of(ya) == "node"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_node_gives_the_function_numbers_exactly(dtype, train, monkeypatch):
    """Same kernels, same statistics: bit for bit what bnlab's Python function gives."""
    torch.manual_seed(0)
    x = (torch.randn(16, 6, 5, 5) * 3 + 40).to(dtype)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(small_calls, "ENABLED", enabled)
        torch.manual_seed(1)
        m = bnlab.nn.BatchNorm2d(6).train(train)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        xa = x.clone().requires_grad_()
        y = m(xa)
        assert _path_of(y) == ("node" if enabled else "function")
        y.backward(torch.ones_like(y).mul_(0.5) + x.float().sin().to(dtype))
        results.append([y, xa.grad, m.weight.grad, m.bias.grad, *m.buffers()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_double_backward_matches_torch(train, affine):
    theirs, ours = make_twins("BatchNorm1d", 3, affine=affine)  # random running statistics
    for m in (ours, theirs):
        m.train(train)
    x = torch.randn(8, 3, dtype=torch.float64)
    grads = []
    for m in (ours, theirs):
        xa = x.clone().requires_grad_()
        y = m(xa)
        (g,) = torch.autograd.grad((y.sin() * torch.arange(3.0, dtype=torch.float64)).sum(), xa,
                                   create_graph=True)  # fmt: skip
        inputs = [xa, *m.parameters()]
        grads.append(torch.autograd.grad((g**2).sum(), inputs, allow_unused=True))
    assert _path_of(ours(x.clone().requires_grad_())) == "node"
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(train):
    node = _NODE.batch_norm
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64) * 2
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return node(x, w, b, rm, rv, train, 0.0, 1e-5, small_calls.MAX_BYTES)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batched_gradients_match_torch(train):
    """autograd.grad(..., is_grads_batched=True) vmaps the backward over dy."""
    theirs, ours = make_twins("BatchNorm2d", 3)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    dys = torch.randn(5, *x.shape, dtype=torch.float64)
    results = []
    for m in (ours, theirs):
        m.train(train)
        xa = x.clone().requires_grad_()
        y = m(xa)
        results.append(torch.autograd.grad(y, (xa, m.weight), dys, is_grads_batched=True))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_calls_without_a_graph_take_the_node_at_every_size(train, monkeypatch):
    """No graph (under no_grad, or nothing that requires grad): the node, not the Python
    backend, below the crossover and above it, with torch's numbers."""
    name = "eager_forward_train" if train else "eager_forward_eval"
    calls = count_calls(monkeypatch, cpu, name)
    theirs, ours = (m.float() for m in make_twins("BatchNorm1d", 16))
    for m in (ours, theirs):
        m.train(train).requires_grad_(False)
    for elements in (64, MAX + 16):
        x = _rows(elements) * 2 + 1
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(ours(x.requires_grad_()), theirs(x), atol=1e-5, rtol=1e-5)
    assert not calls
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=False):
        exact = 0 if not train else 1e-6  # eval leaves them as they were
        torch.testing.assert_close(a, b, atol=exact, rtol=exact)


def _call(
    x_dtype=torch.float32, param=None, buffer=None, momentum=0.1, elements=64, x=None, grad=False
):
    """The arguments of one training call, as the module hands them on; with ``grad``, x
    requires grad (the call records a graph)."""
    x = _rows(elements).to(x_dtype) if x is None else x
    x.requires_grad_(grad)
    param, buffer = param or x_dtype, buffer or x_dtype
    c = x.shape[1]
    return (
        x,
        torch.ones(c, dtype=param),
        torch.zeros(c, dtype=param),
        torch.zeros(c, dtype=buffer),
        torch.ones(c, dtype=buffer),
        True,
        momentum,
        1e-5,
    )


@pytest.mark.parametrize(
    "case, kwargs, taken",
    [
        ("float32", {}, True),
        ("float64", {"x_dtype": torch.float64}, True),
        (
            "bf16 input, float32 parameters and buffers",
            {"x_dtype": torch.bfloat16, "param": torch.float32, "buffer": torch.float32},
            True,
        ),
        (
            "fp16 input, float32 parameters, float64 buffers",
            {"x_dtype": torch.float16, "param": torch.float32, "buffer": torch.float64},
            True,
        ),
        # The function converts these first (and rounds a 16-bit buffer's update once).
        ("bf16 parameters", {"x_dtype": torch.bfloat16, "buffer": torch.float32}, False),
        ("bf16 buffers", {"x_dtype": torch.bfloat16, "param": torch.float32}, False),
        ("float64 parameters for float32 input", {"param": torch.float64}, False),
        ("momentum as a tensor (momentum=None)", {"momentum": torch.tensor(0.5)}, False),
        ("above the crossover, recording a graph", {"elements": MAX + 16, "grad": True}, False),
        ("above the crossover, no graph", {"elements": MAX + 16}, True),
        ("strided input", {"x": torch.randn(16, 64).t()}, False),
        ("integer input", {"x": torch.ones(8, 16, dtype=torch.int64)}, False),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_rule(case, kwargs, taken, limited):
    """The node takes the call, or declines it (None) and the function runs."""
    y = small_calls.batch_norm(*_call(**kwargs))
    assert (y is not None) is taken, case


class _Logged(torch.Tensor):
    """A subclass with its own __torch_function__, as logging and tracing tools make."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


class _Recording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _Watching(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("what", ["subclass", "subclass weight", "dispatch mode", "function mode"])
def test_subclasses_and_modes_see_the_ops(what):
    """They expect to see every op run: the node declines, and the function runs."""
    x, w, *rest = _call()
    if what == "subclass":
        x = x.as_subclass(_Logged)
    if what == "subclass weight":
        w = w.as_subclass(_Logged)
    mode = {"dispatch mode": _Recording, "function mode": _Watching}.get(what)
    with mode() if mode else contextlib.nullcontext():
        assert small_calls.batch_norm(x, w, *rest) is None


def test_a_dispatch_mode_sees_the_function_run():
    m = bnlab.nn.BatchNorm1d(16)
    x = _rows(64)
    expected = torch.nn.BatchNorm1d(16)(x)
    with _Recording() as mode:
        y = m(x)
    assert mode.ops  # the function's allocations at least
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_a_declined_call_still_gives_torch_numbers():
    """A strided input and a tensor momentum take the function: same results as torch.nn."""
    theirs, ours = make_twins("BatchNorm1d", 6, momentum=None)
    x = torch.randn(6, 32, dtype=torch.float64).t()
    ya, yb = ours(x.requires_grad_()), theirs(x)
    assert _path_of(ya) == "function"
    torch.testing.assert_close(ya, yb, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-13, rtol=0)


def test_forward_ad_keeps_the_function():
    m = bnlab.nn.BatchNorm1d(16)
    x = _rows(64)
    with fwAD.dual_level():
        y = m(fwAD.make_dual(x, torch.ones_like(x)))
        tangent = fwAD.unpack_dual(y).tangent
    # Batch norm removes a constant shift: the tangent of x + t·1 is zero.
    torch.testing.assert_close(tangent, torch.zeros_like(x), atol=1e-5, rtol=0)


def test_vmap_keeps_the_function():
    """Each vmapped slice with its own statistics, as torch: the function's batching rule."""
    m = bnlab.nn.BatchNorm1d(4, track_running_stats=False)
    x = torch.randn(3, 8, 4)
    y = torch.func.vmap(m)(x)
    expected = torch.stack(
        [torch.nn.functional.batch_norm(s, None, None, training=True) for s in x]
    )
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_checks_come_first():
    """A small call still gets bnlab's clear error."""
    m = bnlab.nn.BatchNorm1d(16)
    with pytest.raises(ChannelMismatchError, match="expected input with 16 channels"):
        m(torch.randn(4, 8, requires_grad=True))


def _rejected(case: str) -> tuple:
    """A call that bnlab's checks reject: (x, weight, bias, running_mean, running_var,
    training, momentum, eps)."""
    x, w, b, rm, rv, training, momentum, eps = _call()
    if case == "weight of 8":
        w = w[:8]
    elif case == "bias of 8 in eval":
        b, training = b[:8], False
    elif case == "running_mean of 3 in eval":
        rm, training = rm[:3], False
    elif case == "running_var of 3":
        rv = rv[:3]
    elif case == "eval without buffers":
        rm, rv, training = None, None, False
    elif case == "one buffer":
        rv = None
    elif case == "eps 0 in training":
        eps = 0.0
    elif case == "eps -1e-3 in eval":
        eps, training = -1e-3, False
    elif case == "one value per channel":
        x = x[:1]
    return x, w, b, rm, rv, training, momentum, eps


@pytest.mark.parametrize(
    "case",
    [
        "weight of 8",
        "bias of 8 in eval",
        "running_mean of 3 in eval",
        "running_var of 3",
        "eval without buffers",
        "one buffer",
        "eps 0 in training",
        "eps -1e-3 in eval",
        "one value per channel",
    ],
)
def test_the_node_declines_what_the_checks_reject(case):
    """functional.batch_norm tries the node before its checks: the node must decline
    every call they reject, so that the checks raise their own errors."""
    x, w, b, rm, rv, training, momentum, eps = call = _rejected(case)
    with pytest.raises((ValueError, RuntimeError)) as checked:
        check_arguments(x, rm, rv, w, b, training, eps)
    assert _NODE.batch_norm(*call, small_calls.MAX_BYTES) is None
    with pytest.raises(type(checked.value)) as got:
        F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    assert str(got.value) == str(checked.value)


def test_the_node_checks_its_arguments_count():
    with pytest.raises(TypeError, match="expects 9 arguments"):
        _NODE.batch_norm(_rows(64))


@pytest.mark.parametrize("elements", [64, MAX + 16], ids=["node", "function"])
def test_running_buffers_are_versioned_like_an_in_place_op(elements):
    """Autograd sees the update, as torch's: a graph that saved a buffer refuses it afterwards."""
    m = bnlab.nn.BatchNorm1d(16)
    before = [b._version for b in (m.running_mean, m.running_var)]
    saved = m.running_mean * torch.ones(16, requires_grad=True)  # saves the buffer
    m(_rows(elements))
    assert [b._version for b in (m.running_mean, m.running_var)] == [v + 1 for v in before]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_saved_tensor_hooks_see_what_the_node_saves():
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bnlab.nn.BatchNorm1d(16)(_rows(64).requires_grad_())
    assert _path_of(y) == "node" and (4, 16) in packed
    y.sum().backward()


def test_switch_off(monkeypatch):
    """BNLAB_SMALL_CALLS=bnlab (read at import as ENABLED) keeps every call on the function."""
    monkeypatch.setattr(small_calls, "ENABLED", False)
    assert small_calls.batch_norm(*_call()) is None
    y = bnlab.nn.BatchNorm1d(16)(_rows(64).requires_grad_())
    assert _path_of(y) == "function"


def test_without_the_node_small_calls_take_the_function(monkeypatch):
    """A node that cannot be built (here: no compiler) warns once; the function runs."""
    monkeypatch.setattr(_build, "_node", _build._UNSET)
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="_bnlab_bn_node unavailable.*no C\\+\\+ compiler"):
        y = bnlab.nn.BatchNorm1d(16)(_rows(64).requires_grad_())
    assert _path_of(y) == "function"
    assert _build.node() is None
