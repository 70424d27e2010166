"""What a batch-norm kernel backend implements: the contract every backend fulfils whole.

Shapes: ``x`` is (N, C, *spatial); every reduction runs over all dims but 1,
``n = N·∏spatial`` values per channel. The statistics a forward returns and
backward takes are one (2, C) tensor ``stats``, rows ``mean`` and ``invstd``
(= 1/sqrt(var + eps)), in float32 or wider (a backend's choice; float64 input
gives float64): one tensor to allocate and save rather than two.

The running-statistics update is part of the training forward, so a backend
can fuse it into its pass over ``x``; its rule is
:func:`bnlab.kernels.reference.update_running_stats`, the oracle.

Batch norm across processes (:mod:`bnlab.sync_functional`) splits both passes
at the point where the processes exchange their per-channel numbers:
``batch_stats`` → combine → ``forward_eval`` with the combined statistics,
and ``backward_reduce`` → sum → ``backward_elemt``.

A call being captured into a graph (:func:`captured`) goes through the
backend's custom ops, which the capture keeps whole, rather than raw
pointers it cannot follow.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .. import _compat


def captured() -> bool:
    """Whether calls are being captured into a graph, by ``torch.compile`` (and
    ``torch.export``) or ``torch.jit.trace``, or seen by a Python dispatch mode
    (``make_fx``, ``FakeTensorMode``, a user's mode): only ops reach them."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _compat.dispatch_mode_active()


@runtime_checkable
class Backend(Protocol):
    name: str

    def supports(self, x: Tensor) -> bool:
        """Whether this backend takes input ``x`` (by device, dtype and layout)."""
        ...

    def forward_train(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float | Tensor,
        want_stats: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Normalize with batch statistics: (y, stats).

        When given, the running buffers move in place:
        ``r ← (1 − momentum)·r + momentum·s``, with the unbiased variance.
        ``want_stats=False``: only y will be used; stats may be None.
        """
        ...

    def forward_eval(
        self,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        want_stats: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Normalize with the running statistics: (y, stats); nothing is written.

        ``want_stats=False``: only y will be used; stats may be None.
        """
        ...

    def backward(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        stats: Tensor,
        batch_stats: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dx, dweight, dbias) for y = (x − mean)·invstd·γ + β, ``stats`` from the forward.

        ``batch_stats``: mean and invstd were x's own (they depend on x), else
        constants. dweight and dbias come in x's dtype or the statistics'.
        """
        ...

    def batch_stats(self, x: Tensor) -> tuple[int, Tensor, Tensor]:
        """(n, mean, var): x's values per channel, per-channel mean and biased variance.

        The local half of statistics combined across processes. mean and var
        come in float32 or wider, accurate for data with a large mean; an
        empty x gives (0, zeros, zeros).
        """
        ...

    def backward_reduce(self, dy: Tensor, x: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ dy, Σ dy·xhat) per channel, xhat = (x − mean)·invstd with ``stats``' rows.

        In x's dtype or the statistics'; zeros for an empty x.
        """
        ...

    def backward_elemt(
        self,
        dy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        stats: Tensor,
        mean_dy: Tensor,
        mean_dy_xhat: Tensor,
    ) -> Tensor:
        """dx = γ·invstd·(dy − mean_dy − xhat·mean_dy_xhat), in dy's dtype.

        ``mean_dy`` and ``mean_dy_xhat`` (C,) are the means of dy and dy·xhat
        over the whole batch, which may span processes: with x's own sums this
        is :meth:`backward` with batch statistics.
        """
        ...
