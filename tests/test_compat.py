"""The torch internals bnlab uses (bnlab._compat) exist in the installed torch and behave.

If a torch release removes or changes one, these fail: bnlab would still be
correct (each has a public fallback) but slower, and that should be seen.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad
from torch.func import vmap

from bnlab import _compat


def test_internals_present():
    assert _compat.INTERNALS
    assert _compat.DISPATCH_MODES
    assert _compat.FUNCTIONALIZE


def test_functionalizing():
    from torch.func import functionalize, grad

    seen = []

    def f(x):
        seen.append(_compat.functionalizing())
        return x.sum()

    f(torch.ones(2))
    functionalize(f)(torch.ones(2))
    functionalize(grad(f))(torch.ones(2))  # functionalize outside, grad innermost
    grad(f)(torch.ones(2))
    assert seen == [False, True, True, False]


def test_dispatch_mode_active():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not _compat.dispatch_mode_active()
    with Passthrough():
        assert _compat.dispatch_mode_active()
    assert not _compat.dispatch_mode_active()


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(x, k):
        return x * k

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k = inputs[1]

    @staticmethod
    def backward(ctx, dy):
        return dy * ctx.k, None

    @staticmethod
    def vmap(info, in_dims, x, k):
        return _Double.apply(x, k), in_dims[0]


def test_applier_equals_apply():
    apply = _compat.applier(_Double, tensors=1)
    x = torch.randn(3, requires_grad=True)
    y = apply(x, 2.0)
    y.sum().backward()
    assert torch.equal(y.detach(), x.detach() * 2) and torch.equal(x.grad, torch.full((3,), 2.0))
    # Under a transform the public apply (and the vmap rule) takes over.
    assert torch.equal(vmap(lambda t: apply(t, 3.0))(torch.ones(2, 3)), torch.full((2, 3), 3.0))


def test_transforms_active():
    assert not _compat.transforms_active()
    seen = []
    vmap(lambda t: seen.append(_compat.transforms_active()) or t)(torch.ones(2))
    assert seen == [True]


def test_forward_ad_active():
    assert not _compat.forward_ad_active()
    with forward_ad.dual_level():
        assert _compat.forward_ad_active()
    assert not _compat.forward_ad_active()


def test_has_storage():
    assert _compat.has_storage(torch.ones(2))
    seen = []
    vmap(lambda t: seen.append(_compat.has_storage(t)) or t)(torch.ones(2, 3))
    assert seen == [False]


def test_cxx11_abi_is_what_torch_was_built_with():
    """torch says which libstdc++ ABI it uses; the node's build must match it."""
    assert hasattr(torch._C, "_GLIBCXX_USE_CXX11_ABI")
    assert _compat.cxx11_abi() == int(torch._C._GLIBCXX_USE_CXX11_ABI)
