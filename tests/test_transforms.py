"""torch.func and autograd transforms: bnlab must give torch's numbers, or torch's refusal.

Every case runs the same code on a torch.nn layer and on its bnlab twin (same
arguments, identical random float64 state; see ``_twins``) and compares
outputs, gradients, tangents and the state after (running buffers and
counter). Where torch raises, bnlab must raise the same exception type: which
cases torch refuses is read from the installed torch, never written down here.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch.func import (
    functional_call,
    functionalize,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vjp,
    vmap,
)
from torch.fx.experimental.proxy_tensor import make_fx

import bnlab.functional

from ._twins import (
    F64,
    SHAPES,
    assert_same_tensors,
    check_like_torch,
    copy_state_,
    make_twins,
    net_twins,
    norm_factory,
    randomize_,
)

# Tiny tensors are bound by per-op overhead; a second OpenMP thread on busy cores stalls.
pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = list(SHAPES)
B = 3  # vmapped / batched-gradient dimension


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _twin_layers(rank, **kwargs):
    cls_name, shape = SHAPES[rank]
    theirs, ours = make_twins(cls_name, **kwargs)
    return theirs, ours, shape


# track_running_stats, train, momentum: momentum matters only when tracking in training
MODES = {
    "track-train-m0.1": (True, True, 0.1),
    "track-train-mNone": (True, True, None),
    "track-eval": (True, False, 0.1),
    "notrack-train": (False, True, 0.1),
    "notrack-eval": (False, False, 0.1),
}


# ---- vmap --------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("rank", RANKS)
def test_vmap_module_normalizes_each_slice(rank, affine, track, train):
    """Each slice gets its own batch statistics; torch refuses training with tracked,
    unbatched buffers (an in-place update of them from batched statistics)."""
    theirs, ours, shape = _twin_layers(rank, affine=affine, track_running_stats=track)
    x = _randn(B, *shape)

    def fn(m):
        m.train(train)
        return vmap(m)(x), _state(m)

    check_like_torch(fn, (theirs,), (ours,))


# id -> (in_dims of (x, running_mean, running_var, weight, bias), the batched arguments,
#        running buffers given, weight and bias given)
FUNCTIONAL_CASES = {
    "x0-params-nobuffers": ((0, None, None, None, None), {"x"}, False, True),
    "x0-noaffine-nobuffers": ((0, None, None, None, None), {"x"}, False, False),
    "x0-buffers-unbatched": ((0, None, None, None, None), {"x"}, True, True),
    "x0-buffers0": ((0, 0, 0, None, None), {"x", "rm", "rv"}, True, True),
    "x0-buffers1": ((0, 1, 1, None, None), {"x", "rm", "rv"}, True, True),
    "x1-buffers0": ((1, 0, 0, None, None), {"x", "rm", "rv"}, True, True),
    "xunbatched-buffers0-params0": ((None, 0, 0, 0, 0), {"rm", "rv", "w", "b"}, True, True),
    "xunbatched-weight0": ((None, None, None, 0, None), {"w"}, True, True),
    "xunbatched-weight0-nobuffers": ((None, None, None, 0, None), {"w"}, False, True),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("rank", ["1d-NCL", "2d"])
@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_vmap_functional_in_dims(case, rank, training):
    """bnlab.functional.batch_norm under vmap, every argument batched or not, batched buffers
    at dim 0 or 1 updated in place slice by slice in training (unbatched ones, from an
    unbatched input, once)."""
    in_dims, batched, with_buffers, affine = FUNCTIONAL_CASES[case]
    shape = SHAPES[rank][1]
    c = shape[1]

    def arg(name, dim, base):
        if name not in batched:
            return base
        stacked = torch.stack([base * (1 + 0.5 * i) + 0.1 * i for i in range(B)], dim=dim)
        return stacked.contiguous()

    x = arg("x", in_dims[0], _randn(*shape))
    rm = arg("rm", in_dims[1], _randn(c, seed=1)) if with_buffers else None
    rv = arg("rv", in_dims[2], torch.rand(c, dtype=F64) + 0.5) if with_buffers else None
    w = arg("w", in_dims[3], _randn(c, seed=2)) if affine else None
    b = arg("b", in_dims[4], _randn(c, seed=3)) if affine else None

    def fn(batch_norm):
        buffers = [None if t is None else t.clone() for t in (rm, rv)]

        def call(x, rm, rv, w, b):
            return batch_norm(x, rm, rv, w, b, training, 0.3, 1e-5)

        y = vmap(call, in_dims=in_dims)(x, *buffers, w, b)
        return y, buffers  # buffers: updated in place in training

    def one_slice_at_a_time():
        """Batched buffers: what vmap means, each slice updating its own buffer slice."""
        buffers = [t.clone() for t in (rm, rv)]
        ys = []
        for i in range(B):
            args = [
                t if d is None or t is None else t.select(d, i)
                for t, d in zip((x, *buffers, w, b), in_dims, strict=True)
            ]
            args[1:3] = [t.clone() for t in args[1:3]]
            ys.append(TF.batch_norm(*args, training, 0.3, 1e-5))
            for buffer, d, updated in zip(buffers, in_dims[1:3], args[1:3], strict=True):
                buffer.select(d, i).copy_(updated)
        return torch.stack(ys), buffers

    try:
        expected = fn(TF.batch_norm)
    except Exception as exc:  # torch refuses: bnlab must refuse alike
        with pytest.raises(type(exc)):
            fn(bnlab.functional.batch_norm)
        return
    if in_dims[1] is not None:
        # Buffers are checked against the slice-by-slice loop rather than torch's vmap:
        # torch 2.13 silently leaves buffers batched at dim 1 untouched (it updates a
        # moved copy), a bug bnlab must not copy. Its outputs are right and still compared.
        expected = (expected[0], one_slice_at_a_time()[1])
    assert_same_tensors(fn(bnlab.functional.batch_norm), expected)


# ---- model ensembling and per-sample gradients ----------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_dims", [(0, 0, None), (0, 0, 0)], ids=["shared-x", "per-model-x"])
def test_model_ensembling(in_dims, train, momentum):
    """stack_module_state + functional_call + vmap: K models in one call, buffers stacked
    and (in training) each updated with its own model's batch statistics.

    torch refuses momentum=None in training (float(num_batches_tracked) under vmap);
    there bnlab may refuse too, or must equal the K models run one by one."""
    k = 3
    pairs = [net_twins(momentum, seed=s) for s in range(k)]
    x = _randn(k, 4, 2, 4, 4) if in_dims[2] == 0 else _randn(4, 2, 4, 4)

    def fn(models):
        for m in models:
            m.train(train)
        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")

        def call(p, b, x):
            return functional_call(base, (p, b), (x,))

        y = vmap(call, in_dims=in_dims)(params, buffers, x)
        return y, buffers

    def one_by_one():
        models = [net_twins(momentum, seed=s)[0].train(train) for s in range(k)]
        y = torch.stack([m(x[i] if in_dims[2] == 0 else x) for i, m in enumerate(models)])
        return y, stack_module_state(models)[1]

    check_like_torch(fn, ([p[0] for p in pairs],), ([p[1] for p in pairs],), one_by_one)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_per_sample_gradients(train):
    """vmap(grad(loss)) over samples: each sample is a batch of one (4x4 positions per
    channel, so batch statistics exist); torch refuses tracked buffers in training."""
    theirs, ours = net_twins()
    x, target = _randn(4, 2, 4, 4), torch.tensor([0, 1, 1, 0])

    def fn(model):
        model.train(train)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, x, t):
            out = functional_call(model, (p, buffers), (x[None],))
            return TF.cross_entropy(out, t[None])

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target), _state(model)

    check_like_torch(fn, (theirs,), (ours,))


# ---- grad transforms -------------------------------------------------------------------


def _grad_transform(name, f, arg, tangent, dy):
    """Apply torch.func transform ``name`` to ``f`` (arg -> y) at ``arg``."""

    def scalar(a):  # nonlinear in y, so the Hessian is not zero even in eval
        return (torch.sin(f(a)) * dy).sum()

    if name == "grad":
        return grad(scalar)(arg)
    if name == "vjp":
        y, pullback = vjp(f, arg)
        return y, pullback(dy)
    if name == "jacrev":
        return jacrev(f)(arg)
    if name == "jacfwd":
        return jacfwd(f)(arg)
    if name == "jvp":
        return jvp(f, (arg,), (tangent,))
    if name == "hessian":
        return hessian(scalar)(arg)
    raise AssertionError(name)


GRAD_TRANSFORMS = ["grad", "vjp", "jacrev", "jacfwd", "jvp", "hessian"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize(
    ("wrt", "affine"),
    [("input", True), ("input", False), ("weight-bias", True)],
    ids=["input-affine", "input-noaffine", "weight-bias"],
)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("transform", GRAD_TRANSFORMS)
def test_grad_transforms(transform, rank, wrt, affine, track, train):
    """torch refuses every grad transform of a training module that tracks running stats
    (the counter's in-place add); everything else must match."""
    theirs, ours, shape = _twin_layers(rank, affine=affine, track_running_stats=track)
    x, dy = _randn(*shape), _randn(*shape, seed=1)
    c = shape[1]

    def fn(m):
        m.train(train)
        if wrt == "input":
            arg, tangent, f = x, _randn(*shape, seed=2), m
        else:
            arg = {"weight": m.weight.detach(), "bias": m.bias.detach()}
            tangent = {"weight": _randn(c, seed=3), "bias": _randn(c, seed=4)}

            def f(p):
                return functional_call(m, p, (x,))

        return _grad_transform(transform, f, arg, tangent, dy), _state(m)

    check_like_torch(fn, (theirs,), (ours,))


# ---- forward-mode AD ---------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("params", ["affine", "affine-frozen", "noaffine"])
@pytest.mark.parametrize("rank", RANKS)
def test_forward_ad_dual_input(rank, params, mode):
    """A dual input gets a tangent out, also when nothing requires grad (affine-frozen,
    noaffine: forward AD needs no autograd graph); the buffers still move as usual."""
    track, train, momentum = MODES[mode]
    theirs, ours, shape = _twin_layers(
        rank, affine=params != "noaffine", track_running_stats=track, momentum=momentum
    )
    x, tx = _randn(*shape), _randn(*shape, seed=1)

    def fn(m):
        m.train(train)
        m.requires_grad_(params == "affine")
        with fwAD.dual_level():
            y = fwAD.unpack_dual(m(fwAD.make_dual(x, tx)))
            return y.primal.detach(), y.tangent, _state(m)

    check_like_torch(fn, (theirs,), (ours,))


@pytest.mark.parametrize("dual_input", [True, False], ids=["dual-x", "plain-x"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("rank", RANKS)
def test_forward_ad_dual_weight_and_bias(rank, track, train, dual_input):
    """Tangents on γ and β (given through functional_call) reach the output."""
    theirs, ours, shape = _twin_layers(rank, track_running_stats=track)
    c = shape[1]
    x, tx = _randn(*shape), _randn(*shape, seed=1)
    tw, tb = _randn(c, seed=2), _randn(c, seed=3)

    def fn(m):
        m.train(train)
        with fwAD.dual_level():
            params = {
                "weight": fwAD.make_dual(m.weight.detach(), tw),
                "bias": fwAD.make_dual(m.bias.detach(), tb),
            }
            inp = fwAD.make_dual(x, tx) if dual_input else x
            y = fwAD.unpack_dual(functional_call(m, params, (inp,)))
            return y.primal.detach(), y.tangent, _state(m)

    check_like_torch(fn, (theirs,), (ours,))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "dual", [("x", "rm", "rv"), ("x", "rm"), ("rm", "rv"), ("rv",)], ids="+".join
)
def test_forward_ad_tangents_on_running_buffers(dual, training):
    """torch: in eval a dual buffer with a dual input raises RuntimeError; in training the
    buffer's tangent is ignored; a dual buffer alone gives the output no tangent."""
    shape = SHAPES["1d-NCL"][1]
    c = shape[1]
    values = {
        "x": _randn(*shape),
        "rm": _randn(c, seed=1),
        "rv": torch.rand(c, dtype=F64) + 0.5,
        "w": _randn(c, seed=2),
        "b": _randn(c, seed=3),
    }
    tangents = {k: _randn(*v.shape, seed=10 + i) for i, (k, v) in enumerate(values.items())}

    def fn(batch_norm):
        with fwAD.dual_level():
            a = {k: v.clone() for k, v in values.items()}
            for k in dual:
                a[k] = fwAD.make_dual(a[k], tangents[k])
            y = batch_norm(a["x"], a["rm"], a["rv"], a["w"], a["b"], training, 0.1, 1e-5)
            y = fwAD.unpack_dual(y)
            buffers = {k: tuple(fwAD.unpack_dual(a[k])) for k in ("rm", "rv")}
            return y.primal, y.tangent, buffers

    check_like_torch(fn, (TF.batch_norm,), (bnlab.functional.batch_norm,))


# ---- batched gradients, gradcheck, double backward ------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("rank", RANKS)
def test_is_grads_batched(rank, affine, track, train):
    """B vector-Jacobian products in one backward (vmap over the backward: the grad_outputs
    arrive as tensors without storage)."""
    theirs, ours, shape = _twin_layers(rank, affine=affine, track_running_stats=track)
    x, dys = _randn(*shape), _randn(B, *shape, seed=1)

    def fn(m):
        m.train(train)
        xr = x.clone().requires_grad_()
        inputs = (xr, m.weight, m.bias) if affine else (xr,)
        y = m(xr)
        return y, torch.autograd.grad(y, inputs, dys, is_grads_batched=True), _state(m)

    check_like_torch(fn, (theirs,), (ours,))


GRADCHECK_STATS = {
    # training=True with no buffers, training=True updating buffers, training=False
    "train-batch-stats": (True, False),
    "train-updating-buffers": (True, True),
    "eval-running-stats": (False, True),
}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("stats", list(GRADCHECK_STATS))
@pytest.mark.parametrize("shape", [(3, 2), (2, 2, 2, 2)], ids=["1d-NC", "2d"])
def test_gradcheck_all_modes(shape, stats, affine):
    """gradcheck/gradgradcheck with batched, forward-mode and undefined-grad checks, on
    inputs small enough for the numerical Jacobians of second derivatives.

    Required of bnlab wherever torch's own batch_norm passes the same check."""
    training, with_buffers = GRADCHECK_STATS[stats]
    c = shape[1]
    x = _randn(*shape).requires_grad_()
    w = (torch.rand(c, dtype=F64) + 0.5).requires_grad_()
    b = _randn(c, seed=1).requires_grad_()
    inputs = (x, w, b) if affine else (x,)

    def wrap(batch_norm):
        rm = _randn(c, seed=2) if with_buffers else None
        rv = torch.rand(c, dtype=F64) + 0.5 if with_buffers else None

        def f(*inp):
            wb = inp[1:] if affine else (None, None)
            return batch_norm(inp[0], rm, rv, *wb, training, 0.1, 1e-3)

        return f

    checks = [
        (
            torch.autograd.gradcheck,
            {
                "check_batched_grad": True,
                "check_forward_ad": True,
                "check_backward_ad": True,
                "check_undefined_grad": True,
                "check_batched_forward_grad": True,
            },
        ),
        (
            torch.autograd.gradgradcheck,
            {
                "check_batched_grad": True,
                "check_fwd_over_rev": True,
                "check_rev_over_rev": True,
                "check_undefined_grad": True,
            },
        ),
    ]
    for check, kwargs in checks:
        if check(wrap(TF.batch_norm), inputs, raise_exception=False, **kwargs):
            # raise_exception (the default) so a failure says which check failed and why
            assert check(wrap(bnlab.functional.batch_norm), inputs, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("rank", RANKS)
def test_double_backward(rank, affine, mode):
    """Gradients of a function of the first gradients (create_graph=True), w.r.t. x, γ, β
    and the incoming gradient dy."""
    track, train, momentum = MODES[mode]
    theirs, ours, shape = _twin_layers(
        rank, affine=affine, track_running_stats=track, momentum=momentum
    )
    x, dy, v = _randn(*shape), _randn(*shape, seed=1), _randn(*shape, seed=2)

    def fn(m):
        m.train(train)
        xr, dyr = x.clone().requires_grad_(), dy.clone().requires_grad_()
        params = [m.weight, m.bias] if affine else []
        y = m(xr)
        first = torch.autograd.grad(y, [xr, *params], dyr, create_graph=True)
        # ∂/∂(x, γ, β, dy) of a scalar built from the first gradients (all of them used);
        # materialized: in eval dx does not depend on x, a zero rather than None
        z = (first[0] * v).sum() + sum((g * g).sum() for g in first[1:]) + (first[0] ** 2).sum()
        second = torch.autograd.grad(z, [xr, *params, dyr], materialize_grads=True)
        return y, first, second, _state(m)

    check_like_torch(fn, (theirs,), (ours,))


# ---- jit.trace ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("rank", ["1d-NC", "2d", "3d"])
def test_jit_trace(rank, affine, mode):
    """A traced module, saved and loaded, run twice (on new inputs) forward and backward,
    matches torch's traced module.

    torch's own trace fails its check for momentum=None in training (it bakes
    1/num_batches_tracked in as a constant); then bnlab's may fail too, but if it
    traces it must keep the cumulative average: it is compared with eager torch from
    the state it was left in by tracing."""
    track, train, momentum = MODES[mode]
    theirs, ours, shape = _twin_layers(
        rank, affine=affine, track_running_stats=track, momentum=momentum
    )
    x, x1, x2 = _randn(*shape), _randn(*shape, seed=1), _randn(*shape, seed=2)

    def trace(m):
        m.train(train)
        with warnings.catch_warnings():  # jit.trace is deprecated but still supported
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.trace(m, (x,))

    def run(m):
        if isinstance(m, torch.jit.ScriptModule):  # kept and loaded, as a traced model is
            buffer = io.BytesIO()
            torch.jit.save(m, buffer)
            buffer.seek(0)
            m = torch.jit.load(buffer)
        outputs = []
        for xi in (x1, x2):
            xr = xi.clone().requires_grad_()
            y = m(xr)
            y.backward(xr.detach() + 1)
            outputs.append((y.detach(), xr.grad))
        return outputs, [p.grad for p in m.parameters()], _state(m)

    try:
        traced_theirs = trace(theirs)
    except Exception:  # torch refuses this trace: bnlab need not trace it either
        try:
            traced_ours = trace(ours)
        except Exception:
            return
        eager = copy.deepcopy(theirs)
        copy_state_(eager, ours)
        assert_same_tensors(run(traced_ours), run(eager))
        return
    traced_ours = trace(ours)
    assert_same_tensors(_state(traced_ours), _state(traced_theirs), "state after tracing")
    assert_same_tensors(run(traced_ours), run(traced_theirs))


# ---- make_fx and dispatch modes ----------------------------------------------------


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("mode", ["track-train-m0.1", "track-eval", "notrack-train"])
def test_make_fx(mode, tracing_mode):
    """A graph made by make_fx (the layer called with its state as inputs), replayed on
    fresh copies of that state and a new input: torch's graph's outputs and buffers.
    (Raw kernel calls, which no dispatch mode sees, had left a graph of empty_like.)"""
    track, train, momentum = MODES[mode]
    theirs, ours, shape = _twin_layers("2d", track_running_stats=track, momentum=momentum)
    x, x1 = _randn(*shape), _randn(*shape, seed=1)

    def replay(m):
        m.train(train)
        state = dict(m.named_parameters()) | dict(m.named_buffers())
        fresh = {k: v.detach().clone() for k, v in state.items()}
        graph = make_fx(lambda s, t: functional_call(m, s, (t,)), tracing_mode=tracing_mode)(
            {k: v.clone() for k, v in fresh.items()}, x
        )
        y = graph(fresh, x1)
        return y, fresh

    assert_same_tensors(replay(ours), replay(theirs), f"make_fx {tracing_mode}")


FUNCTIONALIZED = {
    "functionalize": lambda f: functionalize(f),
    "make_fx(functionalize)": lambda f: (
        lambda s, t: make_fx(functionalize(f), tracing_mode="fake")(
            {k: v.clone() for k, v in s.items()}, t
        )(s, t)
    ),
    "grad(functionalize)": lambda f: (
        lambda s, t: grad(lambda t: functionalize(f)(s, t).square().sum())(t)
    ),
    "functionalize(grad)": lambda f: functionalize(
        grad(lambda s, t: f(s, t).square().sum(), argnums=1)
    ),
}


@pytest.mark.parametrize("transform", list(FUNCTIONALIZED))
@pytest.mark.parametrize("mode", ["track-train-m0.1", "track-eval", "notrack-train"])
def test_functionalize(mode, transform):
    """functionalize alone, traced by make_fx, and around or inside grad: outputs and the
    state it leaves as torch's, or torch's exception type (grad refuses the running
    update of a buffer it captured). functionalize has no rule for an autograd Function."""
    track, train, momentum = MODES[mode]
    theirs, ours, shape = _twin_layers("2d", track_running_stats=track, momentum=momentum)
    x = _randn(*shape)

    def run(m):
        m.train(train)
        state = {k: v.detach().clone() for k, v in (m.state_dict()).items()}
        out = FUNCTIONALIZED[transform](lambda s, t: functional_call(m, s, (t,)))(state, x)
        return out, state

    check_like_torch(run, (theirs,), (ours,))


def test_a_dispatch_mode_sees_the_batch_norm():
    """A user's TorchDispatchMode sees an op that normalizes (bnlab's custom op), and the
    numbers stay torch's, in training and eval."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    theirs, ours, shape = _twin_layers("2d")
    x = _randn(*shape)
    for train in (True, False):
        outputs = []
        for m in (theirs, ours):
            with Seen() as seen:
                outputs.append((m.train(train)(x), _state(m)))
            assert any("batch_norm" in op or "bnlab.cpu_forward" in op for op in seen.ops)
        assert_same_tensors(outputs[1], outputs[0], f"train={train}")


# ---- autocast ----------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_cpu_bfloat16(train):
    """conv (run in bf16 by autocast) -> BN: bf16 output and input gradient, float32
    running stats and γ/β gradients, as torch's.

    Tolerances. Both BNs get the identical bf16 conv output and accumulate in
    float32, so their statistics agree to float32 rounding (~1e-7 relative). Each
    element of y and of dx is then rounded once to bf16 (8 significant bits), where
    a last-bit float32 difference can flip the rounding: one bf16 ulp, 2^-8 of the
    value; rtol=2^-7 allows that and nothing coarser. The buffers and dγ, dβ are
    float32 sums over 100 values per channel of those same bf16 inputs (the
    incoming gradient is a fixed tensor, not a function of the rounded y), so they
    get float32 summation-order tolerances.
    """
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x, dy = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 5, 5)
    results = []
    for library in ("torch", "bnlab"):
        bn = norm_factory(library)(3).float()
        randomize_(bn)  # γ, β far from 1, 0: a wrong β or γ shows
        model = torch.nn.Sequential(copy.deepcopy(conv), bn).train(train)
        seen = {}
        model[0].register_forward_hook(lambda _m, _i, out, seen=seen: seen.update(z=out))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
            seen["z"].retain_grad()  # BN's input: its grad is BN's dx
        y.backward(dy.to(y.dtype))
        results.append((y, seen["z"].grad, bn))
    (y_t, dz_t, bn_t), (y_o, dz_o, bn_o) = results
    assert y_t.dtype == torch.bfloat16 and dz_t.dtype == torch.bfloat16  # autocast really ran
    assert y_o.dtype == y_t.dtype and dz_o.dtype == dz_t.dtype
    torch.testing.assert_close(y_o, y_t, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(dz_o, dz_t, rtol=2**-7, atol=1e-3)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_o, name), getattr(bn_t, name), rtol=1e-5, atol=1e-6)
    for name in ("weight", "bias"):
        a, b = getattr(bn_o, name).grad, getattr(bn_t, name).grad
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_small_net_twins_agree_eagerly():
    """The twins the transform tests rely on: equal in plain eager training and eval."""
    theirs, ours = net_twins()
    x = _randn(4, 2, 4, 4)
    for train in (True, False):
        theirs.train(train)
        ours.train(train)
        assert_same_tensors(ours(x), theirs(x))
    assert_same_tensors(_state(ours), _state(theirs))
