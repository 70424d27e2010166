"""Plain eager calls behind a C++ autograd node, which costs less than the Python function.

bnlab's autograd function is Python (``forward``, ``setup_context``,
``backward``, and the engine's calls into them), and every call checks in
Python what it hands the kernels: about 20 µs a training step more than
torch's batch norm, whose node is C++. Below some size the kernels cannot
win that back, and above it the function still costs 3-13%. So plain eager
calls of every size run on ``kernels/cpu_node.cpp``: the
same kernels and checks behind a C++ autograd node, called without the
dispatcher (``bnlab.kernels._build.node``). Their numbers are bnlab's:
shifted sums with a float64 carry, the running update rounded once.

The rule (:func:`batch_norm` returns None for a call it does not take;
tests/test_small_calls.py):

* a call that records a graph: x takes at most :data:`MAX_BYTES`, which is
  no limit: on 3-13 MB training steps, without page faults, the node ran at
  1.035-1.128x the function's speed (README, "Small calls"). Setting it
  sends larger training calls to the one path (with its jvp and vmap rules);
* a call without a graph (inference, anything under no_grad): every size. It
  leaves no autograd node behind, and on 1.2-13 MB inference the node ran at
  1.0-1.25x the function's speed (README, "Small calls");
* plain eager autograd on the CPU: no forward-mode AD, functorch transform,
  tracer or compiler (:func:`bnlab.autograd.small_call` checks them; they keep
  the Python function);
* arguments the kernels take as they are: x contiguous or channels_last,
  a float momentum, parameters in x's compute dtype (float32 for 16-bit x),
  running buffers float32 or float64 and contiguous. Anything else is
  converted on the one path;
* plain tensors and no torch-function or dispatch mode: a subclass or a mode
  (FakeTensorMode, a logging mode) expects to see the ops run.

The node decides this in C++, where it costs a fraction of the same tests in
Python.

When the node cannot be built (no compiler, or a torch without its C++
headers), every call takes the one path. ``BNLAB_SMALL_CALLS=bnlab`` does too.
"""

from __future__ import annotations

import os

from torch import Tensor
from torch.overrides import has_torch_function

from .kernels import _build

# Bytes of x at or below which a call that records a graph runs behind the C++ node:
# every size (the node compares it as a signed 64-bit count).
MAX_BYTES = (1 << 63) - 1
ENABLED = os.environ.get("BNLAB_SMALL_CALLS", "").lower() != "bnlab"


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor | None:
    """y through the C++ node (``cpu_node.cpp``'s ``batch_norm``), or None when the call is
    not one it takes (see above). The caller has made bnlab's checks and knows the call is
    plain eager autograd."""
    if not ENABLED or has_torch_function((x, weight, bias, running_mean, running_var)):
        return None  # a subclass or a torch-function mode: it expects to see the ops
    node = _build.node()
    if node is None:
        return None
    return node.batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps, MAX_BYTES
    )
