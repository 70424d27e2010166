"""Batch-norm kernels in Triton: CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``.

Every kernel reads x as the contiguous (outer, C, inner) array of
:func:`bnlab.kernels._layout.geometry`, and every kernel has the same grid:
(channel blocks, splits of outer, splits of inner). A program walks its
share in tiles of BO × BC × BI values at offsets (o·C + c)·inner + i:

* planes (inner > 1: NCHW, (N, C, L)): BC = 1, a tile is BO runs of BI values
  of one channel, read along the runs;
* rows (inner = 1: channels_last, (N, C)): BI = 1, a tile is BO rows of BC
  neighbouring channels, read along the rows.

Splitting outer and inner as well as channels is what fills a GPU when C is
small and N·H·W large ((64, 64, 56, 56) has 64 channels for 132 SMs).

Reductions are per program, then combined per channel by a second kernel
(statistics) or by one torch sum over the splits (gradient sums):

* statistics: each tile's mean and centred sum of squares, merged into the
  program's by Chan's rule, so no E[x²] − E[x]² cancels; the programs'
  partials merged the same way in float64, with the running-buffer update
  fused into that merge;
* gradient sums: Σ dy and Σ dy·(x − mean), accumulated in the compute dtype
  (float32, or float64 for float64 input).

Elementwise passes compute in that dtype and store in the tensor's own. With
RELU the normalize pass writes max(y, 0), and both backward kernels take dy
only where y was positive, y recomputed from x by the same expression
(``_pre``), so the mask is the forward's.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pid_c, o0, i0, outer, C, inner, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
    """Offsets and mask of the tile at (o0, channel block pid_c, i0)."""
    o = o0 + tl.arange(0, BO)[:, None, None]
    c = pid_c * BC + tl.arange(0, BC)[None, :, None]
    i = i0 + tl.arange(0, BI)[None, None, :]
    offsets = (o.to(tl.int64) * C + c) * inner + i
    return offsets, (o < outer) & (c < C) & (i < inner)


@triton.jit
def _channels(pid_c, C, BC: tl.constexpr):
    c = pid_c * BC + tl.arange(0, BC)
    return c, c < C


@triton.jit
def _share(outer, inner, chunk_o, chunk_i):
    """This program's [o_lo, o_hi) × [i_lo, i_hi)."""
    o_lo = tl.program_id(1) * chunk_o
    i_lo = tl.program_id(2) * chunk_i
    return o_lo, tl.minimum(o_lo + chunk_o, outer), i_lo, tl.minimum(i_lo + chunk_i, inner)


@triton.jit
def _to_tile(v):
    """A per-channel vector broadcast over a tile."""
    return v[None, :, None]


@triton.jit
def _moments(pid_c, C, stats, ACC: tl.constexpr, BC: tl.constexpr):
    """Per-channel mean and invstd: stats' two rows."""
    c, live = _channels(pid_c, C, BC)
    mean = tl.load(stats + c, mask=live, other=0.0).to(ACC)
    invstd = tl.load(stats + C + c, mask=live, other=0.0).to(ACC)
    return mean, invstd


@triton.jit
def _scale_shift(
    pid_c, C, invstd, weight, bias,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """scale = invstd·γ and shift = β of y = (x − mean)·scale + shift."""
    c, live = _channels(pid_c, C, BC)
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(weight + c, mask=live, other=0.0).to(ACC)
    shift = tl.zeros([BC], ACC)
    if HAS_BIAS:
        shift = tl.load(bias + c, mask=live, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def _affine(
    pid_c, C, stats, weight, bias,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Per-channel mean, invstd, scale and shift, from stats."""
    mean, invstd = _moments(pid_c, C, stats, ACC, BC)
    scale, shift = _scale_shift(pid_c, C, invstd, weight, bias, HAS_WEIGHT, HAS_BIAS, ACC, BC)
    return mean, invstd, scale, shift


@triton.jit
def _pre(v, mean, scale, shift):
    """The batch norm's output before any activation, computed alike in every kernel, so
    the backward's ReLU mask is the forward's."""
    return (v - _to_tile(mean)) * _to_tile(scale) + _to_tile(shift)


@triton.jit
def _eps(eps_hi, eps_lo, ACC: tl.constexpr):
    """eps in ACC from its float32 halves (float arguments reach a kernel as float32),
    added to a zero of ACC so that both widen before they meet."""
    return tl.zeros([1], ACC) + eps_hi + eps_lo


@triton.jit
def _narrow(v, ptr):
    """float64 v in ptr's element type, through float32 unless that is float64 (16-bit
    buffers round as the reference rule's float32 update does)."""
    if ptr.dtype.element_ty == tl.float64:
        return v
    return v.to(tl.float32).to(ptr.dtype.element_ty)


@triton.jit
def stats_partial(
    x, part, outer, C, inner, chunk_o, chunk_i,
    ACC: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """part[0|1|2, split, c] = count, mean and centred sum of squares of this program's share."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    splits = tl.num_programs(1) * tl.num_programs(2)
    o_lo, o_hi, i_lo, i_hi = _share(outer, inner, chunk_o, chunk_i)
    count = tl.zeros([BC], ACC)
    mean = tl.zeros([BC], ACC)
    m2 = tl.zeros([BC], ACC)
    for o0 in range(o_lo, o_hi, BO):
        for i0 in range(i_lo, i_hi, BI):
            offsets, mask = _tile(pid_c, o0, i0, outer, C, inner, BO, BC, BI)
            v = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
            n = ((tl.minimum(o0 + BO, o_hi) - o0) * (tl.minimum(i0 + BI, i_hi) - i0)).to(ACC)
            tile_mean = tl.sum(tl.sum(v, axis=2), axis=0) / n
            d = tl.where(mask, v - _to_tile(tile_mean), 0.0)
            tile_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            total = count + n
            delta = tile_mean - mean
            mean += delta * (n / total)
            m2 += tile_m2 + delta * delta * (count * n / total)
            count = total
    c, live = _channels(pid_c, C, BC)
    tl.store(part + split * C + c, count, mask=live)
    tl.store(part + (splits + split) * C + c, mean, mask=live)
    tl.store(part + (2 * splits + split) * C + c, m2, mask=live)


@triton.jit
def stats_finish(
    part, splits, C, eps_hi, eps_lo, stats, var, running_mean, running_var, momentum, unbias,
    HAS_VAR: tl.constexpr, HAS_RUNNING: tl.constexpr, MOMENTUM_IN_MEMORY: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    """Merges the splits' partials per channel (float64): stats rows mean and
    invstd, the biased var if asked, and the running buffers moved
    r ← (1 − momentum)·r + momentum·s with var·unbias (rounded once).
    MOMENTUM_IN_MEMORY: momentum points to it (a one-element tensor, such as
    the cumulative average's 1/num_batches_tracked, read without a host sync).
    eps comes as two float32 halves (a float argument is passed as float32)."""
    c, live = _channels(tl.program_id(0), C, BC)
    count = tl.zeros([BC], tl.float64)
    mean = tl.zeros([BC], tl.float64)
    m2 = tl.zeros([BC], tl.float64)
    for s in range(0, splits):
        n = tl.load(part + s * C + c, mask=live, other=0.0).to(tl.float64)
        m = tl.load(part + (splits + s) * C + c, mask=live, other=0.0).to(tl.float64)
        q = tl.load(part + (2 * splits + s) * C + c, mask=live, other=0.0).to(tl.float64)
        total = count + n
        w = tl.where(total > 0, n / tl.maximum(total, 1.0), 0.0)
        delta = m - mean
        mean += delta * w
        m2 += q + delta * delta * count * w
        count = total
    v = tl.where(live, m2 / tl.maximum(count, 1.0), 1.0)
    invstd = 1.0 / tl.sqrt(v + _eps(eps_hi, eps_lo, tl.float64))
    tl.store(stats + c, _narrow(mean, stats), mask=live)
    tl.store(stats + C + c, _narrow(invstd, stats), mask=live)
    if HAS_VAR:
        tl.store(var + c, _narrow(v, var), mask=live)
    if HAS_RUNNING:
        if MOMENTUM_IN_MEMORY:
            momentum = tl.load(momentum).to(tl.float64)
        rm = tl.load(running_mean + c, mask=live, other=0.0).to(tl.float64)
        rv = tl.load(running_var + c, mask=live, other=0.0).to(tl.float64)
        rm = rm * (1.0 - momentum) + momentum * mean
        rv = rv * (1.0 - momentum) + momentum * (v * unbias)
        tl.store(running_mean + c, _narrow(rm, running_mean), mask=live)
        tl.store(running_var + c, _narrow(rv, running_var), mask=live)


@triton.jit
def normalize(
    x, y, stats, weight, bias, running_mean, running_var, eps_hi, eps_lo,
    outer, C, inner, chunk_o, chunk_i,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    FROM_RUNNING: tl.constexpr,
    ACC: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """y = (x − mean)·invstd·γ + β; then max(y, 0) with RELU. mean and invstd are stats'
    rows, or with FROM_RUNNING the running buffers' (invstd = 1/sqrt(var + eps)), which
    the first program of each channel block then writes into stats."""
    pid_c = tl.program_id(0)
    if FROM_RUNNING:
        c, live = _channels(pid_c, C, BC)
        mean = tl.load(running_mean + c, mask=live, other=0.0).to(ACC)
        var = tl.load(running_var + c, mask=live, other=1.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + _eps(eps_hi, eps_lo, ACC))
        if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            tl.store(stats + c, mean.to(stats.dtype.element_ty), mask=live)
            tl.store(stats + C + c, invstd.to(stats.dtype.element_ty), mask=live)
    else:
        mean, invstd = _moments(pid_c, C, stats, ACC, BC)
    scale, shift = _scale_shift(pid_c, C, invstd, weight, bias, HAS_WEIGHT, HAS_BIAS, ACC, BC)
    o_lo, o_hi, i_lo, i_hi = _share(outer, inner, chunk_o, chunk_i)
    for o0 in range(o_lo, o_hi, BO):
        for i0 in range(i_lo, i_hi, BI):
            offsets, mask = _tile(pid_c, o0, i0, outer, C, inner, BO, BC, BI)
            v = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
            out = _pre(v, mean, scale, shift)
            if RELU:
                out = tl.maximum(out, 0.0)
            tl.store(y + offsets, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def grad_sums_partial(
    dy, x, stats, weight, bias, part, outer, C, inner, chunk_o, chunk_i,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """part[0|1, split, c] = Σ dy and Σ dy·(x − mean) over this program's share; with RELU,
    dy where the forward's output was positive (recomputed from x), else 0."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
    splits = tl.num_programs(1) * tl.num_programs(2)
    c, live = _channels(pid_c, C, BC)
    mean, _, scale, shift = _affine(pid_c, C, stats, weight, bias, HAS_WEIGHT, HAS_BIAS, ACC, BC)
    sum_dy = tl.zeros([BC], ACC)
    sum_dy_xmu = tl.zeros([BC], ACC)
    o_lo, o_hi, i_lo, i_hi = _share(outer, inner, chunk_o, chunk_i)
    for o0 in range(o_lo, o_hi, BO):
        for i0 in range(i_lo, i_hi, BI):
            offsets, mask = _tile(pid_c, o0, i0, outer, C, inner, BO, BC, BI)
            g = tl.load(dy + offsets, mask=mask, other=0.0).to(ACC)
            v = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
            if RELU:
                g = tl.where(_pre(v, mean, scale, shift) > 0, g, 0.0)
            sum_dy += tl.sum(tl.sum(g, axis=2), axis=0)
            sum_dy_xmu += tl.sum(tl.sum(g * (v - _to_tile(mean)), axis=2), axis=0)
    tl.store(part + split * C + c, sum_dy, mask=live)
    tl.store(part + (splits + split) * C + c, sum_dy_xmu, mask=live)


@triton.jit
def grad_finish(part, splits, C, stats, sums, dweight, dbias, BC: tl.constexpr):
    """Per channel, the splits' partials summed in float64: sums = (Σ dy, Σ dy·(x − mean))
    for grad_input, dbias = Σ dy and dweight = Σ dy·xhat in their own dtype."""
    c, live = _channels(tl.program_id(0), C, BC)
    sum_dy = tl.zeros([BC], tl.float64)
    sum_dy_xmu = tl.zeros([BC], tl.float64)
    for s in range(0, splits):
        sum_dy += tl.load(part + s * C + c, mask=live, other=0.0).to(tl.float64)
        sum_dy_xmu += tl.load(part + (splits + s) * C + c, mask=live, other=0.0).to(tl.float64)
    invstd = tl.load(stats + C + c, mask=live, other=0.0).to(tl.float64)
    tl.store(sums + c, sum_dy, mask=live)
    tl.store(sums + C + c, sum_dy_xmu, mask=live)
    tl.store(dbias + c, _narrow(sum_dy, dbias), mask=live)
    tl.store(dweight + c, _narrow(sum_dy_xmu * invstd, dweight), mask=live)


@triton.jit
def grad_input(
    dy, x, dx, stats, weight, bias, g, g_scale, outer, C, inner, chunk_o, chunk_i,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    HAS_G: tl.constexpr, G_OF_XMU: tl.constexpr,
    ACC: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    """dx = γ·invstd·(dy − g1 − xhat·g2), xhat = (x − mean)·invstd; without g, γ·invstd·dy.

    g1, g2 = g[0]·g_scale, g[1]·g_scale: the means of dy and dy·xhat over the
    batch. With G_OF_XMU, g[1] holds Σ dy·(x − mean) and is multiplied by invstd.
    With RELU, dy is taken as 0 where the forward's output was not positive.
    """
    pid_c = tl.program_id(0)
    mean, invstd, a, shift = _affine(pid_c, C, stats, weight, bias, HAS_WEIGHT, HAS_BIAS, ACC, BC)
    k = tl.zeros([BC], ACC)  # dx = a·dy − k·(x − mean) + b0
    b0 = tl.zeros([BC], ACC)
    if HAS_G:
        c, live = _channels(pid_c, C, BC)
        g1 = tl.load(g + c, mask=live, other=0.0).to(ACC) * g_scale
        g2 = tl.load(g + C + c, mask=live, other=0.0).to(ACC) * g_scale
        if G_OF_XMU:
            g2 *= invstd
        k = a * invstd * g2
        b0 = -a * g1
    o_lo, o_hi, i_lo, i_hi = _share(outer, inner, chunk_o, chunk_i)
    for o0 in range(o_lo, o_hi, BO):
        for i0 in range(i_lo, i_hi, BI):
            offsets, mask = _tile(pid_c, o0, i0, outer, C, inner, BO, BC, BI)
            gy = tl.load(dy + offsets, mask=mask, other=0.0).to(ACC)
            v = tl.load(x + offsets, mask=mask, other=0.0).to(ACC)
            if RELU:
                gy = tl.where(_pre(v, mean, a, shift) > 0, gy, 0.0)
            out = _to_tile(a) * gy - _to_tile(k) * (v - _to_tile(mean)) + _to_tile(b0)
            tl.store(dx + offsets, out.to(dx.dtype.element_ty), mask=mask)
