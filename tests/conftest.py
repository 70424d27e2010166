"""Shared fixtures and helpers: build a bnlab module and its torch.nn twin."""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import settings

import bnlab.nn

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
