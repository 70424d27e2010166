"""Batch norm semantics as a pure function, with ``torch.nn.functional.batch_norm``'s signature.

This is where every rule is decided, once:

* ``training=True``: batch statistics normalize; running buffers, if given,
  move in place, ``r ← (1 − m)·r + m·s`` with the *unbiased* batch variance
  for ``running_var`` (an empty batch leaves them).
* ``training=False``: the running buffers normalize and are never written.
* every check and error: rank, values per channel, eps, buffer pairs, sizes.

Which buffers a module passes and its momentum (``momentum=None``) are the
module's business; this function is pure apart from the in-place update.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import autograd, fused_relu
from .errors import ChannelMismatchError, InputRankError


def check_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
    *,
    values_per_channel: bool = True,
    name: str = "batch_norm",
) -> None:
    """Every check of :func:`batch_norm`, with torch's words where torch has them.

    ``values_per_channel=False`` skips the "more than 1 value per channel"
    check, for a caller that counts values over several processes.
    """
    size = input.shape
    if len(size) < 2 and input.numel():
        raise InputRankError(
            f"{name} expects input of shape (N, C, *), got {len(size)}D input of size {list(size)}"
        )
    if training:
        if values_per_channel:
            n = size[0]
            for s in size[2:]:
                n *= s
            if n == 1:
                raise ValueError(  # torch's words, torch.Size included
                    f"Expected more than 1 value per channel when training, got input size {size}"
                )
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if len(size) < 2:
        return  # an empty (0,) input: no channels to check the rest against, as in torch
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training:
        for buffer_name, buffer in (("running_mean", running_mean), ("running_var", running_var)):
            if buffer is None:
                raise RuntimeError(
                    f"{buffer_name} must be defined in evaluation mode: pass the running "
                    "buffers or training=True"
                )
    channels = size[1]
    for tensor_name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is not None and t.numel() != channels:
            raise ChannelMismatchError(
                f"{name}: {tensor_name} has {t.numel()} elements but the input has "
                f"{channels} channels (input size {list(size)}); "
                f"num_features must equal input.shape[1]"
            )


def _checked_buffers(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor | None, Tensor | None]:
    """Every check, then the buffers to hand on: none for an empty training batch, which
    moves nothing."""
    check_arguments(input, running_mean, running_var, weight, bias, training, eps)
    if training and input.numel() == 0:
        return None, None
    return running_mean, running_var


def _without_channels(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """y for an empty (0,) input, the one input without a channel dimension that passes
    the checks: empty, as in torch, and scaled and shifted by the first γ and β, so that
    the three get (zero) gradients and y keeps the input's dtype."""
    y = input.clone()
    if weight is not None:
        y = y * weight[0]
    if bias is not None:
        y = y + bias[0]
    return y


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
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        # As torch's: subclasses, modes and fx proxies see this function's call.
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias),
            input, running_mean, running_var, weight, bias, training, momentum, eps,
        )  # fmt: skip
    training = bool(training)
    # The C++ node first: it takes only calls that pass every check below, which in
    # Python cost about a tenth of a small call.
    y = autograd.small_call(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if y is not None:
        return y
    running_mean, running_var = _checked_buffers(
        input, running_mean, running_var, weight, bias, training, eps
    )
    if input.dim() < 2:
        return _without_channels(input, weight, bias)
    return autograd.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )


def batch_norm_relu(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``relu(batch_norm(...))`` with :func:`batch_norm`'s arguments, rules and errors, in
    one pass each way where the backend fuses them (see :mod:`bnlab.fused_relu`)."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm_relu, (input, running_mean, running_var, weight, bias),
            input, running_mean, running_var, weight, bias, training, momentum, eps,
        )  # fmt: skip
    training = bool(training)
    running_mean, running_var = _checked_buffers(
        input, running_mean, running_var, weight, bias, training, eps
    )
    if input.dim() < 2:
        return _without_channels(input, weight, bias)
    return fused_relu.batch_norm_relu(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
