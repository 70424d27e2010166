"""What a batch-norm kernel backend implements: the contract every backend fulfils whole.

Shapes: ``x`` is (N, C, *spatial); every reduction runs over all dims but 1,
``n = N·∏spatial`` values per channel. The statistics a forward returns and
backward takes are one (2, C) tensor ``stats``, rows ``mean`` and ``invstd``
(= 1/sqrt(var + eps)), in float32 or wider (a backend's choice; float64 input
gives float64): one tensor to allocate and save rather than two.

The running-statistics update is part of the training forward, so a backend
can fuse it into its pass over ``x``; its rule is
:func:`bnlab.kernels.reference.update_running_stats`, the oracle.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


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
