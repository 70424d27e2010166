"""Shared fixtures and helpers: build a bnlab module and its torch.nn twin."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's interpreter (read when triton is
# imported, which bnlab does on first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

import bnlab.nn
from bnlab import small_calls

settings.register_profile("bnlab", deadline=None, max_examples=40)
settings.load_profile("bnlab")

# rank name -> (class name, example input shape)
SHAPES = {
    "1d-NC": ("BatchNorm1d", (8, 3)),
    "1d-NCL": ("BatchNorm1d", (4, 3, 5)),
    "2d": ("BatchNorm2d", (4, 3, 5, 4)),
    "3d": ("BatchNorm3d", (2, 3, 3, 4, 2)),
}

TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


def make_pair(cls_name: str, num_features: int = 3, **kwargs):
    """(bnlab module, torch module) with the same arguments, both float64."""
    ours = getattr(bnlab.nn, cls_name)(num_features, dtype=torch.float64, **kwargs)
    theirs = getattr(torch.nn, cls_name)(num_features, dtype=torch.float64, **kwargs)
    return ours, theirs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny training runs are bound by per-op overhead, not arithmetic; one thread also
    avoids the OpenMP stalls (10x and worse) a second thread meets on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def bnlab_kernels_only(monkeypatch):
    """Every call on bnlab's Python autograd function and backend: small calls would otherwise
    run behind the C++ node (bnlab.small_calls), and a test that counts backend calls or
    exercises the function's own backward would miss them."""
    monkeypatch.setattr(small_calls, "ENABLED", False)


def count_calls(monkeypatch, owner: object, name: str) -> list[tuple]:
    """Wrap ``owner.name`` so that each call's arguments are appended to the returned list."""
    calls: list[tuple] = []
    real = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def graph_targets() -> tuple[set[str], object]:
    """(seen, backend): a torch.compile backend that records every node target of the
    graphs it is given (the autograd function's forward is a submodule), and runs them."""
    seen: set[str] = set()

    def backend(gm, example_inputs):
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                seen.update(str(node.target) for node in module.graph.nodes)
        return gm

    return seen, backend


def step_matches_eager(eager, step, x, atol: float, grad_atol: float) -> None:
    """One training step of ``eager`` and of ``step`` (its compiled twin) on copies of x:
    outputs agree within atol and input gradients within grad_atol (rtol the same)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), step(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb, atol=atol, rtol=atol)
    torch.testing.assert_close(xa.grad, xb.grad, atol=grad_atol, rtol=grad_atol)


def compiled_training_matches_eager(device: str = "cpu"):
    """Two training steps of a BatchNorm2d eagerly and under torch.compile(fullgraph=True,
    aot_eager): outputs, input gradients, running buffers and weight gradients agree.
    Returns (eager module, compiled module, compiled callable) for further checks."""
    torch._dynamo.reset()
    eager, compiled = bnlab.nn.BatchNorm2d(3).to(device), bnlab.nn.BatchNorm2d(3).to(device)
    step = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, device=device) * 2 + 1
        step_matches_eager(eager, step, x, atol=1e-6, grad_atol=1e-5)
    torch.testing.assert_close(eager.running_var, compiled.running_var)
    torch.testing.assert_close(eager.weight.grad, compiled.weight.grad, atol=1e-5, rtol=1e-5)
    return eager, compiled, step


def vmap_ensembles(pairs, x: torch.Tensor):
    """[(y, buffers) for bnlab's side, then torch's]: each side's modules of ``pairs`` run
    as one vmapped ensemble (stack_module_state + functional_call) on the shared x."""
    results = []
    for side in (0, 1):
        group = [pair[side] for pair in pairs]
        params, buffers = torch.func.stack_module_state(group)

        def call(p, b, inp, base=group[0]):
            return torch.func.functional_call(base, (p, b), (inp,))

        results.append((torch.func.vmap(call, in_dims=(0, 0, None))(params, buffers, x), buffers))
    return results
