"""bnlab against torch on PyTorch's own batch-norm samples.

torch ships the inputs its own tests run on. For its modules
(``common_modules.module_db``): for each BatchNorm class, constructor
arguments and inputs that cover momentum=None, no affine, no running stats,
bias=False, an empty batch and (N, C, L) input, and the calls that must
fail. For ``F.batch_norm`` (``common_methods_invocations.op_db``): calls with
negative and zero momentum, a large eps, no buffers in training, one value
per channel in eval, and an empty 1-d input. Each sample runs on torch and on
bnlab with equal state, and both must give the same outputs, gradients
(reverse and forward mode) and buffers, in the input's layout, or raise the
same error.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import bnlab.functional
import bnlab.nn

from ._twins import copy_state_, randomize_

BATCH_NORMS = [info for info in module_db if info.module_cls.__name__.startswith("BatchNorm")]
(FUNCTIONAL,) = [
    op for op in op_db if (op.name, op.variant_test_name) == ("nn.functional.batch_norm", "")
]

# float64: both sides sum the same values in a different order, a few ulps apart.
# float32: a channel's sums run over at most 128 values in these samples, and a
# reordered sum of n terms can drift by n half-ulps at worst (128 * 6e-8 = 7.7e-6,
# relative); the unit-scale inputs and a standard deviation near 1 keep that
# scale through the normalization and the gradients' sums.
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def test_torch_lists_every_batch_norm_class():
    """The samples below exist: a torch without them would leave this file testing nothing."""
    assert sorted(info.module_cls.__name__ for info in BATCH_NORMS) == [
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
    ]


def _samples(info, dtype, training):
    return info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    )


def _twins(info, sample, dtype):
    """torch's module and bnlab's from the sample's arguments, with equal random state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs, dtype=dtype)
    ours = getattr(bnlab.nn, info.module_cls.__name__)(*args, **kwargs, dtype=dtype)
    randomize_(theirs)
    copy_state_(ours, theirs)
    return theirs, ours


def _layouts(x: torch.Tensor):
    """x as given, in channels-last memory (4d and 5d), and as a non-contiguous view."""
    yield "contiguous", x
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        yield "channels_last", x.contiguous(memory_format=fmt)
    # Batch and channel swapped in memory, then back: same values, strides no
    # memory format names.
    yield "non-contiguous", x.transpose(0, 1).contiguous().transpose(0, 1)


def _run(module, x, dy, training):
    module.train(training)
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [p.grad for p in module.parameters()]
    return y, x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.module_cls.__name__)
def test_samples_match_torch(info, training, dtype):
    tol = TOLERANCE[dtype]
    samples = _samples(info, dtype, training)
    assert samples
    for sample in samples:
        (x,) = sample.forward_input.args
        for layout, xs in _layouts(x):
            where = f"{sample.desc or 'default'}, {layout}"
            theirs, ours = _twins(info, sample, dtype)
            dy = torch.randn_like(xs)
            y_t, dx_t, grads_t = _run(theirs, xs, dy, training)
            y_o, dx_o, grads_o = _run(ours, xs, dy, training)
            assert y_o.stride() == y_t.stride(), f"{where}: output strides"
            torch.testing.assert_close(y_o, y_t, **tol, msg=lambda m, w=where: f"{w}, y: {m}")
            torch.testing.assert_close(dx_o, dx_t, **tol, msg=lambda m, w=where: f"{w}, dx: {m}")
            for (name, _), g_o, g_t in zip(
                theirs.named_parameters(), grads_o, grads_t, strict=True
            ):
                torch.testing.assert_close(
                    g_o, g_t, **tol, msg=lambda m, w=where, n=name: f"{w}, {n}.grad: {m}"
                )
            state_t, state_o = theirs.state_dict(), ours.state_dict()
            assert list(state_o) == list(state_t), where
            for name in state_t:
                torch.testing.assert_close(
                    state_o[name],
                    state_t[name],
                    **tol,
                    msg=lambda m, w=where, n=name: f"{w}, {n}: {m}",
                )


@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.module_cls.__name__)
def test_gradcheck_on_the_samples(info):
    """bnlab's hand-written backward and its double backward, numerically, on torch's
    samples in training (batch statistics) and eval (running statistics)."""
    for training in (True, False):
        for sample in _samples(info, torch.float64, training):
            (x,) = sample.forward_input.args
            if x.numel() == 0:
                continue  # nothing to perturb
            _, ours = _twins(info, sample, torch.float64)
            ours.train(training)
            names = [name for name, _ in ours.named_parameters()]

            # Training normalizes by the batch's statistics and eval by the running
            # ones, which training only writes: the running update between
            # evaluations leaves the outputs as they were.
            def f(x, *params, module=ours, names=names):
                return torch.func.functional_call(
                    module, dict(zip(names, params, strict=True)), (x,)
                )

            inputs = (
                x.detach().requires_grad_(),
                *(p.detach().requires_grad_() for p in ours.parameters()),
            )
            assert torch.autograd.gradcheck(f, inputs), sample.desc
            assert torch.autograd.gradgradcheck(f, inputs), sample.desc


@pytest.mark.parametrize("info", BATCH_NORMS, ids=lambda info: info.module_cls.__name__)
def test_error_samples_raise_like_torch(info):
    samples = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=False, training=True
    )
    assert samples
    for error in samples:
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        for cls in (info.module_cls, getattr(bnlab.nn, info.module_cls.__name__)):
            if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(error.error_type, match=error.error_regex):
                    cls(*args, **kwargs, dtype=torch.float64)
                continue
            module = cls(*args, **kwargs, dtype=torch.float64)
            with pytest.raises(error.error_type, match=error.error_regex):
                module(*sample.forward_input.args, **sample.forward_input.kwargs)


def _functional_call(fn, sample, tangents=None):
    """``fn`` on fresh copies of the sample's tensors, the running buffers included: y, the
    buffers after the call, and y's tangent when ``tangents`` (for x, weight, bias) are given."""
    x = sample.input.detach().clone()
    running_mean, running_var, weight, bias = (
        None if t is None else t.detach().clone() for t in sample.args
    )
    kwargs = sample.kwargs

    def f(x, weight, bias):
        return fn(x, running_mean, running_var, weight, bias, **kwargs)

    if tangents is None:
        y = f(x, weight, bias)
        tangent = None
    else:
        primals = (x, weight, bias)
        present = [k for k, t in enumerate(primals) if t is not None]

        def g(*ts):
            args = list(primals)
            for k, t in zip(present, ts, strict=True):
                args[k] = t
            return f(*args)

        y, tangent = torch.func.jvp(
            g, tuple(primals[k] for k in present), tuple(tangents[k] for k in present)
        )
    return y, (running_mean, running_var), tangent


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_functional_samples_match_torch(dtype):
    tol = TOLERANCE[dtype]
    samples = list(FUNCTIONAL.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    for k, sample in enumerate(samples):
        where = f"sample {k}: x {tuple(sample.input.shape)}, {sample.kwargs}"
        ours = _functional_call(bnlab.functional.batch_norm, sample)
        theirs = _functional_call(torch.nn.functional.batch_norm, sample)
        for name, a, b in zip(
            ("y", "running_mean", "running_var"),
            (ours[0], *ours[1]),
            (theirs[0], *theirs[1]),
            strict=True,
        ):
            assert (a is None) == (b is None), f"{where}: {name}"
            if b is not None:
                torch.testing.assert_close(
                    a, b, **tol, msg=lambda m, w=where, n=name: f"{w}, {n}: {m}"
                )
        # Reverse mode: the gradients of x, weight and bias for one random dy.
        differentiable = [sample.input] + [t for t in sample.args[2:] if t is not None]
        dy = torch.randn_like(theirs[0])
        grads = []
        for fn in (bnlab.functional.batch_norm, torch.nn.functional.batch_norm):
            leaves = [t.detach().clone().requires_grad_() for t in differentiable]
            it = iter(leaves[1:])
            weight, bias = (None if t is None else next(it) for t in sample.args[2:])
            rm, rv = (None if t is None else t.detach().clone() for t in sample.args[:2])
            y = fn(leaves[0], rm, rv, weight, bias, **sample.kwargs)
            grads.append(torch.autograd.grad(y, leaves, dy, allow_unused=True))
        for a, b in zip(*grads, strict=True):
            if b is None:
                assert a is None or not a.any(), where
            else:
                torch.testing.assert_close(a, b, **tol, msg=lambda m, w=where: f"{w}, grad: {m}")
        # Forward mode: y's tangent for random tangents of x, weight and bias.
        tangents = [
            None if t is None else torch.randn_like(t) for t in (sample.input, *sample.args[2:])
        ]
        ours_t = _functional_call(bnlab.functional.batch_norm, sample, tangents)[2]
        theirs_t = _functional_call(torch.nn.functional.batch_norm, sample, tangents)[2]
        torch.testing.assert_close(
            ours_t, theirs_t, **tol, msg=lambda m, w=where: f"{w}, tangent: {m}"
        )
