"""Readers for both official CIFAR-10 layouts, on tiny copies written by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab.data import DataError, load_cifar10, read_bin, read_py

from ._cifar_writers import (
    CLASSES,
    PER_BATCH,
    make_batches,
    py2_pickle,
    use_tiny_batches,
    write_bin_layout,
    write_py_layout,
)


@pytest.fixture
def batches(monkeypatch):
    use_tiny_batches(monkeypatch)
    return make_batches(PER_BATCH)


def _expected(batches):
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    return (
        torch.from_numpy(np.concatenate([b[0] for b in train])),
        torch.from_numpy(np.concatenate([b[1] for b in train])),
        torch.from_numpy(batches["test_batch"][0]),
        torch.from_numpy(batches["test_batch"][1]),
    )


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_reads_each_layout(tmp_path, batches, layout):
    writer = write_bin_layout if layout == "bin" else write_py_layout
    writer(tmp_path / f"cifar-10-batches-{layout}", batches)
    data = load_cifar10(tmp_path, download=False)
    train_x, train_y, test_x, test_y = _expected(batches)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (
        5 * PER_BATCH,
        3,
        32,
        32,
    )
    assert data.train_labels.dtype == torch.int64 and data.test_labels.dtype == torch.int64
    assert torch.equal(data.train_images, train_x) and torch.equal(data.train_labels, train_y)
    assert torch.equal(data.test_images, test_x) and torch.equal(data.test_labels, test_y)
    assert data.classes == CLASSES
    assert data.source.layout == layout
    assert data.source.path == str(tmp_path / f"cifar-10-batches-{layout}")
    assert len(data.source.fingerprint) == 16 and int(data.source.fingerprint, 16) >= 0


def test_bin_preferred_when_both_exist(tmp_path, batches):
    write_py_layout(tmp_path / "cifar-10-batches-py", batches)
    write_bin_layout(tmp_path / "cifar-10-batches-bin", batches)
    assert load_cifar10(tmp_path, download=False).source.layout == "bin"


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_pointing_at_the_batches_folder_itself(tmp_path, batches, layout):
    writer = write_bin_layout if layout == "bin" else write_py_layout
    folder = writer(tmp_path / f"cifar-10-batches-{layout}", batches)
    data = load_cifar10(folder, download=False)
    assert data.source.layout == layout and data.source.path == str(folder)
    # A batches folder under another name is recognised by its files.
    renamed = folder.rename(tmp_path / "my-copy")
    assert load_cifar10(renamed, download=False).source.layout == layout


def test_layouts_agree_and_fingerprint_follows_content(tmp_path, batches):
    a = read_bin(write_bin_layout(tmp_path / "cifar-10-batches-bin", batches))
    b = read_py(write_py_layout(tmp_path / "cifar-10-batches-py", batches))
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    again = read_bin(tmp_path / "cifar-10-batches-bin")
    assert again.source.fingerprint == a.source.fingerprint
    batches["test_batch"][0][0, 0, 0, 0] ^= 1
    changed = read_bin(write_bin_layout(tmp_path / "other", batches))
    assert changed.source.fingerprint != a.source.fingerprint


def test_truncated_bin_names_the_file(tmp_path, batches):
    folder = write_bin_layout(tmp_path / "cifar-10-batches-bin", batches)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin.*3073"):
        load_cifar10(tmp_path, download=False)


def test_bin_with_wrong_record_count(tmp_path, batches):
    folder = write_bin_layout(tmp_path / "cifar-10-batches-bin", batches)
    path = folder / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-3073])
    with pytest.raises(
        DataError, match=rf"test_batch\.bin: {PER_BATCH - 1} records, expected {PER_BATCH}"
    ):
        load_cifar10(tmp_path, download=False)


def test_bad_label_value(tmp_path, batches):
    folder = write_bin_layout(tmp_path / "cifar-10-batches-bin", batches)
    raw = bytearray((folder / "data_batch_2.bin").read_bytes())
    raw[3073] = 10  # label of record 1
    (folder / "data_batch_2.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"data_batch_2\.bin: label 10 at record 1"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_missing_batch_files_are_listed(tmp_path, batches, layout):
    writer = write_bin_layout if layout == "bin" else write_py_layout
    folder = writer(tmp_path / f"cifar-10-batches-{layout}", batches)
    suffix = ".bin" if layout == "bin" else ""
    (folder / f"data_batch_4{suffix}").unlink()
    (folder / f"test_batch{suffix}").unlink()
    with pytest.raises(DataError, match=rf"missing data_batch_4{suffix}, test_batch{suffix}"):
        load_cifar10(tmp_path, download=False)


def test_corrupt_pickle_names_the_file(tmp_path, batches):
    folder = write_py_layout(tmp_path / "cifar-10-batches-py", batches)
    path = folder / "data_batch_1"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"data_batch_1: cannot read this pickle"):
        load_cifar10(tmp_path, download=False)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"labels": [0] * PER_BATCH}, r"'data' must be a uint8 array .* got NoneType"),
        (
            {"labels": [0] * PER_BATCH, "data": np.zeros((PER_BATCH, 3071), np.uint8)},
            rf"got uint8 \({PER_BATCH}, 3071\)",
        ),
        (
            {"labels": [0] * (PER_BATCH + 1), "data": np.zeros((PER_BATCH, 3072), np.uint8)},
            "labels, expected",
        ),
        (
            {"labels": [0, 1, 2, -1], "data": np.zeros((PER_BATCH, 3072), np.uint8)},
            "label -1 at record 3",
        ),
        (
            {"labels": "abcd", "data": np.zeros((PER_BATCH, 3072), np.uint8)},
            "'labels' must be a list",
        ),
    ],
)
def test_wrong_pickled_contents(tmp_path, batches, batch, message):
    folder = write_py_layout(tmp_path / "cifar-10-batches-py", batches)
    (folder / "test_batch").write_bytes(py2_pickle(batch))
    with pytest.raises(DataError, match=rf"test_batch: .*{message}"):
        load_cifar10(tmp_path, download=False)


def test_pickle_that_is_not_a_dict(tmp_path, batches):
    folder = write_py_layout(tmp_path / "cifar-10-batches-py", batches)
    (folder / "data_batch_5").write_bytes(py2_pickle([1, 2]))
    with pytest.raises(DataError, match=r"data_batch_5: expected a pickled dict, got list"):
        load_cifar10(tmp_path, download=False)


def test_bad_class_names(tmp_path, batches):
    folder = write_bin_layout(tmp_path / "cifar-10-batches-bin", batches)
    (folder / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"batches\.meta\.txt: expected 10 class names"):
        load_cifar10(tmp_path, download=False)
