"""The few torch internals bnlab relies on, each with a public fallback.

Everything here is private to torch and may change between releases. Each
name has a fallback that is always correct (only slower), and
tests/test_compat.py fails if an internal disappears, so a torch upgrade
shows up as a failing test rather than as a silent slowdown.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd import forward_ad as _forward_ad

try:
    transforms_active = torch._C._are_functorch_transforms_active
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
    _is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    _is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # is_grads_batched's
    INTERNALS = True

    def _is_wrapped(t: Tensor) -> bool:
        return _is_functorch_wrapped(t) or _is_legacy_batched(t)
except AttributeError:  # pragma: no cover - depends on the torch release
    INTERNALS = False

    def transforms_active() -> bool:
        return True  # assume the worst: always take the public apply

    def _is_wrapped(t: Tensor) -> bool:
        try:
            t.data_ptr()
        except RuntimeError:
            return True
        return False


def applier(cls: type[Function], tensors: int) -> Callable:
    """``cls.apply``, skipping its per-call signature binding where that is equivalent.

    ``Function.apply`` binds every call's arguments with ``inspect.signature``
    (longer than a small batch norm takes) so it can fill in defaults. With
    every argument positional, no functorch transform active and no compiler
    tracing, the C++ base apply does the rest of the same work. The first
    ``tensors`` arguments are the ones that may be tensors.
    """
    public = cls.apply
    if not INTERNALS:
        return public
    base = super(Function, cls).apply

    def apply(*args):
        if transforms_active() or torch.compiler.is_compiling():
            return public(*args)
        # As Function.apply: a tensor left over from a finished transform is unwrapped.
        return base(
            *[None if a is None else _unwrap_if_dead(a) for a in args[:tensors]], *args[tensors:]
        )

    return apply


try:
    from torch._C._functorch import TransformType as _TransformType
    from torch._C._functorch import get_interpreter_stack as _transform_stack

    FUNCTIONALIZE = True
except ImportError:  # pragma: no cover - depends on the torch release
    FUNCTIONALIZE = False


def functionalizing() -> bool:
    """Whether ``functionalize`` is among the active functorch transforms: it has no
    rule for a Python autograd function. Without the internal: False (and
    functionalize meets the autograd function, and refuses)."""
    if not (FUNCTIONALIZE and transforms_active()):
        return False
    return any(t.key() == _TransformType.Functionalize for t in _transform_stack() or ())


try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _in_dispatch_mode

    DISPATCH_MODES = True
except ImportError:  # pragma: no cover - depends on the torch release
    DISPATCH_MODES = False


def dispatch_mode_active() -> bool:
    """Whether a Python dispatch mode is active (make_fx, FakeTensorMode, a user's
    TorchDispatchMode): it sees only calls that go through the dispatcher, so raw
    kernel calls must not bypass it. Without the internal: assume one is."""
    return _in_dispatch_mode() if DISPATCH_MODES else True


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (dual tensors may be around)."""
    return getattr(_forward_ad, "_current_level", 0) >= 0


def has_storage(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor with memory (not a vmap or grad wrapper).

    Under ``torch.compile`` tensors are traced stand-ins for plain ones: True.
    """
    return torch.compiler.is_compiling() or not _is_wrapped(t)


def cxx11_abi() -> int:
    """The libstdc++ ABI torch was built with (``_GLIBCXX_USE_CXX11_ABI``), for code built
    against its headers; the new ABI (every torch wheel since 2.7) when torch does not say."""
    return int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
