"""Graph capture: bnlab modules under torch.compile, fullgraph, including momentum=None."""

from __future__ import annotations

import pytest
import torch

import bnlab.nn

from .conftest import step_matches_eager


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fullgraph_training_matches_eager(momentum):
    """aot_eager captures the same graph inductor would compile, at a fraction of the cost.

    torch's own module fails fullgraph with momentum=None (it turns the batch
    counter into a Python float); bnlab keeps it a tensor.
    """
    torch.manual_seed(0)
    eager = bnlab.nn.BatchNorm2d(3, momentum=momentum)
    compiled_module = bnlab.nn.BatchNorm2d(3, momentum=momentum)
    step = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        step_matches_eager(eager, step, x, atol=1e-5, grad_atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(eager, name), getattr(compiled_module, name), msg=name)
    torch.testing.assert_close(eager.weight.grad, compiled_module.weight.grad, atol=1e-4, rtol=1e-4)


def test_inductor_eval_forward():
    torch.manual_seed(0)
    m = bnlab.nn.BatchNorm1d(4).eval()
    m.running_mean.uniform_(-1, 1)
    x = torch.randn(8, 4)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), atol=1e-6, rtol=1e-6)
