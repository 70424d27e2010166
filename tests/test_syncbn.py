"""bnlab.nn.SyncBatchNorm: real gloo processes on this machine against one process's BatchNorm.

Every rank draws the same global batch from the same seed, normalizes its
shard with SyncBatchNorm, and also runs torch.nn's BatchNorm over the whole
batch itself, so each rank checks its own outputs and input gradients, the
summed weight and bias gradients and the buffers against the single-process
numbers (float64: 1e-10). Several checks share one spawned job: starting
processes costs more than the checks.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

import bnlab.nn
from bnlab import sync_functional
from bnlab.errors import ChannelMismatchError, InputRankError
from bnlab.kernels import CPU, REFERENCE

from ._dist import spawn

_F64 = torch.float64
_TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _parity(
    rank: int,
    sizes: list[int],
    rest: tuple[int, ...],
    *,
    members: list[int] | None = None,
    group: dist.ProcessGroup | None = None,
    channels=3,
    channels_last=False,
    momentum: float | None = 0.1,
    affine=True,
    track=True,
    steps=3,
    dtype=_F64,
    shift=0.0,
    tol=1e-10,
    grad_mode=True,
    device="cpu",
) -> None:
    """``steps`` training steps and one in eval of SyncBatchNorm on this rank's shard of
    a (Σ sizes, C, *rest) batch against torch.nn's BatchNorm over all of it (float64)."""
    me = (members or list(range(len(sizes)))).index(rank)
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    shape = (sum(sizes), channels, *rest)
    param_dtype = _F64 if dtype == _F64 else torch.float32
    args = dict(momentum=momentum, affine=affine, track_running_stats=track)
    torch.manual_seed(1234)  # the same batch and parameters on every rank
    sync = bnlab.nn.SyncBatchNorm(
        channels, process_group=group, device=device, dtype=param_dtype, **args
    )
    ref = _TORCH_BN[len(shape)](channels, dtype=_F64, **args)
    if affine:
        with torch.no_grad():
            for p, q in ((sync.weight, ref.weight), (sync.bias, ref.bias)):
                p.copy_(torch.randn(channels))
                q.copy_(p)
    fmt = _CHANNELS_LAST.get(len(shape)) if channels_last else None
    check = dict(atol=tol, rtol=tol)
    for step in range(steps + 1):
        training = step < steps
        sync.train(training), ref.train(training)
        full = (torch.randn(shape, dtype=_F64) * 2 + shift).to(dtype)
        dy_full = torch.randn(shape, dtype=_F64).to(dtype)
        if fmt is not None:
            full, dy_full = (t.contiguous(memory_format=fmt) for t in (full, dy_full))
        x = full[lo:hi].to(device, copy=True).requires_grad_(grad_mode)
        with torch.set_grad_enabled(grad_mode):
            y = sync(x)
        # Eval without buffers normalizes each process's batch by itself, as torch's does.
        whole = training or track
        mine = slice(lo, hi) if whole else slice(None)
        x_ref = (full if whole else full[lo:hi]).to(_F64, copy=True).requires_grad_()
        dy_ref = (dy_full if whole else dy_full[lo:hi]).to(_F64)
        y_ref = ref(x_ref)
        assert y.dtype == dtype and y.shape == x.shape
        if fmt is not None:
            assert y.is_contiguous(memory_format=fmt)
        assert_close(y.to("cpu", _F64), y_ref[mine].detach(), **check)
        if track:
            assert_close(sync.running_mean.to("cpu", _F64), ref.running_mean, **check)
            assert_close(sync.running_var.to("cpu", _F64), ref.running_var, **check)
            assert sync.num_batches_tracked.item() == ref.num_batches_tracked.item()
        if not grad_mode:
            continue
        torch.autograd.backward(y, dy_full[lo:hi].to(device))
        torch.autograd.backward(y_ref, dy_ref)
        assert_close(x.grad.to("cpu", _F64), x_ref.grad[mine], **check)
        if affine:
            for p, q in ((sync.weight, ref.weight), (sync.bias, ref.bias)):
                # Each rank holds its own share; summed over the ranks, the whole batch's.
                total = p.grad.to("cpu", _F64, copy=True)
                if whole:
                    dist.all_reduce(total, group=group)
                assert_close(total, q.grad, **check)
                p.grad = q.grad = None


def _errors(rank: int, world: int) -> dict[str, str]:
    messages = {}
    # The ranks built the layer with different channel counts: every rank raises.
    c = 3 + rank
    try:
        bnlab.nn.SyncBatchNorm(c)(torch.randn(4, c))
    except ChannelMismatchError as e:
        messages["channels"] = str(e)
    # One value per channel over the whole group (the other batch is empty).
    m = bnlab.nn.SyncBatchNorm(3)
    try:
        m(torch.randn(1 - rank, 3))
    except ValueError as e:
        messages["one value"] = str(e)
    # An empty 1-d input has no channel count to agree on (alone, functional.batch_norm's rule).
    try:
        sync_functional.sync_batch_norm(torch.randn(0), None, None)
    except InputRankError as e:
        messages["no channels"] = str(e)
    # Eval never communicates: the ranks may run different numbers of batches.
    m.eval()
    for _ in range(rank + 1):
        m(torch.randn(2, 3))
    m.train()
    x = torch.randn(4, 3, requires_grad=True)
    try:
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    except RuntimeError as e:
        messages["double backward"] = str(e)
    return messages


def _parity_job(rank: int, world: int) -> dict[str, str]:
    _parity(rank, [4, 4], (5, 4))  # even
    _parity(rank, [5, 2], (3, 4), channels_last=True, momentum=None)  # uneven, channels_last
    _parity(rank, [6, 0], (), affine=False)  # an empty rank, (N, C)
    _parity(rank, [0, 0], (3,))  # every rank empty
    _parity(rank, [3, 2], (2, 3, 2), track=False, channels_last=True)  # 3d
    _parity(rank, [4, 3], (5, 4), grad_mode=False)  # a training forward without a graph
    _parity(rank, [4, 3], (5, 4), dtype=torch.float32, tol=1e-6)
    # float32 data with a large mean: statistics from shifted sums stay exact.
    _parity(rank, [4, 3], (5, 4), dtype=torch.float32, shift=1e6, channels_last=True, tol=1e-6)
    _parity(rank, [4, 3], (5, 4), dtype=torch.bfloat16, tol=2e-2)
    return _errors(rank, world)


def test_matches_one_process_batchnorm_over_the_whole_batch():
    results = spawn(_parity_job, 2)
    for messages in results:  # every rank raised, none hangs
        assert "rank 0: 3, rank 1: 4" in messages["channels"]
        assert "Expected more than 1 value per channel" in messages["one value"]
        assert "double backward" in messages["double backward"]
        assert "needs input of shape (N, C, *) on every process" in messages["no channels"]


def _subset_job(rank: int, world: int) -> str:
    # Every process creates every group, in the same order (torch's rule).
    pair, alone = dist.new_group([0, 2]), dist.new_group([1])
    if rank == 1:
        _parity(rank, [5], (4, 4), members=[1], group=alone)  # a group of one: plain BatchNorm
        try:
            bnlab.nn.SyncBatchNorm(3, process_group=pair)(torch.randn(4, 3))
        except ValueError as e:
            return str(e)
        return ""
    _parity(rank, [3, 5], (4, 4), members=[0, 2], group=pair, momentum=None)
    return ""


def test_process_group_subset():
    results = spawn(_subset_job, 3)
    assert "not a member of its process_group" in results[1]


def _failure_job(rank: int, world: int) -> list[str]:
    short = datetime.timedelta(seconds=2)
    first, second = dist.new_group([0, 1], timeout=short), dist.new_group([0, 1], timeout=short)
    if rank == 1:
        time.sleep(2.5)  # not at the layer: rank 0 times out
        os._exit(0)  # then gone: rank 0's next collective fails
    messages = []
    for group in (first, second):
        try:
            bnlab.nn.SyncBatchNorm(3, process_group=group)(torch.randn(4, 3))
        except sync_functional.CollectiveError as e:
            messages.append(str(e))
    return messages


def test_a_missing_or_dead_process_raises_a_clear_error():
    start = time.monotonic()
    results = spawn(_failure_job, 2, barrier=False)
    assert time.monotonic() - start < 30
    timed_out, dead = results[0]
    for message in (timed_out, dead):
        assert message.startswith("SyncBatchNorm: the channel-count check across the process group")
        assert "may have died" in message


def _cuda_job(rank: int, world: int) -> None:
    _parity(rank, [4, 3], (5, 4), device="cuda")
    _parity(rank, [5, 0], (3, 4), channels_last=True, momentum=None, device="cuda")
    _parity(rank, [4, 3], (5, 4), dtype=torch.float32, tol=1e-5, device="cuda")
    _parity(rank, [4, 3], (5, 4), dtype=torch.bfloat16, tol=2e-2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_over_gloo():
    spawn(_cuda_job, 2, limit=120)


def _lenet(norm2d, norm1d) -> nn.Module:
    """LeNet-5 for 32×32 RGB input, with a batch norm after each hidden layer."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), norm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), norm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), norm1d(120), nn.ReLU(),
        nn.Linear(120, 84), norm1d(84), nn.ReLU(),
        nn.Linear(84, 10),
    )  # fmt: skip


def _ddp_job(rank: int, world: int, steps: int) -> None:
    sizes = [7, 5]  # uneven shards of a global batch of 12
    lo, hi, batch = sum(sizes[:rank]), sum(sizes[: rank + 1]), sum(sizes)
    torch.manual_seed(0)
    single = _lenet(nn.BatchNorm2d, nn.BatchNorm1d).double()
    model = bnlab.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(single))
    ddp = nn.parallel.DistributedDataParallel(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (single, ddp)]
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, dtype=_F64)
        label = torch.randint(0, 10, (batch,))
        for opt in opts:
            opt.zero_grad()
        nn.functional.cross_entropy(single(x), label).backward()
        # DDP averages over the ranks: scale each rank's sum so the average is the batch mean.
        loss = nn.functional.cross_entropy(ddp(x[lo:hi]), label[lo:hi], reduction="sum")
        (loss * world / batch).backward()
        for opt in opts:
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), single.state_dict().values(), strict=True):
        assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)


def test_ddp_lenet_trains_as_one_process():
    spawn(_ddp_job, 2, 20)


def _compile_job(rank: int, world: int) -> None:
    sizes = [3, 2]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.nn.SyncBatchNorm(4), nn.ReLU()).double()
    traced = copy.deepcopy(eager)
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(sum(sizes), 3, 6, 6, dtype=_F64)[lo:hi]
        dy = torch.randn(hi - lo, 4, 4, 4, dtype=_F64)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [eager(xs[0]), compiled(xs[1])]
        for y in ys:
            y.backward(dy)
        assert_close(ys[1], ys[0], atol=1e-12, rtol=1e-12)
        assert_close(xs[1].grad, xs[0].grad, atol=1e-12, rtol=1e-12)
        for a, b in zip(traced.parameters(), eager.parameters(), strict=True):
            assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
        for a, b in zip(traced.buffers(), eager.buffers(), strict=True):
            assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.slow
def test_compiles_with_fullgraph():
    spawn(_compile_job, 2, limit=120)


# ---- one process: no communication --------------------------------------------------------


def test_without_a_process_group_is_batchnorm():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ours = bnlab.nn.SyncBatchNorm(3, dtype=_F64)
    theirs = nn.BatchNorm2d(3, dtype=_F64)
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(4, 3, 5, 5, dtype=_F64)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), theirs(xs[1])]
        dy = torch.randn_like(x)
        for y in ys:
            y.backward(dy)
        assert_close(ys[0], ys[1], atol=1e-12, rtol=1e-12)
        assert_close(xs[0].grad, xs[1].grad, atol=1e-12, rtol=1e-12)
    assert_close(ours.weight.grad, theirs.weight.grad)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert_close(a, b)


def test_constructor_state_dict_and_repr_are_torchs():
    def parameters(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert parameters(bnlab.nn.SyncBatchNorm) == parameters(nn.SyncBatchNorm)
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}):
        ours, theirs = bnlab.nn.SyncBatchNorm(4, **kwargs), nn.SyncBatchNorm(4, **kwargs)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bnlab.nn.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        bnlab.nn.SyncBatchNorm(3)(torch.randn(2, 0))


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_convert_sync_batchnorm_round_trips():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5, affine=False)),
        bnlab.nn.BatchNorm2d(5),
        nn.BatchNorm3d(2, track_running_stats=False, eps=1e-3),
    )
    for bn, shape in ((model[1], (4, 4, 3, 3)), (model[2][1], (8, 5)), (model[3], (2, 5, 3, 3))):
        bn(torch.randn(shape))  # buffers away from their defaults, a counter
    model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [id(t) for t in (*model.parameters(), *model.buffers())]
    group = object()  # stands for a process group: only carried over

    converted = bnlab.nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in layers] == [bnlab.nn.SyncBatchNorm] * 4
    assert all(m.process_group is group for m in layers)
    assert [m.momentum for m in layers] == [None, 0.1, 0.1, 0.1]
    assert [m.training for m in layers] == [True, True, False, True]
    assert [id(t) for t in (*converted.parameters(), *converted.buffers())] == tensors
    assert repr(layers[3]) == repr(nn.SyncBatchNorm(2, eps=1e-3, track_running_stats=False))

    to_torch = bnlab.nn.convert(converted, to="torch")
    assert _norm_types(to_torch) == {nn.SyncBatchNorm}
    back = bnlab.nn.convert(to_torch)
    assert _norm_types(back) == {bnlab.nn.SyncBatchNorm}
    # torch's own converter takes bnlab's layers too.
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(back)
    assert _norm_types(theirs) == {nn.SyncBatchNorm}
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [id(t) for t in (*theirs.parameters(), *theirs.buffers())] == tensors


def test_fx_traces_it_as_a_leaf():
    model = nn.Sequential(nn.Linear(3, 3), bnlab.nn.SyncBatchNorm(3))
    graph = torch.fx.symbolic_trace(model).graph
    assert [n.op for n in graph.nodes].count("call_module") == 2


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [_F64, torch.float32])
def test_cpu_backend_matches_the_reference(dtype, channels_last):
    """The per-process halves SyncBatchNorm composes: statistics, gradient sums, dx."""
    x = (torch.randn(6, 3, 5, 4, dtype=_F64) * 2 + 1e4).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy, weight = torch.randn(x.shape, dtype=dtype), torch.randn(3, dtype=dtype)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == _F64 else dict(atol=2e-5, rtol=2e-5)
    n, mean, var = CPU.batch_stats(x)
    n_ref, mean_ref, var_ref = REFERENCE.batch_stats(x.to(_F64))
    assert n == n_ref == 120
    assert_close(mean, mean_ref, **tol)
    assert_close(var, var_ref, **tol)
    stats = torch.stack([mean_ref, torch.rsqrt(var_ref + 1e-5)])
    sums = CPU.backward_reduce(dy, x, stats)
    sums_ref = REFERENCE.backward_reduce(dy.to(_F64), x.to(_F64), stats)
    for a, b in zip(sums, sums_ref, strict=True):
        assert_close(a.to(_F64), b, **tol)
    means = [s / n for s in sums_ref]
    dx = CPU.backward_elemt(dy, x, weight, stats, *means)
    dx_ref = REFERENCE.backward_elemt(dy.to(_F64), x.to(_F64), weight.to(_F64), stats, *means)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    assert_close(dx.to(_F64), dx_ref, **tol)
    # With this batch's own sums it is batch norm's backward.
    dx_bn, _, _ = REFERENCE.backward(dy.to(_F64), x.to(_F64), weight.to(_F64), stats, True)
    assert_close(dx_ref, dx_bn, atol=1e-10, rtol=1e-10)


def test_empty_batch_statistics_are_zero():
    n, mean, var = REFERENCE.batch_stats(torch.empty(0, 3, 4))
    assert n == 0 and mean.tolist() == var.tolist() == [0.0, 0.0, 0.0]


def test_combination_is_exact_for_a_large_mean():
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=_F64) + 1e8
    parts = [x[:1], x[1:4], x[4:4], x[4:]]  # a one-sample and an empty shard included
    rows = [
        torch.cat([torch.tensor([float(n)], dtype=_F64), mean, var])
        for n, mean, var in (REFERENCE.batch_stats(p) for p in parts)
    ]
    n, mean, var = sync_functional.combine(torch.stack(rows))
    assert n.item() == 40
    assert_close(mean, x.mean(0), atol=0, rtol=1e-15)
    assert_close(var, x.var(0, unbiased=False), atol=0, rtol=1e-7)
