"""bnlab's layers in torch's eager-mode quantization: fusion (fuse_modules, fuse_modules_qat)
and post-training quantization (prepare, convert), against torch's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    fuse_modules,
    fuse_modules_qat,
    get_default_qconfig,
    prepare,
)
from torch.ao.quantization import fuser_method_mappings as mappings
from torch.ao.quantization.quantization_mappings import DEFAULT_STATIC_QUANT_MODULE_MAPPINGS

import bnlab.nn
from bnlab.nn.torch_quantization import register_with_torch

from ._twins import F64, TOL, copy_state_, randomize_

# (modules before the batch norm, batch norm class name, input shape): every pattern
# of torch's fuser table that holds a batch norm.
PATTERNS = {
    "conv1d-bn": (lambda: [nn.Conv1d(3, 4, 3, dtype=F64)], "BatchNorm1d", (2, 3, 8)),
    "conv2d-bn": (lambda: [nn.Conv2d(3, 4, 3, dtype=F64)], "BatchNorm2d", (2, 3, 6, 6)),
    "conv3d-bn": (lambda: [nn.Conv3d(3, 4, 3, dtype=F64)], "BatchNorm3d", (2, 3, 4, 4, 4)),
    "linear-bn": (lambda: [nn.Linear(3, 4, dtype=F64)], "BatchNorm1d", (5, 3)),
    "convtranspose2d-bn": (
        lambda: [nn.ConvTranspose2d(3, 4, 3, dtype=F64)],
        "BatchNorm2d",
        (2, 3, 5, 5),
    ),
    "bn": (lambda: [], "BatchNorm2d", (2, 4, 5, 5)),
}
WITH_RELU = {"conv1d-bn", "conv2d-bn", "conv3d-bn", "bn"}  # torch fuses a ReLU after these
CASES = [(p, False) for p in PATTERNS if p != "bn"] + [(p, True) for p in sorted(WITH_RELU)]
QAT_CASES = [c for c in CASES if not c[0].startswith("convtranspose")]  # eval-only in torch


def _twins(pattern: str, relu: bool):
    """(torch model, bnlab model, input): the pattern as an nn.Sequential, equal state."""
    before, bn_name, shape = PATTERNS[pattern]
    models = []
    for library in (nn, bnlab.nn):
        torch.manual_seed(0)
        layers = [*before(), getattr(library, bn_name)(4, dtype=F64)]
        models.append(nn.Sequential(*layers, *([nn.ReLU()] if relu else [])))
    randomize_(models[0])
    copy_state_(models[1], models[0])
    return models[0], models[1], torch.randn(shape, dtype=F64)


def _names(model: nn.Module) -> list[str]:
    return [str(k) for k in range(len(model))]


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("pattern, relu", CASES)
def test_eval_fusion_is_torchs(pattern, relu):
    theirs, ours, x = _twins(pattern, relu)
    fused = [fuse_modules(m.eval(), [_names(m)]) for m in (theirs, ours)]
    assert _types(fused[1]) == _types(fused[0])
    torch.testing.assert_close(fused[1](x), fused[0](x), **TOL)
    torch.testing.assert_close(fused[1](x), ours(x), **TOL)  # and the unfused model's numbers


@pytest.mark.parametrize("pattern, relu", QAT_CASES)
def test_qat_fusion_is_torchs_and_trains_alike(pattern, relu):
    theirs, ours, x = _twins(pattern, relu)
    fused = [fuse_modules_qat(m.train(), [_names(m)]) for m in (theirs, ours)]
    assert _types(fused[1]) == _types(fused[0])
    for _ in range(2):  # training forwards: batch statistics, running buffers moved
        torch.testing.assert_close(fused[1](x), fused[0](x), **TOL)
    for a, b in zip(fused[1].buffers(), fused[0].buffers(), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_registering_again_changes_nothing():
    tables = (mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD, DEFAULT_STATIC_QUANT_MODULE_MAPPINGS)
    before = [dict(table) for table in tables]
    register_with_torch()
    assert [dict(table) for table in tables] == before
    assert (nn.Conv2d, bnlab.nn.BatchNorm2d, nn.ReLU) in tables[0]
    assert tables[1][bnlab.nn.BatchNorm2d] is tables[1][nn.BatchNorm2d]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_post_training_quantization_is_torchs(fused, relu):
    """QuantStub, conv, batch norm (and ReLU), DeQuantStub, calibrated and converted:
    unfused, convert puts torch's quantized batch norm in bnlab's layer's place."""
    theirs, ours, x = _twins("conv2d-bn", relu)
    quantized = []
    for model in (theirs, ours):
        model = nn.Sequential(QuantStub(), *model.float(), DeQuantStub()).eval()
        if fused:
            model = fuse_modules(model, [[str(k) for k in range(1, 3 + relu)]])
        model.qconfig = get_default_qconfig("x86")
        prepared = prepare(model)
        prepared(x.float())  # calibration
        quantized.append(convert(prepared))
    assert _types(quantized[1]) == _types(quantized[0])
    # Calibration observes each library's float32 outputs, a few ulps apart, so the
    # scales may differ in their last bits: equal to float32 rounding, not bit for bit.
    torch.testing.assert_close(
        quantized[1](x.float()), quantized[0](x.float()), rtol=1e-5, atol=1e-5
    )
