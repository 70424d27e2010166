"""diagnose: each column against a value computed another way, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import bnlab
import bnlab.nn
from bnlab.toolkit.diagnose import momentum_horizon

from ._twins import F64

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, c, 2, 2, generator=g, dtype=F64) * 2 + 1 for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 3, 1, dtype=F64),
        nn.BatchNorm2d(3, dtype=F64),
        nn.ReLU(),
        bnlab.nn.BatchNorm2d(3, dtype=F64, momentum=None),
    )


def test_rows_after_precise_bn_show_no_error_and_the_model_is_untouched():
    model, batches = _model(), _batches()
    bnlab.precise_bn(model, batches)
    before = copy.deepcopy(model.state_dict())
    rows = bnlab.diagnose(model, batches)
    assert [(r.name, r.kind, r.num_features) for r in rows] == [
        ("1", "BatchNorm2d", 3),
        ("3", "BatchNorm2d", 3),
    ]
    for r in rows:
        assert r.mean_error < 1e-12 and r.var_error < 1e-12
        assert r.values_per_channel == 3 * 8 * 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training


def test_errors_are_relative_to_the_population():
    """Shift channel 0's running mean by 2σ and double channel 1's running variance."""
    bn, batches = nn.BatchNorm2d(3, dtype=F64), _batches()
    bnlab.precise_bn(bn, batches)
    with torch.no_grad():
        bn.running_mean[0] += 2 * bn.running_var[0].sqrt()
        bn.running_var[1] *= 2
    (row,) = bnlab.diagnose(bn, batches)
    assert row.name == ""
    assert math.isclose(row.mean_error, 2.0, rel_tol=1e-12)
    assert math.isclose(row.var_error, 1.0, rel_tol=1e-12)


def test_output_gap_is_train_against_eval_output():
    bn, batches = nn.BatchNorm2d(3, dtype=F64), _batches()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.running_var.fill_(3.0)
    (row,) = bnlab.diagnose(bn, batches)
    diff2 = train2 = 0.0
    for x in batches:
        y_train = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)
        y_eval = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias)
        diff2 += (y_train - y_eval).square().sum().item()
        train2 += y_train.square().sum().item()
    assert math.isclose(row.output_gap, math.sqrt(diff2 / train2), rel_tol=1e-12)


def test_dead_and_constant_channels():
    bn = bnlab.nn.BatchNorm2d(4, dtype=F64)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.0, -100.0, 0.0, 0.0]))  # channel 1: never above 0
    batches = _batches(c=4)
    for x in batches:
        x[:, 2] = 5.0  # channel 2 never varies
    (row,) = bnlab.diagnose(bn, batches)
    assert row.dead_channels == [1]
    assert row.constant_channels == [2]
    assert math.isfinite(row.mean_error)  # errors over the channels that vary


def test_horizon_and_layers_without_statistics():
    assert momentum_horizon(0.1, 7) == pytest.approx(10.0)
    assert momentum_horizon(None, 7) == 7.0
    assert momentum_horizon(0.0, 7) == math.inf
    model = nn.Sequential(
        bnlab.nn.GhostBatchNorm2d(3, dtype=F64, virtual_batch_size=4, momentum=None),
        bnlab.nn.BatchRenorm2d(3, dtype=F64, momentum=0.01),
        nn.BatchNorm2d(3, dtype=F64, track_running_stats=False),
    )
    model(_batches(1)[0])
    model.eval()
    rows = bnlab.diagnose(model, _batches(2))
    assert rows[0].horizon == 1.0 and rows[1].horizon == pytest.approx(100.0)
    assert all(math.isnan(v) for v in (rows[2].mean_error, rows[2].output_gap, rows[2].horizon))
    assert rows[0].output_gap > 0 and not model.training


def test_format_diagnosis_table():
    model, batches = _model(), _batches()
    table = bnlab.format_diagnosis(bnlab.diagnose(model, batches, num_batches=2))
    lines = table.splitlines()
    assert lines[0].startswith("| layer | kind | C | mean err (σ) | var err | train/eval gap")
    assert len(lines) == 4 and lines[2].startswith("| 1 | BatchNorm2d | 3 |")
    assert "None (average)" in lines[3]
