"""Property-based parity: random shapes and arguments against torch.nn.functional in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from hypothesis import given
from hypothesis import strategies as st

from bnlab import functional as F


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 4)) for _ in range(rank - 2)]
    return dict(
        shape=(n, c, *spatial),
        training=draw(st.booleans()),
        affine=draw(st.booleans()),
        buffers=draw(st.booleans()),
        momentum=draw(st.floats(0.0, 1.0)),
        eps=draw(st.floats(1e-5, 1.0)),
        scale=draw(st.floats(0.1, 100.0)),
        shift=draw(st.floats(-100.0, 100.0)),
        seed=draw(st.integers(0, 2**31 - 1)),
        channels_last=draw(st.booleans()) and rank in (4, 5),
    )


@given(cases())
def test_random_cases_match_torch(case):
    g = torch.Generator().manual_seed(case["seed"])
    shape, c = case["shape"], case["shape"][1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * case["scale"] + case["shift"]
    # Keep every channel's spread non-degenerate: a constant channel makes the
    # output 0/0-sensitive, which says nothing about either implementation.
    x = x + torch.arange(x.numel(), dtype=torch.float64).view(shape) % 3 * case["scale"]
    if case["channels_last"]:
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    training = case["training"] or not case["buffers"]
    rm = torch.randn(c, generator=g, dtype=torch.float64) if case["buffers"] else None
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.1 if case["buffers"] else None
    w = torch.randn(c, generator=g, dtype=torch.float64) if case["affine"] else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if case["affine"] else None
    copies = [(None if t is None else t.clone()) for t in (rm, rv)]
    dy = torch.randn(shape, generator=g, dtype=torch.float64)

    results = []
    for fn, (m, v) in ((F.batch_norm, (rm, rv)), (TF.batch_norm, copies)):
        xi = x.clone().requires_grad_()
        wi = None if w is None else w.clone().requires_grad_()
        bi = None if b is None else b.clone().requires_grad_()
        y = fn(xi, m, v, wi, bi, training=training, momentum=case["momentum"], eps=case["eps"])
        y.backward(dy)
        results.append([y, xi.grad, m, v] + [t.grad for t in (wi, bi) if t is not None])
    for ours, theirs in zip(*results, strict=True):
        if theirs is None:
            assert ours is None
            continue
        # Tolerance scales with the data: values up to ~1e2 carry ~1e-14 relative error.
        torch.testing.assert_close(ours, theirs, atol=1e-9 * (1 + case["scale"]), rtol=1e-9)
