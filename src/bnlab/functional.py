"""Batch norm semantics as a pure function, with ``torch.nn.functional.batch_norm``'s signature.

Which statistics normalize the input, and when the running buffers move:

* ``training=True``: batch statistics normalize; if running buffers are given
  they are updated in place, ``r ← (1 − m)·r + m·s`` with the *unbiased*
  batch variance for ``running_var``.
* ``training=False``: the running buffers normalize and are never written.

Everything else (which buffers a module passes, momentum=None) is the
module's business; this function is pure apart from that in-place update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import Statistics, batch_norm_autograd, batch_norm_eager
from .errors import ChannelMismatchError


def _verify_batch_size(input: Tensor) -> None:
    size = input.shape
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise ValueError(  # torch's words, torch.Size included
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_eps(eps: float, training: bool) -> None:
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def _check_sizes(input: Tensor, **per_channel: Tensor | None) -> None:
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects input of shape (N, C, *), got {input.dim()}D input "
            f"of size {list(input.shape)}"
        )
    channels = input.shape[1]
    for name, t in per_channel.items():
        if t is not None and t.numel() != channels:
            raise ChannelMismatchError(
                f"batch_norm: {name} has {t.numel()} elements but the input has "
                f"{channels} channels (input size {list(input.shape)}); "
                f"num_features must equal input.shape[1]"
            )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Apply batch normalization over dim 1 of ``input`` (N, C, *).

    Same arguments, results, buffer updates and errors as
    ``torch.nn.functional.batch_norm``. ``momentum`` may also be a 0-dim
    tensor, so a cumulative average (``1 / num_batches_tracked``) needs no
    host sync and stays inside a compiled graph.
    """
    if (
        type(input) is Tensor
        and type(momentum) is float
        and not torch.compiler.is_compiling()
        and input.dim() >= 2
    ):
        # The common eager case, checked and computed in one step; None: not that case.
        y = batch_norm_eager(
            input, weight, bias, running_mean, running_var, bool(training), momentum, eps
        )
        if y is not None:
            return y
    if training:
        _verify_batch_size(input)
    _check_eps(eps, training)
    if not training:
        for name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if buffer is None:
                raise RuntimeError(
                    f"{name} must be defined in evaluation mode: pass the running buffers "
                    "or training=True"
                )
    elif (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    _check_sizes(
        input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
    )

    # The running buffers move with the batch statistics (an empty batch leaves
    # them), inside the kernel's pass when the backend can: see
    # kernels.update_running_stats for the rule.
    update = training and running_mean is not None and input.numel() > 0
    statistics = Statistics(
        None if training else running_mean,
        None if training else running_var,
        eps,
        running_mean if update else None,
        running_var if update else None,
        momentum,
    )
    return batch_norm_autograd(input, weight, bias, statistics)
