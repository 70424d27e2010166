"""PyTorch's own tools on models with bnlab layers: each must treat them as torch's layers.

Ecosystem code finds batch norms with ``isinstance(m, _BatchNorm)`` or
``isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))``, and torch.fx keeps
torch's layers as leaves. Every test runs the same tool on a torch model and
on its bnlab twin (identical float64 state, see ``_twins``) and compares the
numbers; where torch refuses, bnlab must raise the same exception type.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bnlab.functional
import bnlab.nn

from ._twins import (
    F64,
    TOL,
    assert_same_state,
    assert_same_tensors,
    check_like_torch,
    make_twins,
    net_twins,
)

# Tiny tensors are bound by per-op overhead; a second OpenMP thread on busy cores stalls.
pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_NAMES = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]
INPUTS = {"1d": (4, 3), "2d": (4, 3, 2, 2), "3d": (2, 3, 2, 2, 2)}


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _torch_norm_classes() -> list[type]:
    """Every Module class torch.nn.modules.batchnorm defines (read from the installed torch),
    and the lazy mixin."""
    module = torch.nn.modules.batchnorm
    found = {c for c in vars(module).values() if isinstance(c, type) and issubclass(c, nn.Module)}
    return sorted(found | {nn.modules.lazy.LazyModuleMixin}, key=lambda c: c.__qualname__)


# ---- isinstance: what ecosystem code finds ------------------------------------------


@pytest.mark.parametrize("cls_name", CLASS_NAMES)
def test_isinstance_mirrors_torch(cls_name):
    """For every torch batch norm class T, ``isinstance(layer, T)`` answers the same for
    bnlab's layer as for torch's (so _BatchNorm, and BatchNorm2d for bnlab.nn.BatchNorm2d);
    for lazy layers before and after the first call, which must leave a bnlab layer."""
    lazy = cls_name.startswith("Lazy")
    args = () if lazy else (3,)
    theirs = getattr(nn, cls_name)(*args, dtype=F64)
    ours = getattr(bnlab.nn, cls_name)(*args, dtype=F64)
    classes = _torch_norm_classes()
    assert nn.modules.batchnorm._BatchNorm in classes and nn.SyncBatchNorm in classes

    def answers(m):
        return {c.__qualname__: isinstance(m, c) for c in classes}

    assert answers(ours) == answers(theirs)
    if lazy:
        x = _randn(*INPUTS[cls_name[-2:]])
        theirs(x)
        ours(x)
        assert answers(ours) == answers(theirs)
        assert type(theirs) is getattr(nn, cls_name[4:])  # torch's cls_to_become
        assert type(ours) is getattr(bnlab.nn, cls_name[4:])


class _FrozenAffine(nn.Module):
    """y = x·scale + shift per channel: a batch norm with its eval numbers baked in."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        invstd = torch.rsqrt(bn.running_var + bn.eps)
        weight = bn.weight if bn.weight is not None else torch.ones_like(invstd)
        bias = bn.bias if bn.bias is not None else torch.zeros_like(invstd)
        self.register_buffer("scale", (weight * invstd).detach().clone())
        self.register_buffer("shift", (bias - bn.running_mean * weight * invstd).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def _freeze_batch_norms(module: nn.Module) -> int:
    """Replace every child found the way timm's and detectron2's helpers find batch norms;
    returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(module, name, _FrozenAffine(child))
            replaced += 1
        else:
            replaced += _freeze_batch_norms(child)
    return replaced


def test_freezing_helper_finds_bnlab_layers():
    """Frozen models compute the eval numbers even in train mode; a bnlab layer the helper
    missed would still normalize with batch statistics."""
    theirs, ours = net_twins()
    x = _randn(4, 2, 4, 4)
    eval_output = theirs.eval()(x)
    counts = [_freeze_batch_norms(m) for m in (theirs, ours)]
    assert counts[1] == counts[0] == 1
    torch.testing.assert_close(theirs.train()(x), eval_output, **TOL)  # the helper is right
    torch.testing.assert_close(ours.train()(x), theirs(x), **TOL)


# ---- torch utilities that look for batch norms ---------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_swa_update_bn(momentum):
    """update_bn resets the running stats, averages them over the loader (momentum=None for
    the pass) and restores momentum and the training flag; on bnlab layers too."""
    theirs, ours = net_twins(momentum)
    loader = [_randn(4, 2, 4, 4, seed=1), (_randn(3, 2, 4, 4, seed=2), "label"), _randn(5, 2, 4, 4)]

    def fn(model):
        model.eval()
        torch.optim.swa_utils.update_bn(loader, model)
        return _state(model), model[1].momentum, model.training, model(loader[0])

    check_like_torch(fn, (theirs,), (ours,))


def test_replace_all_batch_norm_modules_then_vmap_in_training():
    """torch.func's helper drops the running stats so vmap can train; with bnlab layers too."""
    theirs, ours = net_twins()
    x = _randn(3, 4, 2, 4, 4)

    def fn(model):
        torch.func.replace_all_batch_norm_modules_(model)
        model.train()
        flags = (model[1].track_running_stats, model[1].running_mean, model[1].running_var)
        return torch.func.vmap(model)(x), _state(model), flags

    check_like_torch(fn, (theirs,), (ours,))


def test_convert_sync_batchnorm_finds_bnlab_layers():
    """SyncBatchNorm modules in the same places, holding the same parameters and buffers
    (torch hands over the Parameter objects themselves) and computing the same numbers."""
    theirs, ours = net_twins()
    originals = {"torch": theirs[1], "bnlab": ours[1]}
    converted = {
        lib: nn.SyncBatchNorm.convert_sync_batchnorm(m)
        for lib, m in (("torch", theirs), ("bnlab", ours))
    }
    types = {lib: [type(m) for m in model.modules()] for lib, model in converted.items()}
    assert types["bnlab"] == types["torch"]
    assert type(converted["bnlab"][1]) is nn.SyncBatchNorm
    for lib in converted:  # the Parameter objects themselves are handed over
        assert converted[lib][1].weight is originals[lib].weight
    assert_same_state(converted["bnlab"], converted["torch"])
    x = _randn(4, 2, 4, 4)
    for train in (True, False):  # not distributed: SyncBatchNorm computes locally
        outputs = {lib: m.train(train)(x) for lib, m in converted.items()}
        torch.testing.assert_close(outputs["bnlab"], outputs["torch"], **TOL)
    assert_same_state(converted["bnlab"], converted["torch"])


# ---- graph capture -----------------------------------------------------------------


def test_fx_symbolic_trace_keeps_bnlab_layer_as_leaf():
    """The bnlab layer is a call_module leaf like torch's, and the GraphModule computes what
    the model does, buffers included, in training and eval."""
    theirs, ours = net_twins()
    graphs = {lib: torch.fx.symbolic_trace(m) for lib, m in (("torch", theirs), ("bnlab", ours))}

    def nodes(gm):
        return [(n.op, str(n.target)) for n in gm.graph.nodes]

    assert nodes(graphs["bnlab"]) == nodes(graphs["torch"])
    assert ("call_module", "1") in nodes(graphs["torch"])
    assert graphs["bnlab"].get_submodule("1") is ours[1]
    x1, x2 = _randn(4, 2, 4, 4, seed=1), _randn(4, 2, 4, 4, seed=2)
    reference = copy.deepcopy(theirs)  # eager torch: what the graph must compute
    for train, x in ((True, x1), (False, x2), (True, x2)):
        y = graphs["bnlab"].train(train)(x)
        torch.testing.assert_close(y, reference.train(train)(x), **TOL)
    assert_same_state(graphs["bnlab"], reference)


class _Functional(nn.Module):
    """A model that calls a functional batch norm itself, with its own state."""

    def __init__(self, function, train: bool):
        super().__init__()
        self.function, self.training_flag = function, train
        self.register_buffer("running_mean", torch.zeros(3, dtype=F64))
        self.register_buffer("running_var", torch.ones(3, dtype=F64))
        self.weight = nn.Parameter(torch.rand(3, dtype=F64) + 0.5)

    def forward(self, x):
        return self.function(
            x, self.running_mean, self.running_var, self.weight, None,
            training=self.training_flag, momentum=0.3, eps=1e-4,
        )  # fmt: skip


FUNCTIONALS = {
    "batch_norm": (bnlab.functional.batch_norm, torch.nn.functional.batch_norm),
    "batch_norm_relu": (
        bnlab.functional.batch_norm_relu,
        lambda *args, **kwargs: torch.relu(torch.nn.functional.batch_norm(*args, **kwargs)),
    ),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(FUNCTIONALS))
def test_fx_symbolic_trace_records_the_functional_call(name, train):
    """torch.fx records bnlab's functional call as one call_function node, as it does
    torch's (both take part in __torch_function__), and the graph computes torch's numbers."""
    ours, theirs = FUNCTIONALS[name]
    graph = torch.fx.symbolic_trace(_Functional(ours, train))
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert calls == [ours]
    reference = _Functional(theirs, train)
    reference.load_state_dict(graph.state_dict())
    for seed in (1, 2):
        x = _randn(4, 3, 2, 2, seed=seed)
        torch.testing.assert_close(graph(x), reference(x), **TOL)
    assert_same_state(graph, reference)


def test_torch_function_modes_and_subclasses_see_the_call():
    """A TorchFunctionMode sees bnlab.functional.batch_norm called, and a tensor subclass
    gets its own type back, with torch's numbers."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.functions = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.functions.append(func)
            return func(*args, **(kwargs or {}))

    class Tagged(torch.Tensor):
        pass

    x = _randn(4, 3, 2, 2)
    args = (torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    with Seen() as seen:
        y = bnlab.functional.batch_norm(x, *args, training=True)
    assert bnlab.functional.batch_norm in seen.functions
    tagged = bnlab.functional.batch_norm(x.as_subclass(Tagged), *args, training=True)
    assert type(tagged) is Tagged
    torch.testing.assert_close(tagged.as_subclass(torch.Tensor), y, **TOL)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, *args, training=True), **TOL)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_export(train, momentum):
    """torch.export.export (non-strict) and the exported module run twice: outputs and
    buffers as torch's exported model.

    torch refuses momentum=None in training (float(num_batches_tracked) is
    data-dependent); there bnlab may refuse too, or must equal eager torch."""
    theirs, ours = net_twins(momentum)
    x, x1, x2 = _randn(4, 2, 4, 4), _randn(4, 2, 4, 4, seed=1), _randn(4, 2, 4, 4, seed=2)
    left_in = {}

    def fn(model):
        model.train(train)
        exported = torch.export.export(model, (x,), strict=False).module()
        left_in["state"] = _state(model)
        outputs = exported(x1), exported(x2)
        return outputs, _state(exported), _state(model)

    def eager():
        reference = copy.deepcopy(theirs).train(train)
        reference.load_state_dict(left_in["state"])  # where bnlab's export left its model
        outputs = reference(x1), reference(x2)
        return outputs, _state(reference), _state(reference)

    check_like_torch(fn, (theirs,), (ours,), eager)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_exported_program_saves_loads_and_trains(train):
    """torch.export.save and load, then a forward and backward through the loaded module:
    outputs, gradients of the input and of every parameter, and buffers as torch's.
    (An update under no_grad had made the graph unsaveable, and the exported ops had no
    gradient.)"""
    theirs, ours = net_twins()
    x = _randn(4, 2, 4, 4)
    dy = _randn(4, 2, seed=3)

    def fn(model):
        buffer = io.BytesIO()
        torch.export.save(torch.export.export(model.train(train), (x,), strict=False), buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer).module()
        xr = x.clone().requires_grad_()
        y = loaded(xr)
        y.backward(dy)
        return y, xr.grad, [p.grad for p in loaded.parameters()], _state(loaded)

    assert_same_tensors(fn(ours), fn(theirs), "exported, saved and loaded")


def test_compile_aot_eager_fullgraph_training_momentum_none():
    """conv-BN-ReLU compiled with fullgraph (graph breaks are errors), momentum=None
    (torch's own layer breaks the graph here: it turns the counter into a float), forward
    and backward over three steps, then eval: equal to eager torch."""
    theirs, ours = net_twins(momentum=None)
    step = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for i, train in enumerate((True, True, True, False)):
        x = _randn(4, 2, 4, 4, seed=i)
        theirs.train(train)
        ours.train(train)
        y_theirs, y_ours = theirs(x), step(x)
        torch.testing.assert_close(y_ours, y_theirs, **TOL)
        if train:
            y_theirs.square().sum().backward()
            y_ours.square().sum().backward()
    grads = {
        lib: {n: p.grad for n, p in m.named_parameters()} for lib, m in (("t", theirs), ("o", ours))
    }
    assert_same_tensors(grads["o"], grads["t"], "grads")
    assert_same_state(ours, theirs)


# ---- serialization -------------------------------------------------------------------


def _train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    y = model(x)
    y.square().sum().backward()
    return y


def test_pickled_model_round_trip():
    """torch.save/torch.load of a whole model (weights_only=False: it unpickles classes):
    the loaded bnlab model is still bnlab's and continues exactly like the loaded torch one."""
    theirs, ours = net_twins(momentum=None)
    x1, x2 = _randn(4, 2, 4, 4, seed=1), _randn(4, 2, 4, 4, seed=2)
    loaded = {}
    for lib, model in (("torch", theirs), ("bnlab", ours)):
        _train_step(model, x1)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded[lib] = torch.load(buffer, weights_only=False)
    assert type(loaded["bnlab"][1]) is bnlab.nn.BatchNorm2d
    assert_same_state(loaded["bnlab"], loaded["torch"])
    for train in (True, False):
        outputs = {lib: m.train(train)(x2) for lib, m in loaded.items()}
        torch.testing.assert_close(outputs["bnlab"], outputs["torch"], **TOL)
    assert_same_state(loaded["bnlab"], loaded["torch"])
    assert loaded["bnlab"][1].momentum is None


@pytest.mark.parametrize("direction", ["torch-to-bnlab", "bnlab-to-torch"])
def test_state_dict_file_interchange(direction):
    """A state_dict saved from one library loads (weights_only=True, strict) into a fresh
    model of the other, which then continues exactly like the source."""
    theirs, ours = net_twins()
    src, dst = (theirs, ours) if direction == "torch-to-bnlab" else (ours, theirs)
    dst_fresh = copy.deepcopy(dst)
    with torch.no_grad():  # the destination starts from different numbers
        for t in dst_fresh.state_dict().values():
            t.add_(1)
    x1, x2 = _randn(4, 2, 4, 4, seed=1), _randn(4, 2, 4, 4, seed=2)
    _train_step(src, x1)
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    result = dst_fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_state(dst_fresh, src)
    for train in (True, False):
        torch.testing.assert_close(dst_fresh.train(train)(x2), src.train(train)(x2), **TOL)
    assert_same_state(dst_fresh, src)


# ---- tools that move a parameter or buffer out of the module's dictionaries -----------


class _Positive(nn.Module):
    """A parametrization: |t| + 0.1, so a variance stays positive."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.abs() + 0.1


def _parametrized(module: nn.Module) -> nn.Module:
    from torch.nn.utils import parametrize

    for name in ("weight", "running_var"):
        parametrize.register_parametrization(module, name, _Positive())
    return module


def _pruned(module: nn.Module) -> nn.Module:
    from torch.nn.utils import prune

    for name in ("weight", "bias"):
        prune.l1_unstructured(module, name, amount=0.5)
    return module


TOOLS = {"parametrize": _parametrized, "prune": _pruned}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_parametrize_and_prune_like_torch(tool):
    """Both tools take weight (and parametrize a buffer) out of the module's dictionaries,
    into a property or an attribute set before each call: bnlab's forward must read those."""
    theirs, ours = (TOOLS[tool](m) for m in make_twins("BatchNorm2d"))
    x = _randn(4, 3, 2, 2)
    for training in (True, False):
        outputs = []
        for m in (theirs, ours):
            m.train(training).zero_grad()
            xr = x.clone().requires_grad_()
            y = m(xr)
            y.backward(torch.ones_like(y) + xr.detach())
            outputs.append((y, xr.grad, [p.grad for p in m.parameters()]))
        assert_same_tensors(outputs[1], outputs[0], f"{tool}, training={training}")
        assert_same_state(ours, theirs)


VARIANTS = ["BatchNormReLU2d", "GhostBatchNorm2d", "BatchRenorm2d", "FrozenBatchNorm2d"]
# prune takes parameters, and a frozen layer has none.
VARIANT_CASES = [
    (c, t) for c in VARIANTS for t in TOOLS if (c, t) != ("FrozenBatchNorm2d", "prune")
]


@pytest.mark.parametrize("cls_name, tool", VARIANT_CASES)
def test_variants_read_what_the_tools_give(cls_name, tool):
    """bnlab's own layers normalize with the parametrized (or pruned) tensors: the same as
    a twin given those tensors as its plain state."""
    torch.manual_seed(0)
    cls = getattr(bnlab.nn, cls_name)
    kwargs = {"virtual_batch_size": 4} if cls_name == "GhostBatchNorm2d" else {}  # two ghosts
    tool_layer, plain = (cls(3, dtype=F64, **kwargs) for _ in range(2))
    TOOLS[tool](tool_layer)
    x = _randn(8, 3, 2, 2)
    with torch.no_grad():
        tool_layer.eval()(x)  # prune's hook sets weight and bias
        for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
            t.copy_(getattr(tool_layer, name))
    # Eval first: a training call moves the plain twin's running_var, and only a
    # temporary where it is a parametrization's output (as in torch).
    for training in (False, True):
        tool_layer.train(training), plain.train(training)
        torch.testing.assert_close(tool_layer(x), plain(x), **TOL)


@pytest.mark.parametrize("cls_name", VARIANTS)
def test_variants_trace_save_and_load(cls_name):
    """bnlab's own layers under torch.jit.trace, saved and loaded: in training, the
    outputs and buffers of the eager layer's next call (tracing ran one)."""
    import warnings

    kwargs = {"virtual_batch_size": 4} if cls_name == "GhostBatchNorm2d" else {}
    x, x1 = _randn(8, 3, 2, 2), _randn(8, 3, 2, 2, seed=1)
    for train in (True, False):
        traced_layer, eager = (
            getattr(bnlab.nn, cls_name)(3, dtype=F64, **kwargs).train(train) for _ in range(2)
        )
        with warnings.catch_warnings():  # jit.trace is deprecated, and warns of baked sizes
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(traced_layer, (x,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        eager(x)  # the call tracing made
        assert_same_tensors(loaded(x1), eager(x1), f"{cls_name}, train={train}")
        assert_same_tensors(_state(loaded), _state(eager), f"{cls_name} state, train={train}")
