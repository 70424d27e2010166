"""The native CPU backend against the reference backend and against torch.

float64 results must agree with both to 1e-10 (the same sums in another
order). float32 results are measured against the float64 truth computed
from the same float32-representable inputs; the tolerances are derived
where they are used.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bnlab.nn
from bnlab import kernels
from bnlab.kernels import _build, _cpu_native, cpu, reference

from .conftest import compiled_training_matches_eager, count_calls, graph_targets

pytestmark = [
    pytest.mark.skipif(
        _build.native() is None, reason="native CPU kernels unavailable (no C++ compiler?)"
    ),
    pytest.mark.usefixtures("bnlab_kernels_only"),
]

F32, F64 = torch.float32, torch.float64
CL = {4: torch.channels_last, 5: torch.channels_last_3d}

# (shape, memory format) covering both traversals of the kernels: planes (inner
# >= 64, vector tails of every length) and periodic rows (channels_last, (N, C),
# short inner).
LAYOUTS = {
    "NC": ((37, 5), None),
    "NCL-short": ((6, 3, 5), None),
    "NCHW": ((5, 3, 9, 11), None),
    "NCHW-85": ((3, 4, 5, 17), None),
    "NCHW-cl": ((5, 3, 9, 11), "cl"),
    "NCDHW": ((3, 2, 5, 6, 7), None),
    "NCDHW-cl": ((3, 2, 5, 6, 7), "cl"),
    "NCHW-wide": ((4, 19, 8, 12), None),
    "NC-wide": ((9, 1001), None),
}


def _make(shape, fmt, dtype, mean=1.0, std=2.0):
    x = torch.randn(shape, dtype=F64) * std + mean
    x = x.to(dtype)
    if fmt == "cl":
        x = x.contiguous(memory_format=CL[x.dim()])
    return x


def _params(c, dtype):
    w = torch.rand(c, dtype=F64).add(0.5).to(dtype)
    b = torch.randn(c, dtype=F64).to(dtype)
    return w, b


# ---- the backend contract against the reference backend ---------------------------

CPU, REF = cpu.CPU, reference.REFERENCE


def _buffers(c, dtype=F64):
    return torch.rand(c, dtype=F64).to(dtype), torch.rand(c, dtype=F64).add(0.5).to(dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [True, False])
def test_contract_matches_reference_float64(layout, affine):
    shape, fmt = LAYOUTS[layout]
    c = shape[1]
    x = _make(shape, fmt, F64)
    w, b = _params(c, F64) if affine else (None, None)
    dy = torch.randn(shape, dtype=F64)
    ours_buffers, ref_buffers = _buffers(c), _buffers(c)
    for mine, ref in zip(ours_buffers, ref_buffers, strict=True):
        mine.copy_(ref)
    ours = CPU.forward_train(x, w, b, 1e-5, *ours_buffers, 0.3)
    ref = REF.forward_train(x, w, b, 1e-5, *ref_buffers, 0.3)
    for name, a, r in zip(("y", "stats"), ours, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=0, msg=name)
    for a, r in zip(ours_buffers, ref_buffers, strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=0, msg="running buffers")
    for name, a, r in zip(
        ("y", "stats"),
        CPU.forward_eval(x, w, b, *ref_buffers, 1e-5),
        REF.forward_eval(x, w, b, *ref_buffers, 1e-5),
        strict=True,
    ):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=0, msg=f"eval {name}")
    stats = ref[1]
    for batch_stats in (True, False):
        ours = CPU.backward(dy, x, w, stats, batch_stats)
        ref = REF.backward(dy, x, w, stats, batch_stats)
        for name, a, r in zip(("dx", "dweight", "dbias"), ours, ref, strict=True):
            torch.testing.assert_close(a, r, atol=1e-10, rtol=0, msg=name)


def test_parameters_of_another_dtype_or_strided():
    """Converted copies of weight and bias must live as long as the kernel reads them."""
    x = _make((6, 3, 8, 9), None, F32)
    w64, b64 = _params(3, F64)
    w = torch.empty(6, dtype=F64)[::2].copy_(w64)  # strided, float64
    ours = CPU.forward_train(x, w, b64, 1e-5, None, None, 0.1)
    ref = REF.forward_train(x, w64.float(), b64.float(), 1e-5, None, None, 0.1)
    torch.testing.assert_close(ours[0], ref[0], atol=F32_ATOL, rtol=0)
    dy = torch.randn_like(x)
    ours = CPU.backward(dy, x, w, ours[1], True)
    ref = REF.backward(dy.double(), x.double(), w64, ref[1].double(), True)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), r, atol=F32_ATOL * max(1.0, r.abs().max()), rtol=0)


def test_backends_implement_the_protocol_whole():
    for backend in (CPU, REF):
        assert isinstance(backend, kernels.Backend), backend.name


def test_backend_selection():
    assert kernels.select(torch.randn(4, 3)) is CPU
    assert kernels.select(torch.randn(4, 3, dtype=F64)) is CPU
    assert kernels.select(torch.randn(4, 3).half()) is CPU
    assert kernels.select(torch.randn(4, 3).bfloat16()) is CPU
    assert kernels.select(torch.randn(4, 3, dtype=torch.complex64)) is REF
    assert kernels.select(torch.randn(0, 3)) is REF
    assert kernels.available() == ["cpu", "triton", "reference"]


# ---- modules against torch.nn ----------------------------------------------------------


def _module_pair(shape, affine, dtype, momentum=0.1):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    ours = getattr(bnlab.nn, cls)(shape[1], affine=affine, momentum=momentum, dtype=dtype)
    theirs = getattr(torch.nn, cls)(shape[1], affine=affine, momentum=momentum, dtype=F64)
    if affine:
        w, b = _params(shape[1], F64)
        with torch.no_grad():
            ours.weight.copy_(w)
            ours.bias.copy_(b)
            theirs.weight.copy_(w)
            theirs.bias.copy_(b)
    return ours, theirs


def _step(module, x, dy, train):
    module.train(train)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad]
    if module.weight is not None:
        grads += [module.weight.grad.clone(), module.bias.grad.clone()]
        module.weight.grad = module.bias.grad = None
    return y.detach(), grads


def _compare_with_torch(shape, fmt, affine, dtype, atol, momentum=0.1, mean=1.0):
    """Train, train, eval steps of bnlab (dtype) and torch (float64 on the same values)."""
    ours, theirs = _module_pair(shape, affine, dtype, momentum)
    for train in (True, True, False):
        x = _make(shape, fmt, dtype, mean=mean)
        dy = torch.randn(shape, dtype=F64).to(dtype)
        y, grads = _step(ours, x, dy, train)
        y_ref, grads_ref = _step(theirs, x.double(), dy.double(), train)
        torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=0)
        for g, r in zip(grads, grads_ref, strict=True):
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(g.double(), r, atol=atol * scale, rtol=0)
        for name in ("running_mean", "running_var"):
            a, r = getattr(ours, name), getattr(theirs, name)
            torch.testing.assert_close(a.double(), r, atol=atol * max(1.0, mean), rtol=0, msg=name)
    return ours


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [True, False])
def test_module_matches_torch_float64(layout, affine):
    shape, fmt = LAYOUTS[layout]
    _compare_with_torch(shape, fmt, affine, F64, atol=1e-10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_float64(momentum):
    shape, fmt = LAYOUTS["NCHW"]
    ours = _compare_with_torch(shape, fmt, True, F64, atol=1e-10, momentum=momentum)
    assert ours.num_batches_tracked.item() == 2


# float32: every value passes through a handful of float32 roundings (input
# of the statistics, the split mean, scale and shift), each ≤ 2^-24 relative,
# and sums are carried in float64 after at most 32 float32 additions per
# lane. At unit scale that is ~1e-6 at worst; 1e-5 (of the result's scale for
# gradients and running stats) leaves room and is what torch's own float32
# path meets on these sizes.
F32_ATOL = 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [True, False])
def test_module_float32_close_to_float64_truth(layout, affine):
    shape, fmt = LAYOUTS[layout]
    _compare_with_torch(shape, fmt, affine, F32, atol=F32_ATOL)


@pytest.mark.parametrize("layout", ["NCHW", "NCHW-cl", "NC"])
def test_large_mean_float32(layout):
    """mean 1e3, std 1: no cancellation (shifted sums, split mean), float32 tolerance kept.

    A float32 mean alone would be off by up to 2^-14 ≈ 6e-5 at 1e3 (half an
    ulp), which the normalized output would show in full; the kernels keep the
    mean in float64 (and split in two floats) instead.
    """
    shape, fmt = LAYOUTS[layout]
    shape = (shape[0] * 8, *shape[1:])
    ours, theirs = _module_pair(shape, True, F32)
    x = (torch.randn(shape, dtype=F64) + 1e3).float()
    if fmt == "cl":
        x = x.contiguous(memory_format=CL[x.dim()])
    dy = torch.randn(shape).float()
    y, grads = _step(ours, x, dy, True)
    y_ref, grads_ref = _step(theirs, x.double(), dy.double(), True)
    torch.testing.assert_close(y.double(), y_ref, atol=F32_ATOL, rtol=0)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g.double(), r, atol=F32_ATOL * max(1.0, r.abs().max()), rtol=0)
    # running_mean ≈ 0.1·1e3: float32 resolution there is ~8e-6.
    torch.testing.assert_close(ours.running_mean.double(), theirs.running_mean, atol=2e-5, rtol=0)
    torch.testing.assert_close(ours.running_var.double(), theirs.running_var, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "inner_shape, fmt, dtype",
    [
        ((5, 229, 231), None, F32),  # planes of odd length: aligned and unaligned stores
        ((5, 229, 231), "cl", F32),
        ((517,), None, F32),
        ((5, 229, 231), None, F64),
    ],
    ids=["NCHW", "NCHW-cl", "NC", "NCHW-float64"],
)
def test_outputs_written_around_the_caches(inner_shape, fmt, dtype):
    """Outputs above the kernels' STREAM_BYTES take non-temporal stores: same numbers."""
    per_row = dtype.itemsize * torch.Size(inner_shape).numel()
    rows = _build.native().STREAM_BYTES // per_row + 1
    shape = (rows, *inner_shape)
    assert per_row * rows > _build.native().STREAM_BYTES
    _compare_with_torch(shape, fmt, True, dtype, atol=F32_ATOL if dtype == F32 else 1e-10)


# ---- layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_in_channels_last_out(dim, train):
    shape = (3, 4, 5, 6) if dim == 4 else (2, 4, 3, 5, 6)
    fmt = CL[dim]
    m = (bnlab.nn.BatchNorm2d if dim == 4 else bnlab.nn.BatchNorm3d)(4).train(train)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    y = m(x)
    assert y.is_contiguous(memory_format=fmt)
    y.backward(torch.randn(shape).contiguous(memory_format=fmt))
    assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.transpose(2, 3),  # dense, permuted
        lambda t: t[:, :, ::2, 1:],  # strided slice
        lambda t: t.transpose(0, 1)[:3].transpose(0, 1),  # channel slice
    ],
    ids=["transposed", "sliced", "channel-slice"],
)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_non_contiguous_input(view, dtype):
    base = torch.randn(4, 5, 6, 7, dtype=F64).to(dtype)
    x = view(base)
    ours, theirs = _module_pair(tuple(x.shape), True, dtype)
    dy = view(torch.randn(base.shape, dtype=F64).to(dtype))  # also non-contiguous
    atol = 1e-10 if dtype == F64 else F32_ATOL
    for train in (True, False):
        y, grads = _step(ours, x, dy, train)
        y_ref, grads_ref = _step(theirs, x.double(), dy.double(), train)
        torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=0)
        for g, r in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g.double(), r, atol=atol * max(1.0, r.abs().max()), rtol=0)


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_path_matches_graph_path(train):
    """Without a graph to record the backend is called directly; same numbers, same buffers."""
    x = _make((8, 3, 5, 5), None, F32)
    a, b = bnlab.nn.BatchNorm2d(3).train(train), bnlab.nn.BatchNorm2d(3).train(train)
    for m in (a, b):
        m.running_var.fill_(2.0)
    with torch.no_grad():
        ya = a(x)
    yb = b(x)
    assert yb.requires_grad and not ya.requires_grad
    torch.testing.assert_close(ya, yb.detach(), atol=0, rtol=0)
    torch.testing.assert_close(a.running_var, b.running_var, atol=0, rtol=0)


def test_expanded_gradient():
    """y.sum().backward() hands backward a stride-0 dy."""
    x = torch.randn(4, 3, 5, 5, dtype=F64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    bnlab.nn.BatchNorm2d(3, dtype=F64)(x).square().sum().backward()
    torch.nn.BatchNorm2d(3, dtype=F64)(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-10, rtol=0)


def test_buffers_the_kernel_cannot_write():
    """Strided running buffers: the update runs as torch ops, with the same result."""
    x = torch.randn(8, 3, 4, 4, dtype=F64)
    rm, rv = torch.zeros(6, dtype=F64)[::2], torch.ones(6, dtype=F64)[::2]
    rm_ref, rv_ref = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    y = bnlab.functional.batch_norm(x, rm, rv, training=True, momentum=0.3)
    y_ref = torch.nn.functional.batch_norm(x, rm_ref, rv_ref, training=True, momentum=0.3)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(rm, rm_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(rv, rv_ref, atol=1e-12, rtol=0)


# ---- threads -------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# Each split of the work over two threads (cpu_kernels.cpp's split_of), with a
# shape that takes it: (shape, memory format, the split at 2 threads).
SPLITS = {
    "planes-by-channel": ((16, 6, 32, 32), None, "planes by channel"),
    "planes-by-element": ((16, 3, 48, 48), None, "planes by element"),
    # Planes in groups (plane_groups.h; by channel where the build has no lane
    # permutation): 7x7, and 10x10 from 16 images (the forward's in every
    # dtype, float32's backward), 1 of each thread's 65 channels after its
    # last whole group of 4.
    "wide-7x7-planes": ((16, 96, 7, 7), None, "planes by channel in groups"),
    "10x10-planes-in-groups": ((16, 130, 10, 10), None, "planes by channel in groups"),
    "rows-by-row": ((64, 16, 16, 16), "cl", "rows by row"),
    "rows-by-row-tail": ((13109, 5), None, "rows by row"),
    "rows-by-column": ((64, 2048), None, "rows by column"),
    "rows-by-column-inner3": ((64, 512, 3), None, "rows by column"),
    "rows-by-column-cl": ((8, 1024, 3, 3), "cl", "rows by column"),
    # Large enough for the paths memory-bound tensors take: the next channel's
    # 14x14 runs fetched ahead (over 2 MiB; the training forward takes them in
    # groups); 512-byte rows streamed by the sums
    # (a thread's share over 1 MiB in 16 bits) and, over 8 MiB, by inference
    # row by row; wide rows summed four at a time with the next four fetched.
    "planes-fetched-ahead": ((16, 512, 14, 14), None, "planes by channel in groups"),
    "rows-streamed-cl": ((40, 256, 16, 16), "cl", "rows by row"),
    "wide-rows-by-row": ((1024, 1024), None, "rows by row"),
    # Over STREAM_BYTES in every dtype, with runs of 299 values (598 to 2392
    # bytes) at every alignment: each run's whole lines streamed, its part
    # lines at both ends written with ordinary stores.
    "planes-streamed-short-runs": ((224, 64, 13, 23), None, "planes by channel"),
    # Rows wide enough that the elementwise passes go two rows at a time (in
    # every pass: 2069 columns' coefficients outgrow half an L1 cache even
    # uncentered), over 2 MiB in every dtype, with an odd row count (one row
    # left alone), a whole vector past the last group of a cache line in 16
    # bits, and five columns past the last whole vector.
    "wide-rows-in-pairs": ((521, 2069), None, "rows by row"),
    # Float32 inference over 8 MiB whose 225-value runs are not whole vectors:
    # one range of elements, vectors straddling planes (float64 streams it).
    "planes-misaligned-by-range": ((48, 200, 15, 15), None, "planes by channel"),
}
STREAMED_SPLIT = "planes-streamed-short-runs"
HALF = (torch.bfloat16, torch.float16)


def _split_tolerance(dtype: torch.dtype, scale: float) -> float:
    """Error bound against the float64 truth for results stored in ``dtype``.

    16-bit results are float32 values rounded once: half an ulp (eps/2
    relative) plus the float32 computation's error, far below the other
    half. float32 results: sums of up to 16 float32 terms per lane before
    the float64 carry, then a few float32 operations: 2^-18 relative is 4×
    that worst case. float64: the same sums in another order.
    """
    if dtype in HALF:
        return torch.finfo(dtype).eps * scale
    return (2**-18 if dtype == F32 else 1e-12) * scale


def _close_to_truth(name, got, truth, dtype):
    scale = max(1.0, truth.abs().max().item())
    err = (got.double() - truth).abs().max().item()
    assert err <= _split_tolerance(dtype, scale), (name, dtype, err, scale)


@pytest.mark.parametrize("case", list(SPLITS))
def test_each_split_is_chosen_where_it_pays(case):
    shape, fmt, split = SPLITS[case]
    if not _build.native().PLANE_GROUPS:
        split = split.removesuffix(" in groups")
    x = _make(shape, fmt, F32)
    assert _cpu_native.plan(x, threads=2) == (split, 2)
    # One thread owns everything: planes go channel by channel.
    if split.startswith("planes"):
        by_channel = split if split.endswith("in groups") else "planes by channel"
        assert _cpu_native.plan(x, threads=1) == (by_channel, 1)


def test_streamed_split_is_streamed_in_every_dtype():
    shape = SPLITS[STREAMED_SPLIT][0]
    smallest = torch.Size(shape).numel() * torch.bfloat16.itemsize
    assert smallest >= _build.native().STREAM_BYTES


def test_small_calls_run_on_one_thread():
    assert _cpu_native.plan(torch.randn(64, 6, 8, 8), threads=16) == ("planes by channel", 1)
    assert _cpu_native.plan(torch.randn(64, 120), threads=16)[1] == 1


@pytest.mark.parametrize("case", list(SPLITS))
@pytest.mark.parametrize("dtype", [F64, F32, *HALF], ids=str)
def test_every_split_and_dtype_matches_the_float64_truth(case, dtype, restore_threads):
    """Each split, on one thread and two, in every dtype: forward, backward, eval.

    Statistics come back in float64, the parameter gradients in the compute
    dtype; both are checked against the truth at float32's bound.
    """
    shape, fmt, _ = SPLITS[case]
    x = _make(shape, fmt, dtype)
    dy = _make(shape, fmt, dtype, mean=0.5, std=1.0)
    param = _cpu_native.compute_dtype(dtype)
    w, b = _params(shape[1], param)
    rm, rv = _buffers(shape[1], F32)
    x64, dy64, w64, b64 = x.double(), dy.double(), w.double(), b.double()
    mean, var = reference.batch_stats(x64)
    invstd = torch.rsqrt(var + 1e-5)
    y_truth = reference.normalize(x64, mean, invstd, w64, b64)
    dx_truth, dw_truth, db_truth = reference.backward(dy64, x64, w64, mean, invstd, True)
    eval_invstd = torch.rsqrt(rv.double() + 1e-5)
    eval_truth = reference.normalize(x64, rm.double(), eval_invstd, w64, b64)
    wide = F64 if dtype == F64 else F32
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, stats, _ = _cpu_native.forward_train(x, w, b, 1e-5)
        dx, dw, db = _cpu_native.backward(dy, x, w, stats, True)
        y_eval, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5)
        assert y.dtype == dx.dtype == y_eval.dtype == dtype and dw.dtype == param
        assert y.stride() == dx.stride() == y_eval.stride() == x.stride()
        for name, got, truth, kind in (
            ("y", y, y_truth, dtype),
            ("dx", dx, dx_truth, dtype),
            ("eval y", y_eval, eval_truth, dtype),
            ("mean", stats[0], mean, wide),
            ("invstd", stats[1], invstd, wide),
            ("dweight", dw, dw_truth, wide),
            ("dbias", db, db_truth, wide),
        ):
            _close_to_truth(f"{name}, {threads} threads", got, truth, kind)


# ---- without the native kernels -----------------------------------------------------------


def test_reference_fallback_when_kernels_unavailable(monkeypatch):
    """A failed build warns once and leaves every input to the reference backend."""
    monkeypatch.setattr(_build, "_module", _build._UNSET)
    monkeypatch.setattr(_build, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="reference backend"):
        assert not CPU.supports(torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert kernels.select(torch.randn(4, 3)) is REF
    _compare_with_torch((6, 3, 4, 5), None, True, F64, atol=1e-10)


def test_reference_backend_by_environment(monkeypatch):
    monkeypatch.setattr(_build, "_module", _build._UNSET)
    monkeypatch.setattr(_build, "ENABLED", False)
    assert kernels.select(torch.randn(4, 3)) is REF


# ---- torch.compile ---------------------------------------------------------------------------


def test_compile_fullgraph_uses_the_kernels():
    """aot_eager captures forward and backward through the custom ops."""
    seen, backend = graph_targets()
    compiled_training_matches_eager()
    captured = torch.compile(bnlab.nn.BatchNorm2d(3), fullgraph=True, backend=backend)
    captured(torch.randn(4, 3, 5, 5))
    assert any("bnlab.cpu_forward_train" in t for t in seen), sorted(seen)


# ---- one path: with or without a graph, the same backend op -------------------------


def _count_backend_calls(monkeypatch) -> list[tuple]:
    return count_calls(monkeypatch, cpu, "eager_forward_train")


@pytest.mark.parametrize("layout", ["NC", "NCL-short", "NCHW", "NCHW-cl", "NCDHW-cl"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "kwargs", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}]
)
def test_graph_and_no_graph_calls_agree(layout, dtype, kwargs, monkeypatch):
    """Bit for bit: a call that records no graph reaches the same kernel as one that does."""
    shape, fmt = LAYOUTS[layout]
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    graph = getattr(bnlab.nn, cls)(shape[1], dtype=dtype, **kwargs)
    no_graph = getattr(bnlab.nn, cls)(shape[1], dtype=dtype, **kwargs)
    calls = _count_backend_calls(monkeypatch)
    for _ in range(2):
        x = _make(shape, fmt, dtype)
        y = graph(x.requires_grad_())
        with torch.no_grad():
            y_no_graph = no_graph(x)
        assert y.requires_grad and not y_no_graph.requires_grad
        assert y.stride() == y_no_graph.stride()
        torch.testing.assert_close(y.detach(), y_no_graph, atol=0, rtol=0)
    assert len(calls) == 4
    for a, b in zip(graph.buffers(), no_graph.buffers(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _uncommon_cases():
    """(name, module, input): inputs the kernels do not read as they are."""
    m = bnlab.nn.BatchNorm2d
    x = torch.randn(4, 3, 5, 5)
    double_weight = m(3)
    double_weight.weight.data = double_weight.weight.data.double()
    strided_buffer = m(3)
    strided_buffer.running_mean = torch.zeros(6)[::2]
    tensor_momentum = m(3)
    tensor_momentum.momentum = torch.tensor(0.2)
    return [
        ("float16 input", m(3, dtype=torch.float16), x.half()),
        ("weight of another dtype", double_weight, x),
        ("strided running buffer", strided_buffer, x),
        ("tensor momentum", tensor_momentum, x),
        ("transposed input", m(3), x.transpose(2, 3)),
        ("empty batch", m(3), torch.randn(0, 3, 5, 5)),
    ]


@pytest.mark.parametrize("case", range(len(_uncommon_cases())))
@pytest.mark.parametrize("train", [True, False])
def test_uncommon_cases_match_the_reference_backend(case, train, monkeypatch):
    name, module, x = _uncommon_cases()[case]
    _, reference_module, _ = _uncommon_cases()[case]
    y = module.train(train)(x)
    monkeypatch.setattr(kernels, "_FAST", ())
    y_ref = reference_module.train(train)(x)
    atol = 1e-3 if x.dtype == torch.float16 else 1e-6
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0, msg=name)
    for a, r in zip(module.buffers(), reference_module.buffers(), strict=True):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("train", [True, False])
def test_double_backward_through_the_kernels(train, monkeypatch):
    calls = _count_backend_calls(monkeypatch)
    m = bnlab.nn.BatchNorm2d(3, dtype=F64).train(train)
    with torch.no_grad():
        m.running_var.fill_(1.5)
        m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    buffers = [b.clone() for b in m.buffers()]

    def fn(x, w, b):
        # Buffers restored: each evaluation sees the same running statistics.
        for buf, saved in zip(m.buffers(), buffers, strict=True):
            buf.copy_(saved)
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))

    args = (x, m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradgradcheck(fn, args)
    assert len(calls) > 0 or not train


# ---- 16-bit conversions ------------------------------------------------------------------


def _identity_eval(x):
    """Eval with mean 0, variance 1, eps 0: y is x, widened and rounded back."""
    return _cpu_native.forward_eval(x, None, None, torch.zeros(1), torch.ones(1), 0.0, False)[0]


@pytest.fixture(scope="module")
def portable_kernels(tmp_path_factory):
    """The kernels built without -march flags: the bit-arithmetic 16-bit conversions that a
    CPU without F16C or AVX512-BF16 runs."""
    from bnlab import native

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNLAB_CACHE_DIR", str(tmp_path_factory.mktemp("portable")))
        mp.setattr(native, "_VARIANTS", [["-fopenmp"], []])
        module = _build.BATCH_NORM.build(native.find_compiler())
    assert module is not None
    return module


@pytest.mark.parametrize("build", ["portable_kernels", "avx_kernels", "avx2_kernels"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_other_builds_conversions_round_to_nearest_even_as_torch(
    dtype, build, request, monkeypatch
):
    """Every 16-bit value round-trips; values between two 16-bit ones round as torch's
    .to(): through the portable bit arithmetic in 4 lanes and in 8 (AVX without AVX2),
    and AVX2's 8-lane narrowing (F16C's vcvtps2ph; for bfloat16 bit arithmetic and a
    pack of words)."""
    monkeypatch.setattr(_build, "_module", request.getfixturevalue(build))
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    x = bits.view(1, 1, -1)
    y = _identity_eval(x)
    keep = ~x.isnan() & (x != 0)
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y.view(torch.int16)[keep], x.view(torch.int16)[keep])
    _assert_ties_round_to_even(dtype)


def _assert_ties_round_to_even(dtype):
    """y = x*1.5 is exact in float32 and needs one bit more than the 16-bit type holds, so
    about half the values are ties between two neighbours: narrowed to nearest even. The
    run is long (4096 values), so it goes through the pairs of vectors where the type has
    them (bfloat16's vcvtne2ps2bf16), and through the single vectors at its end."""
    for n in (4096, 4096 + 17):
        wide = torch.randn(1, 1, n) * 100
        s = torch.tensor([1.5])
        y = _cpu_native.forward_eval(wide.to(dtype), s, None, torch.zeros(1), torch.ones(1), 0.0,
                                     False)[0]  # fmt: skip
        expected = (wide.to(dtype).float() * s).to(dtype)
        assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_native_conversions_round_ties_to_even_as_torch(dtype):
    _assert_ties_round_to_even(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_every_16_bit_value_converts_both_ways(dtype):
    """Eval with mean 0, variance 1, eps 0 is the identity: each of the 65536 bit patterns
    must come back as it went in (the widening and the rounding back are exact inverses).

    Exceptions: NaNs stay NaN (payloads may change), -0 may come back +0 (x - 0 + 0), and
    AVX512-BF16's vcvtneps2bf16, where the CPU has it, flushes bfloat16 subnormals to zero.
    """
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).view(1, 1, -1)
    y = _identity_eval(x)
    assert torch.equal(y.isnan(), x.isnan())
    changed = (y.view(torch.int16) != x.view(torch.int16)) & ~x.isnan() & (x != 0)
    if dtype == torch.bfloat16:
        subnormal = x.abs() < torch.finfo(dtype).tiny
        assert torch.equal(y[changed & subnormal], torch.zeros_like(y[changed & subnormal]))
        changed &= ~subnormal
    assert not changed.any(), x[changed][:8]


def _inference_case(shape, fmt, dtype, far):
    """x near zero or far from it (mean 1e3, std 1), parameters, running buffers
    near x's mean, and inference's float64 truth."""
    c = shape[1]
    offset = 1e3 if far else 0.0
    x = _make(shape, fmt, dtype, mean=offset, std=1.0)
    w, b = _params(c, F32)
    rm = (torch.rand(c, dtype=F64) * 0.5 + offset).float()
    rv = torch.rand(c, dtype=F64).add(0.5).float()
    invstd = torch.rsqrt(rv.double() + 1e-5)
    truth = reference.normalize(x.double(), rm.double(), invstd, w.double(), b.double())
    return x, w, b, rm, rv, truth


@pytest.mark.parametrize(
    "shape, fmt", [((40, 256, 16, 16), "cl"), ((64, 2048), None)], ids=["cl-512B-rows", "NC-wide"]
)
@pytest.mark.parametrize("far", [False, True], ids=["near-zero", "far-from-zero"])
def test_inference_rows_keep_float32_accuracy_near_and_far_from_zero(shape, fmt, far):
    """Rows taken one by one use y = x*s + (beta - mean*s) when every channel's
    |mean|*invstd is at most 1, and the centered (x - mh)*s + b otherwise: the
    uncentered form far from zero (mean 1e3, std 1) would be off by about
    1e3 * 2^-24 * |w|, several times the bound; near zero both hold it."""
    x, w, b, rm, rv, truth = _inference_case(shape, fmt, F32, far)
    y, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5, False)
    _close_to_truth("eval y", y, truth, F32)


@pytest.mark.parametrize("far_channel", [0, 1029, 2047])
def test_one_channel_far_from_zero_keeps_the_centered_form(far_channel):
    """The check that picks the uncentered form looks at every channel: one
    channel far from zero (mean 1e3), wherever it sits among 2048, keeps the
    centered form, and that channel its float32 accuracy."""
    shape = (64, 2048)
    x = _make(shape, None, F32, mean=0.0, std=1.0)
    x[:, far_channel] += 1e3
    w, b = _params(shape[1], F32)
    rm = (torch.rand(shape[1], dtype=F64) * 0.5).float()
    rm[far_channel] += 1e3
    rv = torch.rand(shape[1], dtype=F64).add(0.5).float()
    y, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5, False)
    invstd = torch.rsqrt(rv.double() + 1e-5)
    truth = reference.normalize(x.double(), rm.double(), invstd, w.double(), b.double())
    _close_to_truth("eval y", y[:, far_channel], truth[:, far_channel], F32)


# (inner shape, channels, inference's traversal; None: whichever the CPU allows)
STREAMED_EVAL = {
    "7x7-rows": ((7, 7), 8, "rows by row"),
    "7x7-groups": ((7, 7), 128, None),
    "13x23": ((13, 23), 8, None),
    "229x231": ((229, 231), 8, None),
}


@pytest.mark.parametrize("case", list(STREAMED_EVAL))
@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_streamed_inference_matches_the_float64_truth(case, dtype):
    """Above STREAM_EVAL_BYTES, inference writes around the caches: 7×7 planes of
    8 channels as periodic rows (a 392-value period); of 128 channels in groups of
    16 planes where the CPU permutes lanes (16-bit; float32 of that size goes by
    range), else as one range of aligned vectors, blending two planes'
    coefficients where a vector straddles them, as for 13×23 float32 planes; and
    16-bit planes of 512 bytes or more run by run, each run's whole lines
    streamed and its part lines at both ends stored (13×23 runs are 598 bytes);
    13×23 and 229×231 planes start at every alignment."""
    inner_shape, c, traversal = STREAMED_EVAL[case]
    per_image = dtype.itemsize * c * torch.Size(inner_shape).numel()
    x = _make((_build.native().STREAM_EVAL_BYTES // per_image + 1, c, *inner_shape), None, dtype)
    if traversal is not None:
        assert _cpu_native.inference_plan(x)[0] == traversal
    if case == "7x7-groups":
        grouped = dtype in HALF and _build.native().PLANE_GROUPS
        assert _cpu_native.inference_plan(x)[0] == (
            "planes in groups" if grouped else "planes by range"
        )
    w, b = _params(c, F32)
    rm, rv = _buffers(c, F32)
    y, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5, False)
    truth = reference.normalize(
        x.double(), rm.double(), torch.rsqrt(rv.double() + 1e-5), w.double(), b.double()
    )
    _close_to_truth("eval y", y, truth, dtype)


# Inference over planes shorter than 64 values that are not whole vectors goes
# in groups of G planes, G*inner values being whole vectors, each vector's
# coefficients permuted from the group's G channels (plane_groups.h); so do the
# training forward and the backward, a thread's channels G at a time.
# G = LANES / gcd(inner, LANES): 16 lanes (AVX-512) group 7x7 planes 16 at a
# time and 6x6 ones 4; 8 lanes (AVX2) 8 and 2. The shapes have groups that wrap
# past the last channel (C not a multiple of G) and planes left after the last
# whole group, or neither.
GROUPED = {
    "7x7-wrapping-12-left": (3, 100, 7, 7),
    "6x6-one-left": (5, 333, 6, 6),
    "5x5-whole-groups": (4, 176, 5, 5),
    "3x7-wrapping": (7, 205, 3, 7),
    # More images than a block of sums (kBlock = 16) takes in float32: the
    # sums go down the images in three blocks, one of them short.
    "6x6-three-image-blocks": (40, 122, 6, 6),
    # Beyond L2 (2 MiB) and not streamed (under 8 MiB) in every dtype: the
    # sums fetch every image's next positions ahead.
    "7x7-beyond-L2": (24, 1000, 7, 7),
}


def _group_planes(inner: int) -> int:
    lanes = _build.native().LANES
    return lanes // math.gcd(inner, lanes)


def _grouped_traversal():
    return "planes in groups" if _build.native().PLANE_GROUPS else "planes by range"


@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_short_planes_go_in_groups_where_the_cpu_permutes_lanes(dtype):
    for shape in GROUPED.values():
        x = _make(shape, None, dtype)
        assert _group_planes(shape[2] * shape[3]) > 1 and shape[1] * shape[2] * shape[3] > 4096
        assert _cpu_native.inference_plan(x, threads=2)[0] == _grouped_traversal(), shape


def test_groups_are_not_taken_where_they_lose():
    """float64 (16 doubles are two registers: no one-instruction permutation),
    whole-vector planes (4x4: a group would be one vector), and float32 of
    STREAM_BYTES or more stay by range."""
    big = _build.native().STREAM_BYTES // (4 * 2048 * 49) + 1
    for shape, dtype in (
        ((3, 100, 7, 7), F64),
        ((16, 1024, 4, 4), F32),
        ((16, 1024, 4, 4), torch.float16),
        ((big, 2048, 7, 7), F32),
    ):
        assert _cpu_native.inference_plan(torch.empty(shape, dtype=dtype))[0] == "planes by range"
    assert _cpu_native.inference_plan(torch.empty(big, 2048, 7, 7, dtype=torch.float16))[0] == (
        _grouped_traversal()
    )


def test_training_takes_longer_planes_in_groups_from_16_images():
    """The training forward groups planes of 64 values or more whose group is
    under 64 vectors (10x10, 14x14: 4 planes, 25 or 49 vectors) from 16 images,
    where they measured faster (the backward too, in float32); with fewer
    images, in float64, in inference and where a group would be 64 vectors or
    more (15x15: 16 planes) they go a run at a time or by range. Short planes
    group at any batch size."""
    grouped = "planes by channel in groups" if _build.native().PLANE_GROUPS else "planes by channel"
    for shape, dtype, split in (
        ((16, 512, 14, 14), F32, grouped),
        ((16, 256, 10, 10), F32, grouped),
        ((64, 512, 14, 14), torch.bfloat16, grouped),
        ((16, 512, 14, 14), torch.float16, grouped),
        ((15, 512, 14, 14), F32, "planes by channel"),
        ((15, 512, 14, 14), torch.float16, "planes by channel"),
        ((64, 512, 15, 15), F32, "planes by channel"),
        ((64, 512, 14, 14), F64, "planes by channel"),
        ((2, 512, 7, 7), F32, grouped),
        ((2, 512, 7, 7), torch.bfloat16, grouped),
    ):
        x = torch.empty(shape, dtype=dtype)
        assert _cpu_native.plan(x, threads=2)[0] == split, (shape, dtype)
    x = torch.empty(16, 512, 14, 14)
    assert _cpu_native.inference_plan(x, threads=2)[0] != "planes in groups"


@pytest.mark.parametrize("case", list(GROUPED))
@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
@pytest.mark.parametrize("far", [False, True], ids=["near-zero", "far-from-zero"])
def test_grouped_planes_match_the_float64_truth(case, dtype, far, restore_threads):
    """Inference: near zero every channel's |mean|*invstd is at most 1 and the
    groups run y = x*s + (beta - mean*s); far from it (mean 1e3, std 1) they
    keep the centered form, whose float32 accuracy the bound checks. Training
    and the backward (with batch and with running statistics): each thread's
    channels G at a time, the last fewer than G a run at a time."""
    shape = GROUPED[case]
    c = shape[1]
    x, w, b, rm, rv, truth = _inference_case(shape, None, dtype, far)
    mean, var = reference.batch_stats(x.double())
    train_truth = reference.normalize(
        x.double(), mean, torch.rsqrt(var + 1e-5), w.double(), b.double()
    )
    dy = _make(shape, None, dtype, mean=0.5, std=1.0)
    batch_invstd = torch.rsqrt(var + 1e-5)
    running_invstd = torch.rsqrt(rv.double() + 1e-5)
    grad_cases = (
        (True, torch.stack([mean, batch_invstd]), (mean, batch_invstd)),
        (False, torch.stack([rm.double(), running_invstd]), (rm.double(), running_invstd)),
    )
    moved_mean, moved_var = rm.double(), rv.double()
    reference.update_running_stats(moved_mean, moved_var, mean, var, 0.1, x.numel() // c)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5, False)
        _close_to_truth(f"eval y, {threads} threads", y, truth, dtype)
        # Every channel's running buffers move once (statistics at float32's bound).
        run_mean, run_var = rm.double(), rv.double()
        y, _, _ = _cpu_native.forward_train(x, w, b, 1e-5, run_mean, run_var, 0.1)
        _close_to_truth(f"training y, {threads} threads", y, train_truth, dtype)
        _close_to_truth("running mean", run_mean, moved_mean, F32)
        _close_to_truth("running var", run_var, moved_var, F32)
        for batch_stats, stats, stats64 in grad_cases:
            dx, dw, db = _cpu_native.backward(dy, x, w, stats, batch_stats)
            dx_truth, dw_truth, db_truth = reference.backward(
                dy.double(), x.double(), w.double(), *stats64, batch_stats
            )
            _close_to_truth(f"dx, {threads} threads, {batch_stats}", dx, dx_truth, dtype)
            _close_to_truth("dweight", dw, dw_truth, F32)
            _close_to_truth("dbias", db, db_truth, F32)


def test_portable_build_keeps_short_planes_by_range(portable_kernels, monkeypatch):
    """Without -march flags (SSE2's 4 lanes) there is no one-instruction lane
    permutation: short planes go by range, and match the truth as the groups do."""
    monkeypatch.setattr(_build, "_module", portable_kernels)
    assert (portable_kernels.LANES, portable_kernels.PLANE_GROUPS) == (4, 0)
    shape = GROUPED["7x7-wrapping-12-left"]
    x, w, b, rm, rv, truth = _inference_case(shape, None, torch.float16, far=False)
    assert _cpu_native.inference_plan(x)[0] == "planes by range"
    y, _ = _cpu_native.forward_eval(x, w, b, rm, rv, 1e-5, False)
    _close_to_truth("eval y", y, truth, torch.float16)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def _kernels_built_for(march: str, needs: set[str], cache) -> object:
    """The kernels as BNLAB_MARCH=march builds them, in a cache of their own; skips on a
    CPU without the features `needs` names (/proc/cpuinfo's flags)."""
    from bnlab import native

    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run code built for {march}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNLAB_CACHE_DIR", str(cache))
        mp.setattr(native, "_VARIANTS", native.variants(march)[:1])
        module = _build.BATCH_NORM.build(native.find_compiler())
    assert module is not None
    return module


@pytest.fixture(scope="module")
def avx2_kernels(tmp_path_factory):
    """The kernels as BNLAB_MARCH=x86-64-v3 builds them (AVX2, FMA and F16C, no AVX-512):
    8-lane vectors, AVX2's lane permutation, F16C's float16 conversions and AVX2's
    bfloat16 ones."""
    needs = {"avx2", "fma", "f16c", "bmi2"}
    return _kernels_built_for("x86-64-v3", needs, tmp_path_factory.mktemp("x86-64-v3"))


@pytest.fixture(scope="module")
def avx_kernels(tmp_path_factory):
    """The kernels built for AVX without AVX2 (-march=sandybridge): 8-lane vectors whose
    16-bit conversions and lane permutation are the portable ones."""
    return _kernels_built_for("sandybridge", {"avx"}, tmp_path_factory.mktemp("sandybridge"))


@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_avx2_build_matches_the_float64_truth(dtype, avx2_kernels, monkeypatch, restore_threads):
    """An AVX2 build (what -march=native gives on CPUs without AVX-512) computes in 8
    lanes, takes short planes in groups of 8 / gcd(inner, 8), and runs every
    traversal to the same bounds: planes, grouped planes, periodic rows and columns,
    with batch and running statistics."""
    monkeypatch.setattr(_build, "_module", avx2_kernels)
    assert (avx2_kernels.LANES, avx2_kernels.PLANE_GROUPS) == (8, 1)
    x = torch.empty(GROUPED["7x7-wrapping-12-left"], dtype=dtype)
    assert _cpu_native.inference_plan(x)[0] == "planes in groups"
    for case in GROUPED:
        test_grouped_planes_match_the_float64_truth(case, dtype, True, None)
    for case in SPLITS:
        test_every_split_and_dtype_matches_the_float64_truth(case, dtype, None)


@pytest.mark.parametrize("dtype", [F32, *HALF], ids=str)
def test_avx_build_without_avx2_matches_the_float64_truth(
    dtype, avx_kernels, monkeypatch, restore_threads
):
    """AVX without AVX2 (Sandy Bridge): 8 lanes, no plane groups (no one-instruction
    permutation), short planes by range; every split against the float64 truth."""
    monkeypatch.setattr(_build, "_module", avx_kernels)
    assert (avx_kernels.LANES, avx_kernels.PLANE_GROUPS) == (8, 0)
    x = torch.empty(GROUPED["7x7-wrapping-12-left"], dtype=dtype)
    assert _cpu_native.inference_plan(x)[0] == "planes by range"
    test_grouped_planes_match_the_float64_truth("7x7-wrapping-12-left", dtype, True, None)
    for case in SPLITS:
        test_every_split_and_dtype_matches_the_float64_truth(case, dtype, None)


def test_bad_march_warns_and_builds_without_it(tmp_path, monkeypatch):
    """A BNLAB_MARCH the compiler does not know is named in a warning, and the kernels
    are built without -march."""
    from bnlab import native

    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "MARCH", "no-such-cpu")
    monkeypatch.setattr(native, "_VARIANTS", native.variants("no-such-cpu")[:2])
    with pytest.warns(RuntimeWarning, match="BNLAB_MARCH='no-such-cpu'"):
        module = _build.BATCH_NORM.build(native.find_compiler())
    assert module is not None and module.PLANE_GROUPS == 0


@pytest.mark.parametrize("name", ["plan", "inference_plan"])
def test_plans_name_bad_arguments(name):
    """The raw plan functions (outer, C, inner, dtype code, threads) refuse sizes or
    threads below 1, unknown dtype codes and a wrong argument count, naming the
    function or the code."""
    query = getattr(_build.native(), name)
    for args in ((0, 4, 49, 0, 2), (2, 4, 49, 0, 0), (2, -1, 49, 0, 2)):
        with pytest.raises(ValueError, match=f"{name}: sizes and threads must be positive"):
            query(*args)
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        query(2, 4, 49, 9, 2)
    with pytest.raises(TypeError, match=f"{name} expects 5 arguments, got 4"):
        query(2, 4, 49, 0)


@pytest.mark.parametrize("buffers", [F32, F64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_inference_invstd_is_double_precise_at_every_variance(buffers, eps, restore_threads):
    """Inference's invstd comes from float's 1/sqrt and two Newton steps in double:
    within 4 ulps of float64's 1/sqrt(var + eps) over float's normal range, and exactly
    float64's outside it (0, subnormal, huge, inf, NaN variances). 4000 channels, so the
    vectorized loops and their tails both run, on one thread and on two (rows by
    column)."""
    var = torch.logspace(-35, 35, 4000, dtype=F64)
    edges = [0.0, 1e-40, 1e-36, 1e36, 3e38, float("inf"), float("nan"), 1.0, 0.5]
    var[: len(edges)] = torch.tensor(edges, dtype=F64)
    var[-len(edges) :] = torch.tensor(edges, dtype=F64)
    rv = var.to(buffers)
    c = rv.numel()
    x = torch.ones(32, c, dtype=F32)
    truth = torch.rsqrt(rv.double() + eps)
    finite = truth.isfinite()
    ulp = torch.finfo(F64).eps
    for threads in (1, 2):
        torch.set_num_threads(threads)
        if threads == 2:
            assert _cpu_native.inference_plan(x) == ("rows by column", 2)
        rm = torch.arange(c, dtype=buffers)
        _, stats = _cpu_native.forward_eval(x, None, None, rm, rv, eps)
        assert torch.equal(stats[0], rm.double())
        got = stats[1]
        assert torch.equal(got.isnan(), truth.isnan()) and torch.equal(got.isinf(), truth.isinf())
        assert ((got[finite] - truth[finite]).abs() <= 4 * ulp * truth[finite]).all()
