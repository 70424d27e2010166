"""The Triton backend against the reference backend and torch.nn.

On a machine without CUDA the kernels run on CPU tensors under Triton's
interpreter (conftest sets ``TRITON_INTERPRET=1`` before triton is imported),
so every kernel, layout and dtype is checked here too; with CUDA they run on
the GPU.

Tolerances. Every result r is compared with the float64 reference on the
same (exactly widened) inputs, t, as

    |r − t| ≤ u·|t| + K·u_acc·S

u is the unit roundoff of r's dtype (storing costs half an ulp), u_acc that
of the compute dtype (float32, or float64 for float64 input), S the largest
|t| of the tensor plus one (the data here have |mean|/std ≤ 2, so no term
of a result is much larger than the result's range), and K = 64: each value
is a few roundings of x − mean, products and statistics, and each sum adds
at most its depth (⌈log2 n⌉ ≤ 10 for the ≤ 1000 values per channel here)
times u_acc of the summed magnitudes; 64 leaves a factor of two over that.
One exception: Triton's interpreter narrows float32 to bfloat16 by truncation
(a GPU rounds to nearest), so there a bfloat16 value may be off by a whole ulp.
"""

from __future__ import annotations

import struct

import pytest
import torch

import bnlab.nn
from bnlab import kernels
from bnlab.kernels import gpu
from bnlab.kernels._layout import geometry
from bnlab.kernels.gpu import TRITON, TritonBackend, plan
from bnlab.kernels.reference import REFERENCE as REF

from .conftest import (
    compiled_training_matches_eager,
    count_calls,
    graph_targets,
    make_pair,
    vmap_ensembles,
)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRI = TritonBackend(devices=(DEVICE,))
F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
K = 64

# name -> (shape, memory format): every layout the kernels read as (outer, C, inner)
LAYOUTS = {
    "NCHW": ((4, 3, 5, 6), torch.contiguous_format),
    "NHWC": ((4, 3, 5, 6), torch.channels_last),
    "NDHWC": ((2, 3, 3, 4, 2), torch.channels_last_3d),
    "NC": ((16, 7), torch.contiguous_format),
    "NCL": ((5, 3, 9), torch.contiguous_format),
    "NCHW-strided": ((4, 3, 5, 6), None),  # a transposed view: copied to contiguous first
}


def _input(layout: str, dtype: torch.dtype, mean: float = 3.0, std: float = 2.0):
    shape, fmt = LAYOUTS[layout]
    x = (torch.randn(shape, dtype=F64) * std + mean).to(dtype)
    if fmt is None:
        return x.transpose(2, 3).contiguous().transpose(2, 3).to(DEVICE)
    return x.to(DEVICE).contiguous(memory_format=fmt)


def _params(c: int, dtype: torch.dtype):
    acc = F64 if dtype is F64 else torch.float32
    return torch.randn(c, dtype=acc, device=DEVICE), torch.randn(c, dtype=acc, device=DEVICE)


def _check(r: torch.Tensor, t: torch.Tensor, acc: torch.dtype, name: str) -> None:
    assert r.shape == t.shape, name
    u = torch.finfo(r.dtype).eps / (1 if r.dtype is torch.bfloat16 and DEVICE == "cpu" else 2)
    u_acc = torch.finfo(acc).eps / 2
    t = t.double()
    bound = u * t.abs() + K * u_acc * (t.abs().max() + 1)
    err = (r.double() - t).abs()
    assert bool((err <= bound).all()), f"{name}: max error {err.max():.3g}, bound {bound.max():.3g}"


def _acc(dtype):
    return F64 if dtype is F64 else torch.float32


def _wide(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_forward_and_backward_match_the_reference(layout, dtype):
    x = _input(layout, dtype)
    c = x.shape[1]
    w, b = _params(c, dtype)
    rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    y, stats = TRI.forward_train(x, w, b, 1e-5, rm, rv, 0.1)
    y_ref, stats_ref = REF.forward_train(*_wide(x, w, b), 1e-5, rm_ref, rv_ref, 0.1)
    acc = _acc(dtype)
    dense = geometry(x) is not None
    assert y.dtype == dtype and (y.stride() == x.stride() if dense else y.is_contiguous())
    assert stats.dtype == acc and stats.shape == (2, c)
    _check(y, y_ref, acc, "y")
    _check(stats, stats_ref, acc, "stats")
    _check(rm, rm_ref, torch.float32, "running_mean")
    _check(rv, rv_ref, torch.float32, "running_var")
    for batch_stats in (True, False):
        dy = torch.randn(x.shape, dtype=F64).to(dtype).to(DEVICE)
        ours = TRI.backward(dy, x, w, stats, batch_stats)
        ref = REF.backward(*_wide(dy, x, w, stats_ref), batch_stats)
        assert ours[0].dtype == dtype and ours[1].dtype == acc and ours[2].dtype == acc
        for r, t, name in zip(ours, ref, ("dx", "dweight", "dbias"), strict=True):
            _check(r, t, acc, f"{name} (batch_stats={batch_stats})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_eval_forward_matches_the_reference_and_writes_nothing(layout, dtype):
    x = _input(layout, dtype)
    c = x.shape[1]
    w, b = _params(c, dtype)
    rm, rv = torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5
    before = rm.clone(), rv.clone()
    y, stats = TRI.forward_eval(x, w, b, rm, rv, 1e-3)
    y_ref, stats_ref = REF.forward_eval(*_wide(x, w, b, rm, rv), 1e-3)
    _check(y, y_ref, _acc(dtype), "y")
    _check(stats, stats_ref, _acc(dtype), "stats")
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)])
def test_without_weight_or_bias(affine):
    x = _input("NCHW", torch.float32)
    w, b = _params(3, torch.float32)
    w, b = (w if affine[0] else None), (b if affine[1] else None)
    y, stats = TRI.forward_train(x, w, b, 1e-5, None, None, 0.1)
    y_ref, stats_ref = REF.forward_train(*_wide(x, w, b), 1e-5, None, None, 0.1)
    _check(y, y_ref, torch.float32, "y")
    dy = torch.randn_like(x)
    for r, t in zip(
        TRI.backward(dy, x, w, stats, True),
        REF.backward(*_wide(dy, x, w, stats_ref), True),
        strict=True,
    ):
        _check(r, t, torch.float32, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_running_buffers_of_the_parameters_dtype_move_by_the_fused_update(dtype, monkeypatch):
    """The merge kernel moves the buffers itself; the reference rule only where it cannot."""
    x = _input("NHWC", dtype)
    rm, rv = torch.zeros(3, dtype=dtype, device=DEVICE), torch.ones(3, dtype=dtype, device=DEVICE)
    rm_ref, rv_ref = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    calls = count_calls(monkeypatch, gpu.reference, "update_running_stats")
    TRI.forward_train(x, None, None, 1e-5, rm, rv, 0.3)
    # A one-element tensor (the cumulative average's 1/num_batches_tracked) is read by the
    # kernel too: no host sync, so a CUDA graph can capture the step.
    TRI.forward_train(x, None, None, 1e-5, rm, rv, torch.tensor(0.25, dtype=F64))
    assert calls == []
    REF.forward_train(x.double().cpu(), None, None, 1e-5, rm_ref, rv_ref, 0.3)
    REF.forward_train(x.double().cpu(), None, None, 1e-5, rm_ref, rv_ref, 0.25)
    _check(rm.cpu(), rm_ref, _acc(dtype), "running_mean")
    _check(rv.cpu(), rv_ref, _acc(dtype), "running_var")


def test_running_buffers_the_kernel_cannot_write_move_by_the_reference_rule(monkeypatch):
    x = _input("NCHW", torch.float32)
    calls = count_calls(monkeypatch, gpu.reference, "update_running_stats")
    momenta = torch.tensor([0.1, 0.5, 0.9], device=DEVICE)  # one per channel
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    rm_ref, rv_ref = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    TRI.forward_train(x, None, None, 1e-5, rm, rv, momenta)
    strided = torch.zeros(6, device=DEVICE)[::2]
    TRI.forward_train(x, None, None, 1e-5, strided, torch.ones(6, device=DEVICE)[::2], 0.5)
    assert len(calls) == 2
    REF.forward_train(x.double().cpu(), None, None, 1e-5, rm_ref, rv_ref, momenta.double().cpu())
    _check(rm.cpu(), rm_ref, torch.float32, "running_mean")
    _check(rv.cpu(), rv_ref, torch.float32, "running_var")
    torch.testing.assert_close(strided.cpu().double(), 0.5 * x.double().cpu().mean((0, 2, 3)))


def test_a_large_mean_does_not_cancel_in_float32():
    """Tile moments merged by Chan's rule: E[x²] − E[x]² in float32 would lose every digit."""
    x = _input("NHWC", torch.float32, mean=1e4, std=1.0)
    n, mean, var = TRI.batch_stats(x)
    n_ref, mean_ref, var_ref = REF.batch_stats(x.double())
    assert n == n_ref == x.numel() // 3
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-4, atol=0)


def test_many_programs_and_channel_blocks_cover_every_value():
    """More channels than a block holds, and outer and inner split over programs."""
    for shape, fmt in (
        ((9, 70, 3, 2), torch.channels_last),
        ((3, 2, 40, 60), torch.contiguous_format),
    ):
        x = (torch.randn(shape, dtype=F64) + 1).to(DEVICE).contiguous(memory_format=fmt)
        outer, c, inner = geometry(x)
        p = plan(outer, c, inner, 8)
        assert (
            p.grid[0] * p.bc >= c
            and p.grid[1] * p.chunk_o >= outer
            and p.grid[2] * p.chunk_i >= inner
        )
        assert p.splits > 1 or p.grid[0] > 1
        y, stats = TRI.forward_train(x, None, None, 1e-5, None, None, 0.1)
        y_ref, stats_ref = REF.forward_train(x, None, None, 1e-5, None, None, 0.1)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(stats, stats_ref, atol=1e-12, rtol=0)


def test_plan_splits_few_channels_over_their_values():
    p = plan(64, 64, 56 * 56, 528)  # (64, 64, 56, 56) on 132 SMs
    assert p.bc == 1 and p.grid[0] == 64 and p.splits >= 8
    q = plan(8192, 1024, 1, 528)  # (8192, 1024): rows of 64 channels
    assert q.bc == 64 and q.bi == 1 and q.grid[0] * q.splits >= 512
    for each in (p, q):
        assert each.chunk_o % each.bo == 0 and each.chunk_i % each.bi == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_pieces_across_processes_make_the_whole(dtype):
    """batch_stats, backward_reduce and backward_elemt compose to forward_train and backward."""
    x = _input("NCHW", dtype)
    w, _ = _params(3, dtype)
    n, mean, var = TRI.batch_stats(x)
    stats = torch.stack([mean, torch.rsqrt(var + 1e-5)])
    dy = torch.randn(x.shape, dtype=F64).to(dtype).to(DEVICE)
    sum_dy, sum_dy_xhat = TRI.backward_reduce(dy, x, stats)
    dx = TRI.backward_elemt(dy, x, w, stats, sum_dy / n, sum_dy_xhat / n)
    _, stats_ref = REF.forward_train(x.double(), None, None, 1e-5, None, None, 0.0)
    ref = REF.backward(*_wide(dy, x, w), stats_ref, True)
    acc = _acc(dtype)
    _check(dx, ref[0], acc, "dx")
    _check(sum_dy, ref[2], acc, "sum dy")
    _check(sum_dy_xhat, ref[1], acc, "sum dy·xhat")


def test_supports_cuda_tensors_only_by_default():
    assert not TRITON.supports(torch.randn(4, 3))
    assert kernels.select(torch.randn(4, 3)) is kernels.CPU
    assert TRI.supports(torch.randn(4, 3, device=DEVICE))
    assert not TRI.supports(torch.randn(0, 3, device=DEVICE))
    assert not TRI.supports(torch.randn(4, 3, device=DEVICE).to(torch.complex64))
    assert isinstance(TRITON, kernels.Backend)


# ---- the layers on this backend against torch.nn ---------------------------------------


@pytest.fixture
def on_triton(monkeypatch, bnlab_kernels_only):
    """bnlab's layers on the Triton backend (CPU tensors included, under the interpreter)."""
    monkeypatch.setattr(kernels, "_FAST", (TRI,))
    return count_calls(monkeypatch, gpu, "eager_forward_train")


@pytest.mark.parametrize(
    "cls_name, shape",
    [("BatchNorm1d", (8, 3)), ("BatchNorm2d", (4, 3, 5, 4)), ("BatchNorm3d", (2, 3, 3, 4, 2))],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_match_torch(on_triton, cls_name, shape, momentum):
    ours, theirs = make_pair(cls_name, momentum=momentum)
    ours.to(DEVICE), theirs.to(DEVICE)
    for train in (True, True, False, True):
        ours.train(train), theirs.train(train)
        x = torch.randn(shape, dtype=F64, device=DEVICE) * 2 + 1
        dy = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(ya, yb, atol=1e-12, rtol=0)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-11, rtol=0)
    assert len(on_triton) == 3


def test_double_backward_through_the_reference(on_triton):
    m = bnlab.nn.BatchNorm2d(3, dtype=F64).to(DEVICE)
    x = torch.randn(3, 3, 2, 2, dtype=F64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: m(t).square(), (x,))
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    assert on_triton


def test_compiled_fullgraph_calls_the_triton_ops(on_triton):
    seen, backend = graph_targets()
    eager, compiled, step = compiled_training_matches_eager(DEVICE)
    eager.eval(), compiled.eval()
    x = torch.randn(4, 3, 5, 5, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), step(x), atol=1e-6, rtol=1e-6)
    torch.compile(bnlab.nn.BatchNorm2d(3).to(DEVICE), fullgraph=True, backend=backend)(x)
    assert any("bnlab.triton_forward_train" in t for t in seen), sorted(seen)


def test_vmap_ensemble_and_per_sample_grads_run_the_kernels(on_triton):
    """torch.func on the layers: the vmap rule hands the kernels real tensors (the vmapped
    dim folded into the channels); torch's numbers."""
    pairs = [make_pair("BatchNorm2d") for _ in range(3)]
    for ours, theirs in pairs:
        ours.to(DEVICE), theirs.to(DEVICE)
    x = torch.randn(8, 3, 4, 4, dtype=F64, device=DEVICE) * 2 + 1
    (ya, ba), (yb, bb) = vmap_ensembles(pairs, x)
    torch.testing.assert_close(ya, yb, atol=1e-12, rtol=0)
    for k in ba:
        torch.testing.assert_close(ba[k], bb[k], atol=1e-12, rtol=0, msg=k)
    assert on_triton

    ours, theirs = pairs[0]
    ours.eval(), theirs.eval()

    def loss(m):
        return lambda p, xi: torch.func.functional_call(m, p, (xi[None],)).square().sum()

    grads = [
        torch.func.vmap(torch.func.grad(loss(m)), in_dims=(None, 0))(dict(m.named_parameters()), x)
        for m in (ours, theirs)
    ]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-12, rtol=0, msg=k)


def test_eps_reaches_the_kernels_to_48_bits():
    """Float kernel arguments are float32: eps travels as two halves, so a float64
    batch norm's 1/sqrt(var + eps) is not off by eps's float32 rounding (about 1e-8 of
    eps, which matters when var is as small as eps)."""
    hi, lo = gpu._eps_halves(1e-5)
    assert hi != 1e-5
    lo32 = struct.unpack("f", struct.pack("f", lo))[0]
    assert abs(hi + lo32 - 1e-5) <= 1e-5 * 2.0**-47


def test_a_triton_that_does_not_import_leaves_cuda_tensors_to_the_reference(monkeypatch):
    def broken():
        raise RuntimeError("no libcuda")

    monkeypatch.setattr(gpu, "_kernels", broken)
    gpu._importable.cache_clear()
    try:
        with pytest.warns(UserWarning, match="does not import.*no libcuda"):
            assert not TRI.supports(torch.randn(4, 3, device=DEVICE))
    finally:
        gpu._importable.cache_clear()
