"""Where a batch norm's fixed cost is all there is: small calls on torch's kernel.

A call that records a graph pays for bnlab's autograd function (a Python
``forward``, ``setup_context`` and ``backward``, and the engine's calls into
them), where torch's batch norm has its autograd node in C++; any call pays
for bnlab's checks of what it hands its kernels, in Python. Below some size
the kernels cannot win that back, and the user would be slower with bnlab
than with torch.nn. Such calls go to ``torch.batch_norm``: torch's own kernel,
numbers and gradients, after bnlab's checks and buffer choices.

The rule (:func:`use_torch_kernel`, tested in tests/test_small_calls.py):

* x takes at most :data:`MAX_BYTES` (256 KiB: 65536 float32 values, 131072
  bfloat16 ones), the crossover measured by
  ``python benchmarks/bench_small_calls.py`` (README, "Small calls"). Per
  value, the 16-bit kernels save less over torch's than the float32 ones, so
  the crossover is a size in bytes rather than in values;
* the call records a graph (a training step), or normalizes with running
  statistics (inference: one elementwise pass, exact in either kernel).
  Training forwards without a graph keep bnlab's kernels, which win there;
* it is plain eager autograd on the CPU: no forward-mode AD, functorch
  transform, tracer or compiler (those keep bnlab's one path, with its jvp
  and vmap rules; :func:`bnlab.autograd.batch_norm` checks them), and arguments
  torch's kernel takes as they are: a float momentum, parameters and buffers
  in x's dtype, or float32 ones for 16-bit x (16-bit buffers stay with bnlab,
  whose update rounds once).

What changes below the crossover in a training step is the statistics'
numerics: torch's float32 statistics lose precision when |mean| ≫ std, which
bnlab's shifted sums do not. ``BNLAB_SMALL_CALLS=bnlab`` keeps every call on
bnlab's kernels.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

# Bytes of x at or below which a call runs on torch's kernel.
MAX_BYTES = 256 << 10
ENABLED = os.environ.get("BNLAB_SMALL_CALLS", "").lower() != "bnlab"

_HALF = (torch.bfloat16, torch.float16)


def _takes(x: Tensor, t: Tensor | None, buffer: bool) -> bool:
    """Whether torch's CPU kernel takes ``t`` beside 16-bit ``x`` as it is: float32, or x's
    dtype for a parameter (16-bit running buffers stay with bnlab, whose update rounds once)."""
    return t is None or t.dtype is torch.float32 or (t.dtype is x.dtype and not buffer)


def use_torch_kernel(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | Tensor,
) -> bool:
    """Whether this call is small enough for torch's kernel to win (see above); the caller
    knows that it records a graph or normalizes with running statistics, and that no
    forward-mode AD, transform or tracer is active."""
    if (
        not ENABLED
        or x.numel() * x.element_size() > MAX_BYTES
        or not x.is_cpu
        or isinstance(momentum, Tensor)
    ):
        return False
    d = x.dtype
    if d in _HALF:
        return (
            _takes(x, weight, False)
            and _takes(x, bias, False)
            and _takes(x, running_mean, True)
            and _takes(x, running_var, True)
        )
    return (
        (weight is None or weight.dtype is d)
        and (bias is None or bias.dtype is d)
        and (running_mean is None or running_mean.dtype is d)
        and (running_var is None or running_var.dtype is d)
    )
