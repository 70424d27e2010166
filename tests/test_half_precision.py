"""bfloat16 and float16 batch norm against a float64 truth, and against torch's own.

Every case runs three batch norms on the same half-precision input ``x`` and
output gradient ``dy``: bnlab's and torch.nn's with the parameter setup under
test, and torch.nn's in float64 with the same parameter values on
``x.double()`` and ``dy.double()``. Half values convert to float64 exactly, so
the last one is the exact answer (the truth) for the very numbers the other
two see: every error measured here is the computation's, none the input's.

Two parameter setups:

* ``float32``: float32 parameters and buffers, half input (what CPU autocast does);
* ``half``: the whole module converted with ``.to(dtype)``.

The tolerance rule. Each result ``r`` (an element of y, dx, dweight, dbias,
running_mean or running_var) must satisfy

    |r − truth| ≤ u·max(|truth|, tiny) + K·u32·S

* ``u = eps/2`` is the unit roundoff of r's dtype (``eps`` being
  ``torch.finfo(dtype).eps``, one ulp at 1): storing a value in that dtype
  costs up to half an ulp, and no more when the value is computed in float32
  and rounded once. ``tiny`` (the smallest normal number) covers float16's
  subnormals, whose spacing no longer shrinks with the value.
* ``K·u32·S`` is what computing the value in float32 may cost: ``u32 = 2^-24``,
  ``S`` the magnitude of the terms the result is made of, taken before they
  cancel (the condition of the computation, see :func:`_conditions`), and
  ``K = 32`` the float32 roundings allowed along the way. A float32 sum of n
  terms loses at most (its depth)·u32·Σ|terms|, a depth of ⌈log2 n⌉ ≤ 13
  here for pairwise or blocked summation, and each term brings a few roundings
  of its own (x − mean, products, the statistics it is made from): 32 leaves
  a factor of two over that. Measured on these cases, bnlab stays below
  1·u32·S and torch below 10·u32·S, while a mean kept in the half dtype misses
  the bound by ~60x on the large-mean cases below, and a float32 variance
  taken as E[x²] − E[x]² misses it on the running variance by 15x or more.

For half results the second term is mostly far below half an ulp (it comes
near only for float16 data with |mean|/std = 100), so the rule reads "the
float32 value, rounded once". For float32 results (parameter gradients
and running buffers in the ``float32`` setup) it is the float32 bound alone.

At least as close as torch: for each result, bnlab's mean error must not
exceed torch's times ``1 + SLACK``, plus ``u32·mean(S)``. Where both libraries
round a float32 value to the same grid, an element's error differs between
them only if a rounding boundary lies between their two float32 values (a few
u32·S apart), and then by at most twice that distance: averaged over the
elements this is of second order in u32·S, which ``SLACK = 1/64`` covers many
times over. The ``u32·mean(S)`` term (one float32 rounding of every term) is
for float32 results, whose errors in both libraries are summation-order
noise, neither more right than the other. The mean, not the max, is compared:
the largest error is the same half-ulp rounding step in either library.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bnlab.functional
import bnlab.nn

# The cases are small, where a second thread costs more than it gives (see the
# fixture); test_two_threads runs the widest ones with two.
pytestmark = pytest.mark.usefixtures("one_thread")

F32, F64 = torch.float32, torch.float64
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "f16"]
SETUPS = ["float32", "half"]
U32 = 2.0**-24  # float32 unit roundoff
K = 32  # float32 roundings allowed per result (module docstring)
SLACK = 1 / 64  # relative room over torch's mean error (module docstring)
MOMENTUM = 0.1
BN_EPS = 1e-5
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
CLASS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
BUFFERS = ["running_mean", "running_var"]
RESULTS = ["y", "dx", "dweight", "dbias", *BUFFERS]

# name -> (shape, channels_last)
LAYOUTS = {
    "NC": ((64, 120), False),
    "NC-wide": ((32, 4096), False),
    "NC-2": ((2, 7), False),  # two values per channel: xhat = ±1 and dx ≈ 0
    "NCL": ((16, 24, 50), False),
    "NCHW": ((8, 6, 14, 14), False),
    "NCHW-many": ((4, 48, 7, 7), False),
    "NCHW-odd": ((2, 3, 33, 17), False),
    "NCHW-cl": ((8, 6, 14, 14), True),
    "NCDHW": ((2, 5, 4, 6, 7), False),
    "NCDHW-cl": ((2, 5, 4, 6, 7), True),
}

# Data with a large mean: the half dtype still resolves x (float16: ulp 1/16 at
# 100; bfloat16: 1/4 to 1/2 at 64) while |mean|/std is large, so a mean kept in
# the half dtype is off by ~u·|mean|: 0.05 (float16) to 0.25 (bfloat16) std.
LARGE_MEAN = {torch.bfloat16: 64.0, torch.float16: 100.0}


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) tensor viewed to broadcast against x."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


# ---- building and running the three batch norms -------------------------------------------


def _data(shape, channels_last, dtype, mean=2.0, std=3.0):
    """x (of that mean and std) and a non-constant dy, in ``dtype`` and the layout asked for."""
    x = (torch.randn(shape, dtype=F64) * std + mean).to(dtype)
    dy = torch.randn(shape, dtype=F64).to(dtype)
    if channels_last:
        x, dy = (t.contiguous(memory_format=CL[len(shape)]) for t in (x, dy))
    return x, dy


def _state(c, mean=2.0, std=3.0):
    """Random affine parameters, and running statistics near the data's."""
    return {
        "weight": torch.randn(c, dtype=F64) * 0.5 + 1,
        "bias": torch.randn(c, dtype=F64),
        "running_mean": torch.randn(c, dtype=F64) * std / 4 + mean,
        "running_var": (torch.rand(c, dtype=F64) + 0.5) * std**2,
    }


def _modules(cls_name, c, dtype, setup, mean=2.0, std=3.0):
    """(bnlab, torch, truth) modules holding the same values.

    The truth copies what the other two hold (rounded to their dtypes), so the
    three compute from the same numbers.
    """
    state = _state(c, mean, std)
    pair = []
    for lib in (bnlab.nn, torch.nn):
        m = getattr(lib, cls_name)(c, eps=BN_EPS, momentum=MOMENTUM)
        with torch.no_grad():
            for name, value in state.items():
                getattr(m, name).copy_(value)
        pair.append(m.to(dtype) if setup == "half" else m)
    truth = getattr(torch.nn, cls_name)(c, eps=BN_EPS, momentum=MOMENTUM, dtype=F64)
    with torch.no_grad():
        for name in state:
            getattr(truth, name).copy_(getattr(pair[0], name))
    return pair[0], pair[1], truth


def _run(module, x, dy, train):
    """One forward and backward: every result of :data:`RESULTS`."""
    module.train(train)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": module.weight.grad,
        "dbias": module.bias.grad,
        **{name: getattr(module, name).detach().clone() for name in BUFFERS},
    }


def _trial(shape, channels_last, dtype, setup, train, mean=2.0, std=3.0):
    """bnlab's results, torch's, the truth and the conditions S, for one case."""
    x, dy = _data(shape, channels_last, dtype, mean, std)
    ours, theirs, truth = _modules(CLASS[len(shape)], shape[1], dtype, setup, mean, std)
    conditions = _conditions(x.double(), dy.double(), truth, train)
    exact = _run(truth, x.double(), dy.double(), train)
    return _run(ours, x, dy, train), _run(theirs, x, dy, train), exact, conditions


# ---- the tolerance rule -------------------------------------------------------------------


def _conditions(x, dy, truth, train):
    """S of every result (module docstring), in float64; call before ``truth`` runs.

    With a = (|x| + |mean|)·invstd + 1, the size of xhat before x − mean
    cancels (the + 1 for the error of the statistics themselves: a float32 mean
    is off by ~u32·mean|x| ≤ u32·(|mean| + std)), and the module's weight w,
    bias b, momentum m and running buffers r, v:

    * y = xhat·w + b:                           a·|w| + |b|
    * dx (batch statistics) = w·invstd·(dy − mean(dy) − xhat·mean(dy·xhat)):
                                                |w|·invstd·(|dy| + mean|dy| + a·mean(|dy|·a))
    * dx (running statistics) = w·invstd·dy:    |w|·invstd·|dy|
    * dbias = Σ dy,  dweight = Σ dy·xhat:       Σ|dy|,  Σ|dy|·a
    * running_mean ← (1 − m)·r + m·mean:        (1 − m)·|r| + m·mean|x|
    * running_var ← (1 − m)·v + m·var·n/(n − 1), var a mean of squares about
      the mean, or about any shift within the data's range:
                                                (1 − m)·|v| + m·n/(n − 1)·max (x − mean)²
    """
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.size(1)
    r, v = truth.running_mean.abs(), truth.running_var.abs()
    if train:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = truth.running_mean, truth.running_var
    invstd = (var + truth.eps).rsqrt()
    w, b = truth.weight.detach().abs(), truth.bias.detach().abs()
    a = (x.abs() + _per_channel(mean.abs(), x)) * _per_channel(invstd, x) + 1
    ady = dy.abs()
    dx = ady
    if train:
        dx = ady + _per_channel(ady.mean(dims), x) + a * _per_channel((ady * a).mean(dims), x)
    spread = (x - _per_channel(mean, x)).abs().amax(dims) ** 2
    m = truth.momentum
    return {
        "y": a * _per_channel(w, x) + _per_channel(b, x),
        "dx": dx * _per_channel(w * invstd, x),
        "dweight": (ady * a).sum(dims),
        "dbias": ady.sum(dims),
        "running_mean": (1 - m) * r + m * x.abs().mean(dims),
        "running_var": (1 - m) * v + m * n / max(n - 1, 1) * spread,
    }


def _bound(truth: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u·max(|truth|, tiny) + K·u32·S (module docstring)."""
    info = torch.finfo(dtype)
    return info.eps / 2 * truth.abs().clamp_min(info.tiny) + K * U32 * s


def _problems(ours, theirs, exact, conditions, names=RESULTS) -> list[str]:
    """Each way bnlab's results miss the bound or lose to torch's, as a readable line."""
    problems = []
    for name in names:
        truth, s = exact[name], conditions[name]
        err = (ours[name].double() - truth).abs()
        err_torch = (theirs[name].double() - truth).abs()
        bound = _bound(truth, s, ours[name].dtype)
        worst, worst_torch = (err / bound).max().item(), (err_torch / bound).max().item()
        if worst > 1:
            problems.append(
                f"{name}: max error {err.max().item():.3g} is {worst:.2f}x its bound "
                f"(torch: {err_torch.max().item():.3g}, {worst_torch:.2f}x)"
            )
        mean, mean_torch = err.mean().item(), err_torch.mean().item()
        if mean > (1 + SLACK) * mean_torch + U32 * s.mean().item():
            problems.append(f"{name}: mean error {mean:.3g}, torch's {mean_torch:.3g}")
    return problems


def _check(ours, theirs, exact, conditions, train):
    names = RESULTS if train else RESULTS[:4]
    problems = _problems(ours, theirs, exact, conditions, names)
    assert not problems, "\n".join(problems)
    if not train:  # running statistics are read, never written
        for name in BUFFERS:
            assert torch.equal(ours[name].double(), exact[name]), name


# ---- 1. parity with the truth, at least as close as torch ---------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_close_to_float64_truth(dtype, setup, train, layout):
    _check(*_trial(*LAYOUTS[layout], dtype, setup, train), train)


# ---- 2. a large mean: statistics that must not cancel -------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NCHW-cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_mean(dtype, setup, train, layout):
    (n, *rest), channels_last = LAYOUTS[layout]
    shape = (4 * n, *rest)  # longer sums: 6272 values per channel
    mean = LARGE_MEAN[dtype]
    _check(*_trial(shape, channels_last, dtype, setup, train, mean=mean, std=1.0), train)


@pytest.mark.parametrize("layout", ["NC-wide", "NCHW-cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_two_threads(dtype, layout):
    """Threads change only the order of float32 partial sums: the same rule holds."""
    (n, *rest), channels_last = LAYOUTS[layout]
    torch.set_num_threads(2)  # the one_thread fixture restores its own value afterwards
    _check(*_trial((4 * n, *rest), channels_last, dtype, "float32", True), True)


# ---- 3. dtypes and memory formats -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["NC", "NCL", "NCHW", "NCHW-cl", "NCDHW-cl"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_result_dtypes_and_layouts(dtype, setup, layout):
    """y and dx in x's dtype and strides; gradients and buffers in the module's dtype."""
    shape, channels_last = LAYOUTS[layout]
    x, dy = _data(shape, channels_last, dtype)
    ours, _, _ = _modules(CLASS[len(shape)], shape[1], dtype, setup)
    param_dtype = dtype if setup == "half" else F32
    for train in (True, False):
        out = _run(ours, x, dy, train)
        ours.zero_grad(set_to_none=True)
        for name in ("y", "dx"):
            assert out[name].dtype == dtype, name
            assert out[name].stride() == x.stride(), name
        for name in ("dweight", "dbias", *BUFFERS):
            assert out[name].dtype == param_dtype, name
    assert ours.weight.dtype == ours.bias.dtype == param_dtype
    assert ours.num_batches_tracked.dtype == torch.long


# ---- 4. CPU autocast: conv -> batch norm -> relu --------------------------------------------


def _autocast_step(bn, conv, x, g, dtype):
    """relu(bn(conv(x))) under autocast, forward and backward (output gradient g).

    Also returns the batch norm's input h and output gradient dy, for its truth.
    """
    conv, x = copy.deepcopy(conv), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        h = conv(x)
        h.retain_grad()
        y = bn(h)
        y.retain_grad()
        out = torch.relu(y)
    out.backward(g.to(out.dtype))
    return {
        "h": h.detach(),
        "dy": y.grad,
        "y": y.detach(),
        "dx": h.grad,
        "dweight": bn.weight.grad,
        "dbias": bn.bias.grad,
        **{name: getattr(bn, name).clone() for name in BUFFERS},
        "conv.weight": conv.weight.grad,
        "input": x.grad,
        "conv.weight.value": conv.weight.detach(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_autocast_forward_and_backward(dtype):
    """bnlab in a mixed-precision model (test_dtypes.py checks the bfloat16 forward alone).

    The batch norm against its truth and torch's by the rule above; the
    convolution's gradients against the model with torch.nn.BatchNorm2d.
    """
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x, g = torch.randn(4, 3, 10, 10), torch.randn(4, 8, 10, 10)
    ours_bn, theirs_bn, truth = _modules("BatchNorm2d", 8, dtype, "float32")
    ours = _autocast_step(ours_bn, conv, x, g, dtype)
    theirs = _autocast_step(theirs_bn, conv, x, g, dtype)
    assert ours["y"].dtype == theirs["y"].dtype == dtype
    assert ours["dx"].dtype == dtype and ours["dweight"].dtype == F32
    # Same conv and input: both batch norms see the same h, and (relu's mask on
    # the same signs) the same dy.
    assert torch.equal(ours["h"], theirs["h"]) and torch.equal(ours["dy"], theirs["dy"])
    h, dy = ours["h"].double(), ours["dy"].double()
    conditions = _conditions(h, dy, truth, True)
    _check(ours, theirs, _run(truth, h, dy, True), conditions, True)

    # Upstream, both models run the same low-precision conv backward on dx's
    # that differ by at most one ulp (each within half an ulp of the truth, up
    # to float32 noise): its results differ by at most one ulp of each term of
    # their sums, eps·Σ|term|, and by the rounding of each result, half an ulp
    # on either side: eps·|result|.
    eps = torch.finfo(dtype).eps
    dx_size = theirs["dx"].double().abs()
    w_size = ours["conv.weight.value"].to(dtype).double().abs()
    x_size = x.to(dtype).double().abs()
    term_sizes = {
        "conv.weight": torch.nn.grad.conv2d_weight(x_size, w_size.shape, dx_size, padding=1),
        "input": torch.nn.grad.conv2d_input(x_size.shape, w_size, dx_size, padding=1),
    }
    for name, size in term_sizes.items():
        diff = (ours[name].double() - theirs[name].double()).abs()
        bound = eps * size + eps * theirs[name].double().abs()
        assert (diff <= bound).all(), (name, (diff / bound).max().item())


# ---- 5. empty and two-value batches, functional ---------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 5, 5)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch(dtype, setup, train, shape):
    """Torch's (empty) results and zero gradients; the running statistics do not move."""
    ours, theirs, _ = _modules(CLASS[len(shape)], shape[1], dtype, setup)
    before = {name: getattr(ours, name).clone() for name in BUFFERS}
    x = torch.empty(shape, dtype=dtype)
    a, b = _run(ours, x, x, train), _run(theirs, x, x, train)
    for name in RESULTS:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
    for name in ("dweight", "dbias", *BUFFERS):
        assert torch.equal(a[name], b[name]), name
    for name in BUFFERS:
        assert torch.equal(a[name], before[name]), name
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()


def _run_functional(batch_norm, x, dy, params, buffers, train):
    """One forward and backward of a functional batch norm, as :func:`_run` returns it."""
    x = x.detach().clone().requires_grad_()
    weight, bias = (p.detach().clone().requires_grad_() for p in params)
    running_mean, running_var = (t.clone() for t in buffers)
    y = batch_norm(x, running_mean, running_var, weight, bias, train, MOMENTUM, BN_EPS)
    y.backward(dy)
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": weight.grad,
        "dbias": bias.grad,
        "running_mean": running_mean,
        "running_var": running_var,
    }


@pytest.mark.parametrize("layout", ["NC-2", "NCHW-cl"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional(dtype, setup, train, layout):
    """bnlab.functional.batch_norm by the same rule, against torch.nn.functional's."""
    shape, channels_last = LAYOUTS[layout]
    x, dy = _data(shape, channels_last, dtype)
    # The truth module holds the values (rounded to the setup's dtypes) in float64.
    _, _, truth = _modules(CLASS[len(shape)], shape[1], dtype, setup)
    tensors = [getattr(truth, name).detach() for name in ("weight", "bias", *BUFFERS)]
    held = [t.to(dtype if setup == "half" else F32) for t in tensors]
    conditions = _conditions(x.double(), dy.double(), truth, train)

    def run(batch_norm, x, dy, tensors):
        return _run_functional(batch_norm, x, dy, tensors[:2], tensors[2:], train)

    ours = run(bnlab.functional.batch_norm, x, dy, held)
    theirs = run(torch.nn.functional.batch_norm, x, dy, held)
    exact = run(torch.nn.functional.batch_norm, x.double(), dy.double(), tensors)
    _check(ours, theirs, exact, conditions, train)
