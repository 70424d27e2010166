"""The real CIFAR-10 in both layouts, from the directory named by $BNLAB_DATA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bnlab.data import load_cifar10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root() -> Path:
    value = os.environ.get("BNLAB_DATA")
    if not value:
        pytest.skip(
            "BNLAB_DATA is not set: point it at a folder holding cifar-10-batches-bin/ and -py/"
        )
    path = Path(value)
    missing = [
        n for n in ("cifar-10-batches-bin", "cifar-10-batches-py") if not (path / n).is_dir()
    ]
    if missing:
        pytest.skip(f"BNLAB_DATA={value} lacks {', '.join(missing)}")
    return path


@pytest.fixture(scope="module")
def both(root):
    return load_cifar10(root, download=False), load_cifar10(
        root / "cifar-10-batches-py", download=False
    )


def test_shapes_dtypes_and_counts(both):
    for data in both:
        assert (
            data.train_images.shape == (50000, 3, 32, 32) and data.train_images.dtype == torch.uint8
        )
        assert (
            data.test_images.shape == (10000, 3, 32, 32) and data.test_images.dtype == torch.uint8
        )
        assert data.train_labels.dtype == torch.int64 and data.test_labels.dtype == torch.int64
        assert torch.bincount(data.train_labels).tolist() == [5000] * 10
        assert torch.bincount(data.test_labels).tolist() == [1000] * 10
        assert len(data.classes) == 10 and data.classes[0] == "airplane"


def test_bin_is_preferred_and_layouts_agree(both):
    bin_data, py_data = both
    assert bin_data.source.layout == "bin" and py_data.source.layout == "py"
    for name in ("train_images", "train_labels", "test_images", "test_labels", "classes"):
        a, b = getattr(bin_data, name), getattr(py_data, name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
