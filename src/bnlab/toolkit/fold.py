"""fold: an inference copy of a model with each batch norm folded into the layer feeding it.

In eval a batch norm is a per-channel affine map, so after a convolution or a
linear layer it can be absorbed into that layer's weight and bias: one pass
over the activations instead of two. The pairs are found on the model's
``torch.fx`` graph, so Sequential chains and residual blocks (a conv → BN whose
output is added to a shortcut) fold alike.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import Tensor, fx, nn

from ..nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

_FROZEN = (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)
_NORMS = (nn.modules.batchnorm._BatchNorm, *_FROZEN)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# The layers fold takes, by the rank of the batch norm that may follow them: their output
# has its channels in dim 1 (a Linear's (N, F) output too).
_PRODUCER_RANK = {
    nn.Linear: 1,
    nn.Conv1d: 1,
    nn.ConvTranspose1d: 1,
    nn.Conv2d: 2,
    nn.ConvTranspose2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose3d: 3,
}
_NORM_RANK = {
    1: (nn.BatchNorm1d, FrozenBatchNorm1d),
    2: (nn.BatchNorm2d, FrozenBatchNorm2d),
    3: (nn.BatchNorm3d, FrozenBatchNorm3d),
}


def _fits(norm: nn.Module, rank: int) -> bool:
    """Whether ``norm`` may follow a producer of ``rank``: its rank, or any (SyncBatchNorm's)."""
    ranks = [r for r, classes in _NORM_RANK.items() if isinstance(norm, classes)]
    return not ranks or ranks == [rank]


def eval_affine(
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of eval batch norm as an affine map, in float64:

    y = (z − μ)/sqrt(v + eps)·γ + β = z·scale + shift,
    scale = γ/sqrt(v + eps),  shift = β − μ·scale   (γ = 1, β = 0 when absent)
    """
    f64 = torch.float64
    scale = (running_var.to(f64) + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(f64)
    shift = -running_mean.to(f64) * scale
    if bias is not None:
        shift = shift + bias.to(f64)
    return scale, shift


def folded_parameters(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, transposed: bool, groups: int
) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``layer`` followed by ``z·scale + shift`` per output channel o:

        W'[o] = W[o]·scale[o],   b'[o] = b[o]·scale[o] + shift[o]   (b = 0 when absent)

    W is (out, in/groups, *k) for Conv and Linear; (in, out/groups, *k) for
    ConvTranspose, whose output channel o = g·(out/groups) + j lives at
    [group g's inputs, j]. Returned in the layer's dtype.
    """
    w = weight.detach().to(torch.float64)
    if transposed:
        in_ch, out_per_group, *k = w.shape
        view = (groups, in_ch // groups, out_per_group, *k)
        scaled = w.view(view) * scale.view(groups, 1, out_per_group, *[1] * len(k))
        new_weight = scaled.view(w.shape)
    else:
        new_weight = w * scale.view(-1, *[1] * (w.dim() - 1))
    new_bias = shift if bias is None else bias.detach().to(torch.float64) * scale + shift
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every batch norm (torch's, bnlab's, frozen) kept as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _NORMS) or super().is_leaf_module(m, module_qualified_name)


def _why_not(node: fx.Node, norm: nn.Module, modules: dict[str, nn.Module], calls: Counter) -> str:
    """Why this batch-norm call cannot be folded ('' when it can)."""
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and (
        norm.running_mean is None or norm.running_var is None
    ):
        return "it has no running statistics, so eval normalizes with batch statistics"
    if isinstance(norm.running_mean, nn.parameter.UninitializedBuffer):
        return "it is a lazy layer that has not seen an input yet"
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return "it is not called on a single input"
    source = node.args[0]
    if source.op != "call_module":
        return f"its input comes from {source.op} {source.target}, not a Conv or Linear module"
    layer = modules[source.target]
    rank = _PRODUCER_RANK.get(type(layer))
    if rank is None:
        return (
            f"its input comes from {source.target} ({type(layer).__name__}), not a Conv or Linear"
        )
    if not _fits(norm, rank):
        producer = f"{source.target} ({type(layer).__name__})"
        return f"a {type(norm).__name__} after {producer} is not one fold handles"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != norm.num_features:
        return f"{source.target} has {channels} output channels, the batch norm {norm.num_features}"
    if len(source.users) > 1:
        others = ", ".join(str(u) for u in source.users if u is not node)
        return f"the output of {source.target} is also used by {others}"
    if calls[source.target] > 1:
        return f"{source.target} is called {calls[source.target]} times"
    return ""


def _fold_pair(layer: nn.Module, norm: nn.Module) -> None:
    scale, shift = eval_affine(
        norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps
    )
    transposed = isinstance(layer, _CONV_TRANSPOSE)
    groups = layer.groups if transposed else 1
    weight, bias = folded_parameters(layer.weight, layer.bias, scale, shift, transposed, groups)
    layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)


def _fold_graph(gm: fx.GraphModule, prefix: str) -> None:
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _NORMS):
            continue
        norm = modules[node.target]
        reason = _why_not(node, norm, modules, calls)
        if reason:
            name = f"{prefix}.{node.target}" if prefix else node.target
            warnings.warn(
                f"fold: {name} ({type(norm).__name__}) stays an eval batch norm: {reason}",
                stacklevel=4,
            )
            continue
        source = node.args[0]
        _fold_pair(modules[source.target], norm)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _fold_module(module: nn.Module, prefix: str) -> nn.Module:
    if not any(isinstance(m, _NORMS) for m in module.modules()):
        return module
    if isinstance(module, _NORMS):
        warnings.warn(
            f"fold: {prefix or 'the model'} ({type(module).__name__}) stays an eval batch norm: "
            "no layer that feeds it could be traced with it",
            stacklevel=4,
        )
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # untraceable Python control flow: fold inside the parts
        warnings.warn(
            f"fold: cannot trace {prefix or 'the model'} ({type(module).__name__}: "
            f"{type(exc).__name__}: {exc}); folding inside its submodules instead",
            stacklevel=4,
        )
        for name, child in module.named_children():
            setattr(module, name, _fold_module(child, f"{prefix}.{name}" if prefix else name))
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    _fold_graph(gm, prefix)
    return gm


def fold(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with its batch norms folded into the layers feeding them.

    Each batch norm (torch's or bnlab's, FrozenBatchNorm included) whose input
    is the output of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear module,
    used by nothing else, is folded into that layer's weight and bias (computed
    in float64) and removed. The others stay as eval batch norms, each with a
    warning naming it and why: no running statistics, not fed by such a layer
    (pre-activation blocks), a producer output or module used twice. ``model``
    is left as it is.

    The copy is a ``torch.fx.GraphModule`` (or, where ``model`` cannot be
    traced, ``model``'s class with its traceable parts folded), meant for
    inference: put back into training mode, the batch norms that are left would
    use batch statistics again. A Linear is assumed to see (N, F) input, whose
    features are where BatchNorm1d normalizes them.
    """
    folded = _fold_module(copy.deepcopy(model).eval(), "")
    return folded.eval()
