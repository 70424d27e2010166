"""DeviceLoader: normalization, per-(seed, epoch) shuffling, batching, memory format."""

from __future__ import annotations

import warnings

import pytest
import torch

from bnlab.data import DeviceLoader, epoch_order, normalize


def _split(n: int):
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(n)  # label i marks image i, so batches can be traced back
    return images, labels


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_normalize_values():
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    y = normalize(x)
    assert y.dtype == torch.float32
    assert y[0] == -1 and y[-1] == 1
    torch.testing.assert_close(y.double(), (x.double() / 255 - 0.5) / 0.5, rtol=0, atol=1e-7)
    # Bit for bit what ToTensor() + Normalize(0.5, 0.5) compute.
    assert torch.equal(y, (x.float().div(255) - torch.tensor(0.5)) / torch.tensor(0.5))


def test_batches_are_normalized_images_with_their_labels():
    images, labels = _split(50)
    for x, y in DeviceLoader(images, labels, batch_size=16, seed=3):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        assert torch.equal(x, normalize(images[y]))


def test_each_epoch_covers_the_split_once():
    images, labels = _split(100)
    loader = DeviceLoader(images, labels, batch_size=64)
    for _ in range(3):
        batches = _epoch(loader)
        assert [len(y) for _, y in batches] == [64, 36]  # partial batch kept
        assert len(loader) == 2
        assert torch.equal(torch.cat([y for _, y in batches]).sort().values, labels)


def test_order_depends_only_on_seed_and_epoch():
    images, labels = _split(40)
    run = DeviceLoader(images, labels, batch_size=8, seed=7)
    orders = [torch.cat([y for _, y in run]) for _ in range(4)]
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    for e, order in enumerate(orders):
        assert torch.equal(order, epoch_order(40, 7, e))
    # A run resumed at epoch 2 sees what the uninterrupted run saw.
    resumed = DeviceLoader(images, labels, batch_size=8, seed=7)
    resumed.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in resumed]), orders[2])
    assert torch.equal(torch.cat([y for _, y in resumed]), orders[3])
    other = DeviceLoader(images, labels, batch_size=8, seed=8)
    assert not torch.equal(torch.cat([y for _, y in other]), orders[0])
    # Seeds are not offsets of one another.
    assert not torch.equal(epoch_order(40, 1, 0), epoch_order(40, 0, 1))


def test_breaking_out_still_advances_the_epoch():
    images, labels = _split(40)
    loader = DeviceLoader(images, labels, batch_size=8, seed=1)
    next(iter(loader))
    assert torch.equal(torch.cat([y for _, y in loader]), epoch_order(40, 1, 1))


def test_unshuffled_keeps_order():
    images, labels = _split(20)
    loader = DeviceLoader(images, labels, batch_size=6, shuffle=False)
    assert torch.equal(torch.cat([y for _, y in loader]), labels)
    assert torch.equal(torch.cat([y for _, y in loader]), labels)


def test_last_batch_of_one_is_dropped_with_one_warning():
    images, labels = _split(129)
    with pytest.warns(UserWarning, match="last batch of one image") as record:
        loader = DeviceLoader(images, labels, batch_size=64)
        epochs = [_epoch(loader) for _ in range(2)]
    assert len(record) == 1
    assert len(loader) == 2
    for batches in epochs:
        assert [len(y) for _, y in batches] == [64, 64]
        assert len(torch.cat([y for _, y in batches]).unique()) == 128


def test_last_batch_of_one_kept_when_asked():
    images, labels = _split(129)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = DeviceLoader(images, labels, batch_size=64, drop_single=False)
    assert [len(y) for _, y in loader] == [64, 64, 1]


@pytest.mark.parametrize("shuffle", [True, False])
def test_memory_format(shuffle):
    images, labels = _split(20)
    loader = DeviceLoader(
        images, labels, batch_size=8, shuffle=shuffle, memory_format=torch.channels_last
    )
    plain = DeviceLoader(images, labels, batch_size=8, shuffle=shuffle)
    for (x, y), (x_plain, y_plain) in zip(loader, plain, strict=True):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
        assert x_plain.is_contiguous()
        assert torch.equal(x, x_plain) and torch.equal(y, y_plain)  # same images, same order


def test_rejects_bad_inputs():
    images, labels = _split(10)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images, labels[:5])
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(images, labels, batch_size=0)
