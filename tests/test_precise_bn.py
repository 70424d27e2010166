"""precise_bn: exact population statistics of each layer's training-mode input (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import bnlab
import bnlab.nn

from ._twins import F64, randomize_

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _model():
    torch.manual_seed(0)
    return randomize_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, dtype=F64),
            nn.BatchNorm2d(3, dtype=F64),  # torch's
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, dtype=F64),
            bnlab.nn.BatchNorm2d(4, dtype=F64, momentum=None),  # bnlab's
            nn.Dropout(0.5),
            nn.Flatten(),
            nn.Linear(4 * 3 * 3, 5, dtype=F64),
            bnlab.nn.GhostBatchNorm1d(5, dtype=F64, virtual_batch_size=3),
        )
    )


def _dataset():
    """A fixed dataset in batches of unequal sizes, with means that drift from batch to batch."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 2, 5, 5, generator=g, dtype=F64) + i for i, n in enumerate((6, 8, 5, 6))]


def _expected(model, batches):
    """Each layer's input over the whole dataset, rebuilt op by op in training mode with
    torch's functional batch norm (batch statistics, nothing moving), then its mean and
    unbiased variance over all values at once."""
    conv1, bn1, _, conv2, bn2, _, _, linear, _ = model
    inputs = {"1": [], "4": [], "8": []}
    for x in batches:
        z1 = conv1(x)
        inputs["1"].append(z1)
        a = TF.relu(TF.batch_norm(z1, None, None, bn1.weight, bn1.bias, True))
        z2 = conv2(a)
        inputs["4"].append(z2)
        a = TF.batch_norm(z2, None, None, bn2.weight, bn2.bias, True)
        inputs["8"].append(linear(TF.dropout(a, 0.5, True).flatten(1)))
    out = {}
    for name, zs in inputs.items():
        z = torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) for t in zs])
        out[name] = (z.mean(0), z.var(0, unbiased=True))
    return out


def test_exact_population_statistics_over_a_fixed_dataset():
    model, batches = _model(), _dataset()
    model.eval()  # precise_bn runs it in training mode and puts every flag back
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(5)  # dropout draws the same masks in both runs
    bnlab.precise_bn(model, batches)
    torch.manual_seed(5)
    expected = _expected(model, batches)
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(model.get_submodule(name).running_mean, mean, **TOL)
        torch.testing.assert_close(model.get_submodule(name).running_var, var, **TOL)
    assert not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        if "running" not in key:  # parameters and batch counters untouched
            assert torch.equal(value, before[key]), key
    assert [
        m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats")
    ] == [True] * 3


def test_the_spread_of_the_batch_means_counts():
    """Averaging the per-batch variances (fvcore's approximation) leaves out the spread of
    the batch means, which this dataset makes large."""
    layer, batches = nn.BatchNorm2d(2, dtype=F64), _dataset()
    bnlab.precise_bn(layer, batches)
    per_batch = torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0)
    pooled = torch.cat(batches).var((0, 2, 3))
    torch.testing.assert_close(layer.running_var, pooled, **TOL)
    assert (per_batch < 0.6 * pooled).all()


def test_items_counts_and_device():
    """A tuple or list passes its first element; num_batches stops early; device moves."""
    layer, batches = (
        bnlab.nn.BatchNorm1d(3, dtype=F64),
        [torch.randn(4, 3, dtype=F64) * (i + 1) for i in range(3)],
    )
    items = [(x, torch.zeros(4)) for x in batches[:2]] + [[batches[2], "label"]]
    bnlab.precise_bn(layer, iter(items), num_batches=2, device="cpu")
    torch.testing.assert_close(layer.running_mean, torch.cat(batches[:2]).mean(0), **TOL)
    torch.testing.assert_close(layer.running_var, torch.cat(batches[:2]).var(0), **TOL)
    with pytest.raises(ValueError, match="no batch"):
        bnlab.precise_bn(layer, [])


def test_renorm_upstream_uses_its_fixed_running_statistics():
    """Upstream layers behave as in training; renorm corrects towards running statistics
    that do not move during the pass, so the result does not depend on the batch order."""
    model = nn.Sequential(
        randomize_(bnlab.nn.BatchRenorm1d(3, dtype=F64, rmax=1.5, dmax=0.5)),
        nn.Linear(3, 3, dtype=F64),
        nn.BatchNorm1d(3, dtype=F64),
    )
    batches = [torch.randn(5, 3, dtype=F64) * (i + 1) + i for i in range(3)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    bnlab.precise_bn(a, batches)
    bnlab.precise_bn(b, batches[::-1])
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], **TOL)


def test_unused_layer_keeps_its_statistics_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    model = TwoHeads()
    with pytest.warns(UserWarning, match="unused saw 0 value"):
        bnlab.precise_bn(model, [torch.randn(4, 3) + 1])
    assert torch.equal(model.unused.running_mean, torch.zeros(3))
    assert not torch.equal(model.used.running_mean, torch.zeros(3))
