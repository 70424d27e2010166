"""LeNet-5: the original script's architecture, with the norm layer as an argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn
from bnlab.models import NORMS, LeNet5

# Output shape of each stage for a (N, 3, 32, 32) input.
STAGES = {
    "conv1": (6, 14, 14),  # conv k5: 28x28, pool: 14x14
    "conv2": (16, 5, 5),  # conv k5: 10x10, pool: 5x5
    "flatten": (400,),
    "fc1": (120,),
    "fc2": (84,),
    "fc3": (10,),
}
PLAIN_PARAMS = 62006  # LeNet-5 without BN, as torch counts the script's conv_act
BN_PARAMS = 2 * (6 + 16 + 120 + 84)  # a weight and a bias per channel of each BN layer


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norm", list(NORMS))
def test_stage_shapes(norm):
    model = LeNet5(norm).eval()
    x = torch.randn(5, 3, 32, 32)
    assert [name for name, _ in model.named_children()] == list(STAGES)
    for name, stage in model.named_children():
        x = stage(x)
        assert tuple(x.shape) == (5, *STAGES[name]), name


def test_parameter_counts():
    assert n_params(LeNet5("none")) == PLAIN_PARAMS
    assert n_params(LeNet5("bn")) == PLAIN_PARAMS + BN_PARAMS
    assert n_params(LeNet5("torch-bn")) == PLAIN_PARAMS + BN_PARAMS


def test_the_script_without_bn_has_the_same_count():
    conv_act = nn.Sequential(
        nn.Conv2d(3, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )
    assert n_params(conv_act) == PLAIN_PARAMS


def test_norm_layer_classes():
    def norm_types(model):
        return [type(m) for m in model.modules() if "BatchNorm" in type(m).__name__]

    assert norm_types(LeNet5("bn")) == [bnlab.nn.BatchNorm2d] * 2 + [bnlab.nn.BatchNorm1d] * 2
    assert norm_types(LeNet5("torch-bn")) == [nn.BatchNorm2d] * 2 + [nn.BatchNorm1d] * 2
    assert norm_types(LeNet5("none")) == []


def test_same_seed_same_weights_for_every_norm():
    """Norm layers draw no random numbers, so conv/linear weights depend on the seed alone."""
    weights = {}
    for norm in NORMS:
        torch.manual_seed(3)
        model = LeNet5(norm)
        weights[norm] = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for norm in NORMS:
        for a, b in zip(weights["bn"], weights[norm], strict=True):
            assert torch.equal(a, b)


def test_bn_and_torch_bn_state_dicts_match():
    torch.manual_seed(0)
    ours = LeNet5("bn").state_dict()
    torch.manual_seed(0)
    theirs = LeNet5("torch-bn").state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_unknown_norm_lists_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown norm 'layer'; choose one of: bn, torch-bn, none"
    ):
        LeNet5("layer")


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_forward_backward_in_both_memory_formats(fmt):
    torch.manual_seed(0)
    model = LeNet5("bn").to(memory_format=fmt)
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=fmt)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
