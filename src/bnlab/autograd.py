"""The one autograd function behind every bnlab batch norm.

``BatchNormFunction`` normalizes with batch statistics (``training``; the
running buffers, when given, move in place) or with the running ones, on the
backend :func:`bnlab.kernels.select` picks, and carries:

* a hand-written ``backward`` (the backend's, or the differentiable reference
  formulas when a graph of the backward is wanted or the tensors have no
  storage: double backward, batched gradients, grad transforms);
* ``jvp``, forward-mode AD by batch norm's tangent formulas;
* a ``vmap`` rule with torch's batching semantics: each vmapped slice is
  normalized with its own statistics.

It returns (y, stats), stats the (2, C) rows mean and invstd of the backend
contract: not differentiable, returned only so that ``setup_context`` can save
them. :func:`batch_norm` returns y.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _compat, kernels, small_calls
from .kernels import reference
from .kernels._op_autograd import requested
from .kernels.protocol import captured


class _BatchNormGraph(torch.autograd.Function):
    """:class:`BatchNormFunction` without forward-mode AD, for ``torch.compile``.

    Dynamo cannot trace a Function with a custom ``jvp`` (and a compiled
    graph does no forward-mode AD); everything else is this class's.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float | Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        backend = kernels.select(x)
        if training:
            return backend.forward_train(x, weight, bias, eps, running_mean, running_var, momentum)
        return backend.forward_eval(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, _, _, training, _, eps = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        # None for an input without a tangent (or an output without a
        # gradient), not zeros: a running buffer's tangent must be told apart.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, stats)
        if _compat.forward_ad_active() or _compat.transforms_active():  # jvp may follow
            ctx.save_for_forward(x, weight, stats)
        ctx.training, ctx.eps = training, eps
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )

    @staticmethod
    def backward(ctx, dy: Tensor, _dstats: Tensor | None):
        x, weight, stats = ctx.saved_tensors
        if dy is None:  # only the non-differentiable output was used
            dy = torch.zeros_like(x)
        if torch.is_grad_enabled() or not (_compat.has_storage(dy) and _compat.has_storage(x)):
            # The backward itself is differentiated, or vmapped: the reference
            # formulas, with batch statistics rebuilt from x so that their
            # dependence on x is part of the graph (running ones are constants).
            mean, invstd = stats
            if ctx.training:
                mean, var = reference.batch_stats(x)
                invstd = torch.rsqrt(var + ctx.eps)
            dx, dweight, dbias = reference.backward(dy, x, weight, mean, invstd, ctx.training)
        else:
            dx, dweight, dbias = kernels.select(x).backward(dy, x, weight, stats, ctx.training)
        return (*requested(ctx, dx, dweight, dbias), None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
        return _vmap(info.batch_size, in_dims, x, weight, bias, running_mean, running_var,
                     training, momentum, eps)  # fmt: skip


class BatchNormFunction(_BatchNormGraph):
    """y = (x − mean)·invstd·γ + β with batch (``training``) or running statistics."""

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, running_mean_t, running_var_t, *_):
        differentiable = x_t is not None or weight_t is not None or bias_t is not None
        if not differentiable:
            # Only running buffers carry tangents (under torch.func.jvp, where
            # :func:`batch_norm` cannot strip them): y's tangent is zero.
            return torch.zeros_like(ctx.saved_tensors[0]), None
        if not ctx.training and (running_mean_t is not None or running_var_t is not None):
            raise RuntimeError(
                "batch_norm is not differentiable wrt running_mean and running_var, they "
                "cannot have forward grad defined: remove their tangents, or normalize in "
                "training mode"
            )
        x, weight, (mean, invstd) = ctx.saved_tensors
        y_t = reference.tangent(x, weight, mean, invstd, ctx.training, x_t, weight_t, bias_t)
        return y_t, None


_apply = _compat.applier(BatchNormFunction, tensors=5)


def _vmap(size, in_dims, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Batch norm of B independent slices as one batch norm over B·C channels.

    x (B, N, C, *) becomes (N, B·C, *): each slice's channels are channels of
    their own, so each is normalized with its own statistics, exactly as B
    separate calls. Per-channel tensors become (B·C,), repeating an unbatched
    one; batched running buffers are updated through that (B·C,) tensor and
    copied back.
    """
    x_dim, weight_dim, bias_dim, mean_dim, var_dim, _, momentum_dim, _ = in_dims
    updates = training and running_mean is not None
    if updates and x_dim is not None and (mean_dim is None or var_dim is None):
        raise RuntimeError(
            "vmap: batch norm would update unbatched running_mean/running_var in place "
            "from a batched input. Batch the buffers too (e.g. torch.func.stack_module_state), "
            "or use track_running_stats=False (torch.func.replace_all_batch_norm_modules_)"
        )

    def slices(t: Tensor, dim: int | None) -> Tensor:  # t with the vmapped dim first
        return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)

    xs = slices(x, x_dim)  # (B, N, C, *)
    b, n, c = xs.shape[:3]
    folded = xs.movedim(0, 1).reshape(n, b * c, *xs.shape[3:])

    def channels(t: Tensor | None, dim: int | None) -> Tensor | None:  # (C,) or (B, C) -> (B·C,)
        return None if t is None else slices(t, dim).reshape(b * c)

    rm, rv = channels(running_mean, mean_dim), channels(running_var, var_dim)
    if isinstance(momentum, Tensor) and momentum_dim is not None:
        momentum = slices(momentum, momentum_dim).reshape(b, 1).expand(b, c).reshape(b * c)
    y, stats = BatchNormFunction.apply(
        folded, channels(weight, weight_dim), channels(bias, bias_dim), rm, rv,
        training, momentum, eps,
    )  # fmt: skip
    if updates:  # a no-op where reshape returned a view of the buffer
        for buffer, dim, flat in ((running_mean, mean_dim, rm), (running_var, var_dim, rv)):
            if dim is None:
                # Unbatched buffers can only move here when x is unbatched too:
                # every slice has the same statistics, and the buffer moves once.
                buffer.copy_(flat.view(b, c)[0])
            else:
                slices(buffer, dim).copy_(flat.view(b, c))
    y = y.reshape(n, b, c, *xs.shape[3:]).movedim(1, 0)
    return (y, stats.view(2, b, c)), (0, 1)


def _without_lone_tangents(x, weight, bias, running_mean, running_var):
    """The running buffers, without their forward-mode tangents when nothing else has one.

    Then y has no tangent, as in torch. (The Function cannot say so itself:
    a jvp that returns None trips an assertion inside torch.) The primal is a
    view of the buffer, so an update in place still reaches it.
    """
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in (x, weight, bias)):
        return running_mean, running_var
    return tuple(
        None if t is None else fwAD.unpack_dual(t).primal for t in (running_mean, running_var)
    )


def _graph(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether autograd records this call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def beyond_plain_eager() -> bool:
    """Whether a call is captured (compiled, traced, under a Python dispatch mode:
    :func:`bnlab.kernels.protocol.captured`), under forward-mode AD or a functorch
    transform: then it needs the Python function's rules (no C++ node, no fused
    backend)."""
    return captured() or _compat.forward_ad_active() or _compat.transforms_active()


def small_call(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor | None:
    """y from the C++ node for a plain eager call it takes (:mod:`bnlab.small_calls`:
    small ones, and inference of every size), or None for any other call.

    It may be tried before the arguments are checked: the node declines every call
    that :func:`bnlab.functional.check_arguments` rejects. Compiled, forward-mode,
    transformed and traced calls keep :func:`batch_norm`, for their rules.
    """
    if beyond_plain_eager():
        return None
    return small_calls.batch_norm(
        x, weight, bias, running_mean, running_var, training, momentum, eps
    )


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
) -> Tensor:
    """y from :class:`BatchNormFunction`; its arguments checked by the caller.

    Without anything to record, the backend op is called directly: the same
    op and results without the autograd function's per-call cost. (Small
    plain eager calls are the caller's to try first: :func:`small_call`.)
    """
    if torch.compiler.is_compiling():
        return _BatchNormGraph.apply(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )[0]
    if _compat.functionalizing():
        # functionalize has no rule for an autograd Function (alone or around or
        # inside grad and vmap): the reference formulas, plain differentiable ops.
        backend = kernels.REFERENCE
    else:
        forward_ad = _compat.forward_ad_active()
        if forward_ad:
            running_mean, running_var = _without_lone_tangents(
                x, weight, bias, running_mean, running_var
            )
        # Tangents and batching rules are the Function's, and so is a graph, except in
        # a trace: there the backend's custom ops, which carry their gradient, are
        # recorded as ops (the Function would be a Python call, which torch.jit.save
        # cannot keep).
        graph = _graph(x, weight, bias) and not torch.jit.is_tracing()
        if forward_ad or _compat.transforms_active() or graph:
            return _apply(x, weight, bias, running_mean, running_var, training, momentum, eps)[0]
        backend = kernels.select(x)
    if training:
        return backend.forward_train(
            x, weight, bias, eps, running_mean, running_var, momentum, False
        )[0]
    return backend.forward_eval(x, weight, bias, running_mean, running_var, eps, False)[0]
