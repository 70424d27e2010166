"""bnlab's direct CPU convolution: F.conv2d's values and gradients, and the model rewrite."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.models import LeNet5
from bnlab.models.native_conv import NativeConv2d, use_native_conv
from bnlab.speedups import _ext
from bnlab.speedups.conv2d import NATIVE_MAX_CHANNELS, _native_ok, conv2d

needs_native = pytest.mark.skipif(not _ext.available(), reason="native CPU kernels unavailable")

CL = torch.channels_last
NCHW = torch.contiguous_format


def _grads(fn, x, w, b, pad, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = fn(x, w, b, pad)
    inputs = (x, w) if b is None else (x, w, b)
    return (y, *torch.autograd.grad(y, inputs, dy))


def _ours(x, w, b, pad):
    assert _native_ok(x, w, b, pad)  # the comparison is of the native kernels
    return conv2d(x, w, b, pad)


def _torch(x, w, b, pad):
    return F.conv2d(x, w, b, padding=pad)


def _compare(n, c, o, h, w_, k, pad, dtype, x_fmt=NCHW, w_fmt=NCHW, bias=True, *, rel):
    """Both sides' values and gradients agree to `rel` of each tensor's largest magnitude."""
    kh, kw = k
    x = torch.randn(n, c, h, w_, dtype=dtype).contiguous(memory_format=x_fmt)
    w = torch.randn(o, c, kh, kw, dtype=dtype).contiguous(memory_format=w_fmt)
    b = torch.randn(o, dtype=dtype) if bias else None
    dy = torch.randn_like(_torch(x, w, b, pad))
    ours = _grads(_ours, x, w, b, pad, dy)
    ref = _grads(_torch, x, w, b, pad, dy)
    for got, want, name in zip(ours, ref, ("y", "dx", "dw", "db")[: len(ref)], strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(
            got, want, rtol=rel, atol=rel * scale, msg=lambda m, name=name: f"{name}: {m}"
        )
    return ours, ref


SHAPES = [
    # (n, c, o, h, w, (kh, kw), (ph, pw))
    (4, 3, 6, 32, 32, (5, 5), (0, 0)),  # LeNet-5's conv1
    (3, 6, 8, 14, 14, (5, 5), (0, 0)),  # 8 output channels: more than one register block
    (2, 5, 7, 9, 13, (3, 3), (1, 1)),  # odd widths: masked last vectors
    (2, 2, 3, 20, 70, (3, 3), (2, 2)),  # rows wider than one register block
    (1, 1, 1, 5, 5, (5, 5), (4, 4)),  # padding K-1: every output sees padding
    (2, 3, 5, 11, 17, (2, 7), (1, 3)),  # non-square kernel; 7 taps in two blocks
    (3, 4, 2, 8, 3, (1, 1), (0, 0)),  # 1x1, a row narrower than a vector
    (3, 6, 16, 14, 14, (5, 5), (0, 0)),  # LeNet-5's conv2: only dx is native
    (2, 12, 3, 9, 9, (3, 3), (1, 1)),  # wide input: dx is torch's, the rest native
]


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("x_fmt", [NCHW, CL], ids=["x-nchw", "x-cl"])
def test_float64_matches_torch(shape, x_fmt):
    n, c, o, h, w, k, pad = shape
    # Only the order of additions differs: a few float64 ulps of the largest value.
    _compare(n, c, o, h, w, k, pad, torch.float64, x_fmt, rel=1e-13)


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("w_fmt", [NCHW, CL], ids=["w-nchw", "w-cl"])
def test_float32_matches_torch(shape, w_fmt):
    n, c, o, h, w, k, pad = shape
    # The weight gradient sums n*h*w (up to 3136) products of unit normals; each
    # side's float32 rounding is about sqrt(terms) * 6e-8 = 3.4e-6 of the sum's
    # scale. 2e-5 leaves a margin of three.
    _compare(n, c, o, h, w, k, pad, torch.float32, w_fmt=w_fmt, rel=2e-5)


@needs_native
def test_without_bias():
    ours, _ = _compare(2, 3, 4, 9, 9, (3, 3), (0, 0), torch.float64, bias=False, rel=1e-13)
    assert len(ours) == 3 and ours[0].shape == (2, 4, 7, 7)  # y, dx, dw: no bias gradient


@needs_native
@pytest.mark.parametrize(("x_fmt", "w_fmt"), [(NCHW, NCHW), (CL, NCHW), (NCHW, CL), (CL, CL)])
def test_layouts_follow_torch(x_fmt, w_fmt):
    """The output is channels_last when the input or the weight is (torch's rule);
    the input gradient keeps the input's layout."""
    (y, dx, *_), (y_ref, dx_ref, *_) = _compare(
        2, 3, 6, 12, 12, (5, 5), (0, 0), torch.float64, x_fmt, w_fmt, rel=1e-13
    )
    for got, want in ((y, y_ref), (dx, dx_ref)):
        assert got.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL)
        assert got.is_contiguous() == want.is_contiguous()


@needs_native
def test_large_mean_input():
    """Images with a large offset (raw pixel values): float32 stays close to float64."""
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64) * 255
    w = torch.randn(6, 3, 5, 5, dtype=torch.float64) * 0.1
    b = torch.randn(6, dtype=torch.float64)
    dy = torch.randn(8, 6, 28, 28, dtype=torch.float64)
    ref = _grads(_torch, x, w, b, (0, 0), dy)
    got = _grads(_ours, x.float(), w.float(), b.float(), (0, 0), dy.float())
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


@needs_native
def test_infinite_input_spreads_like_torch():
    """An inf in the last input column reaches only the weights that see that column:
    the lanes past a row's end are masked, not multiplied by zero."""
    x = torch.randn(2, 2, 9, 13, dtype=torch.float64)
    x[0, 1, 4, -1] = float("inf")
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    dy = torch.randn(2, 3, 7, 11, dtype=torch.float64)
    ours = _grads(_ours, x, w, b, (0, 0), dy)
    ref = _grads(_torch, x, w, b, (0, 0), dy)
    assert ref[2].isfinite().any() and not ref[2].isfinite().all()
    for g, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(g, r, equal_nan=True, rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("n", [1, 3, 16])  # fewer images than threads, an uneven split, many
def test_threads_agree(one_thread, n):
    """Images are split across threads: the forward and input gradient are the same
    bits on 1 and 2 threads; the weight gradient sums per-thread float64 partials,
    so it may differ in the last float32 bit."""
    x = torch.randn(n, 3, 32, 32)
    w = torch.randn(6, 3, 5, 5)
    b = torch.randn(6)
    dy = torch.randn(n, 6, 28, 28)
    one = _grads(_ours, x, w, b, (0, 0), dy)
    torch.set_num_threads(2)
    two = _grads(_ours, x, w, b, (0, 0), dy)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    torch.testing.assert_close(one[2], two[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[3], two[3], rtol=1e-6, atol=1e-6)


@needs_native
def test_strided_bias_and_int_padding():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)[::2]  # a view: every other element
    assert _native_ok(x, w, b, (1, 1))
    torch.testing.assert_close(conv2d(x, w, b, 1), F.conv2d(x, w, b, padding=1))


@needs_native
def test_gradcheck():
    x = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: conv2d(*t, (1, 0)), (x, w, b))


@needs_native
def test_double_backward_raises_clearly():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(conv2d(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize(
    "case",
    [
        "many-channels",
        "float16",
        "non-contiguous",
        "padding-too-large",
        "wrong-channels",
        "weight-on-meta",
        "3d-weight",
        "empty-batch",
        "unbatched",
    ],
)
def test_other_inputs_take_torch(case):
    """Inputs the kernels do not take give exactly F.conv2d's result (or error)."""
    x = torch.randn(2, 3, 10, 10)
    w = torch.randn(4, 3, 3, 3)
    pad = (0, 0)
    if case == "many-channels":
        x = torch.randn(2, NATIVE_MAX_CHANNELS + 1, 10, 10)
        w = torch.randn(NATIVE_MAX_CHANNELS + 1, NATIVE_MAX_CHANNELS + 1, 3, 3)
    elif case == "float16":
        x, w = x.half(), w.half()
    elif case == "non-contiguous":
        x = torch.randn(2, 3, 10, 20)[..., ::2]
    elif case == "padding-too-large":
        pad = (3, 3)
    elif case == "wrong-channels":
        w = torch.randn(4, 2, 3, 3)
    elif case == "weight-on-meta":  # another device: never read through a data pointer
        w = torch.randn(4, 3, 3, 3, device="meta")
    elif case == "3d-weight":
        w = torch.randn(4, 3, 3)
    elif case == "empty-batch":
        x = torch.randn(0, 3, 10, 10)
    elif case == "unbatched":  # (C, H, W), as nn.Conv2d takes it
        x = torch.randn(3, 10, 10)
    assert not _native_ok(x, w, None, pad)
    if case == "weight-on-meta":  # torch decides what a mix of devices gives
        got, want = conv2d(x, w, None, pad), F.conv2d(x, w, None, padding=pad)
        assert (got.device, got.shape) == (want.device, want.shape)
        return
    if case in ("wrong-channels", "3d-weight"):
        with pytest.raises((RuntimeError, NotImplementedError)) as raised:
            conv2d(x, w, None, pad)
        with pytest.raises(type(raised.value)):
            F.conv2d(x, w, None, padding=pad)
        return
    if case == "float16" and not _half_conv_on_cpu():
        pytest.skip("this torch has no float16 convolution on the CPU")
    assert torch.equal(conv2d(x, w, None, pad), F.conv2d(x, w, None, padding=pad))


class _Spy:
    """The native module, recording which of its functions are called."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.module, name)


@needs_native
@pytest.mark.parametrize(
    ("c", "o", "fmt", "expected"),
    [
        (3, 6, NCHW, ["conv2d_forward", "conv2d_forward", "conv2d_grad_weight"]),  # all three
        (6, 16, NCHW, ["conv2d_forward"]),  # only dx: the forward and dw are torch's
        (12, 4, NCHW, ["conv2d_forward", "conv2d_grad_weight"]),  # y and dw; dx is torch's
        (8, 8, NCHW, ["conv2d_forward", "conv2d_forward", "conv2d_grad_weight"]),
        # channels_last: torch's kernels fill a vector at 8 channels, so y and dx are torch's
        (8, 8, CL, ["conv2d_grad_weight"]),
        (4, 8, CL, ["conv2d_forward", "conv2d_grad_weight"]),  # dx (4 channels) and dw
    ],
)
def test_each_part_runs_where_it_is_faster(monkeypatch, c, o, fmt, expected):
    spy = _Spy(_ext.module())
    monkeypatch.setattr(_ext, "module", lambda: spy)
    x = torch.randn(2, c, 12, 12).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(o, c, 5, 5, requires_grad=True)
    b = torch.randn(o, requires_grad=True)
    conv2d(x, w, b).sum().backward()
    assert spy.calls == expected


def test_cpu_autocast_takes_torch_and_its_dtype():
    """Under CPU autocast the layer gives what nn.Conv2d gives there: bfloat16."""
    plain = nn.Conv2d(3, 6, 5)
    native = use_native_conv(nn.Sequential(copy.deepcopy(plain)))
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _native_ok(x, plain.weight, plain.bias, (0, 0))
        got, want = native(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


def _half_conv_on_cpu() -> bool:
    try:
        F.conv2d(torch.ones(1, 1, 3, 3).half(), torch.ones(1, 1, 3, 3).half())
        return True
    except RuntimeError:
        return False


def test_use_native_conv_keeps_parameters_and_names():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.Conv2d(6, 4, 3, stride=2),  # strided: not supported, stays
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False)),
        nn.Conv2d(4, 4, 3, padding="same"),  # string padding: stays
    )
    before = copy.deepcopy(model)
    params = list(model.parameters())
    use_native_conv(model)
    assert [type(m) for m in (model[0], model[1], model[2][0], model[3])] == [
        NativeConv2d,
        nn.Conv2d,
        NativeConv2d,
        nn.Conv2d,
    ]
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert model.state_dict().keys() == before.state_dict().keys()
    x = torch.randn(2, 3, 20, 20)
    torch.testing.assert_close(model(x), before(x), rtol=1e-5, atol=1e-5)


def test_lenet_trains_like_torch_convs(one_thread):
    """A LeNet-5 with native convolutions follows torch's through a few Adam steps."""
    torch.manual_seed(0)
    ours = use_native_conv(LeNet5("bn").double())
    ref = copy.deepcopy(ours)
    for m in ref.modules():
        if type(m) is NativeConv2d:
            m.__class__ = nn.Conv2d
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (ours, ref)]
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    for _ in range(3):
        for model, opt in zip((ours, ref), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_compiles_fullgraph_as_torch_convolution():
    """Under torch.compile the layer is F.conv2d, so a whole graph captures it."""
    conv = use_native_conv(nn.Sequential(nn.Conv2d(3, 6, 5)))
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    y, y_ref = compiled(x), conv(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


# ---- the checked native boundary ---------------------------------------------------------------


def _forward_call() -> dict:
    """A valid ``_ext.conv2d_forward`` call: (2, 3, 8, 8) * (4, 3, 3, 3), padding 1."""
    return {
        "x": torch.randn(2, 3, 8, 8),
        "weight": torch.randn(4, 3, 3, 3),
        "bias": torch.randn(4),
        "out": torch.full((2, 4, 8, 8), 7.0),
        "padding": (1, 1),
    }


def _grad_weight_call() -> dict:
    """A valid ``_ext.conv2d_grad_weight`` call for the same convolution."""
    return {
        "x": torch.randn(2, 3, 8, 8),
        "dy": torch.randn(2, 4, 8, 8),
        "dweight": torch.full((4, 3, 3, 3), 7.0),
        "dbias": torch.full((4,), 7.0),
        "padding": (1, 1),
    }


def _overlapping(**shapes: tuple[int, ...]) -> dict[str, Tensor]:
    """Two tensors of these shapes in one buffer, the second starting halfway into the first."""
    (a, shape_a), (b, shape_b) = shapes.items()
    n_a, n_b = math.prod(shape_a), math.prod(shape_b)
    buf = torch.randn(n_a + n_b)
    return {a: buf[:n_a].view(shape_a), b: buf[n_a // 2 : n_a // 2 + n_b].view(shape_b)}


def _rejects(call, args: dict, error: type[Exception]) -> None:
    """``call(**args)`` raises ``error`` and leaves every CPU tensor of the call as it was."""
    before = {
        k: v.clone() for k, v in args.items() if isinstance(v, Tensor) and v.device.type == "cpu"
    }
    with pytest.raises(error):
        call(**args)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} was written"


@needs_native
def test_boundary_accepts_a_valid_call():
    args = _forward_call()
    _ext.conv2d_forward(**args)
    want = F.conv2d(args["x"], args["weight"], args["bias"], padding=1)
    torch.testing.assert_close(args["out"], want, rtol=1e-5, atol=1e-5)


FORWARD_MISTAKES = {
    "x-float64": (lambda a: {"x": a["x"].double()}, TypeError),
    "weight-float64": (lambda a: {"weight": a["weight"].double()}, TypeError),
    "out-int32": (lambda a: {"out": torch.zeros(2, 4, 8, 8, dtype=torch.int32)}, TypeError),
    "x-float16": (lambda a: {"x": a["x"].half()}, TypeError),
    "x-not-a-tensor": (lambda a: {"x": a["x"].numpy()}, TypeError),
    "out-too-small": (lambda a: {"out": torch.full((2, 4, 7, 8), 7.0)}, ValueError),
    "out-too-few-channels": (lambda a: {"out": torch.full((2, 3, 8, 8), 7.0)}, ValueError),
    "bias-too-long": (lambda a: {"bias": torch.randn(5)}, ValueError),
    "weight-wrong-channels": (lambda a: {"weight": torch.randn(4, 2, 3, 3)}, ValueError),
    "kernel-larger-than-image": (lambda a: {"weight": torch.randn(4, 3, 11, 11)}, ValueError),
    "x-strided": (lambda a: {"x": torch.randn(2, 3, 8, 16)[..., ::2]}, ValueError),
    "weight-channels-last": (
        lambda a: {"weight": a["weight"].contiguous(memory_format=CL)},
        ValueError,
    ),
    "bias-strided": (lambda a: {"bias": torch.randn(8)[::2]}, ValueError),
    "out-transposed": (lambda a: {"out": a["out"].transpose(2, 3)}, ValueError),
    "out-on-meta": (lambda a: {"out": torch.empty(2, 4, 8, 8, device="meta")}, ValueError),
    "x-and-weight-swapped": (lambda a: {"x": a["weight"], "weight": a["x"]}, ValueError),
    "x-and-out-swapped": (lambda a: {"x": a["out"], "out": a["x"]}, ValueError),
    "out-is-x": (lambda a: {"x": a["out"], "weight": torch.randn(4, 4, 3, 3)}, ValueError),
    "out-overlaps-x": (lambda a: _overlapping(x=(2, 3, 8, 8), out=(2, 4, 8, 8)), ValueError),
    "padding-negative": (lambda a: {"padding": (-1, 1)}, ValueError),
    "padding-a-list": (lambda a: {"padding": [1, 1]}, ValueError),
}


@needs_native
@pytest.mark.parametrize("case", FORWARD_MISTAKES)
def test_boundary_rejects_a_wrong_forward_call(case):
    """A mistake raises before any pointer reaches the kernel: nothing is written."""
    change, error = FORWARD_MISTAKES[case]
    args = _forward_call()
    args.update(change(args))
    _rejects(_ext.conv2d_forward, args, error)


GRAD_WEIGHT_MISTAKES = {
    "dweight-float64": (lambda a: {"dweight": a["dweight"].double()}, TypeError),
    "dy-float64": (lambda a: {"dy": a["dy"].double()}, TypeError),
    "dbias-too-short": (lambda a: {"dbias": torch.zeros(3)}, ValueError),
    "dy-wrong-size": (lambda a: {"dy": torch.randn(2, 4, 6, 6)}, ValueError),
    "dweight-wrong-channels": (lambda a: {"dweight": torch.zeros(4, 2, 3, 3)}, ValueError),
    "dweight-transposed": (lambda a: {"dweight": a["dweight"].transpose(2, 3)}, ValueError),
    "dy-strided": (lambda a: {"dy": torch.randn(2, 4, 8, 16)[..., ::2]}, ValueError),
    "x-and-dy-swapped": (lambda a: {"x": a["dy"], "dy": a["x"]}, ValueError),
    "dweight-and-dbias-swapped": (
        lambda a: {"dweight": a["dbias"], "dbias": a["dweight"]},
        ValueError,
    ),
    "dbias-inside-dweight": (lambda a: {"dbias": a["dweight"].view(-1)[:4]}, ValueError),
    "dweight-overlaps-dy": (
        lambda a: _overlapping(dy=(2, 4, 8, 8), dweight=(4, 3, 3, 3)),
        ValueError,
    ),
}


@needs_native
@pytest.mark.parametrize("case", GRAD_WEIGHT_MISTAKES)
def test_boundary_rejects_a_wrong_grad_weight_call(case):
    change, error = GRAD_WEIGHT_MISTAKES[case]
    args = _grad_weight_call()
    args.update(change(args))
    _rejects(_ext.conv2d_grad_weight, args, error)
