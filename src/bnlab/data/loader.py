"""Batches from a whole split held on the training device: no workers, no per-image Python.

The split is moved to the device once as uint8 and normalized there; each
batch is then one gather by a slice of the epoch's permutation: on the CPU
that is faster than permuting the whole split once per epoch, and it needs
no second copy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence

import torch


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 ``(x/255 - 0.5)/0.5``, in [-1, 1].

    The same float ops, in the same order, as torchvision's ``ToTensor()`` then
    ``Normalize((0.5,)*3, (0.5,)*3)``, so the values match bit for bit.
    """
    return images.to(torch.float32).div_(255).sub_(0.5).div_(0.5)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` for ``epoch``: a function of ``(seed, epoch)`` only.

    Drawn from a CPU generator, so a seed gives the same order on every device.
    The generator's seed hashes both numbers: ``seed + epoch`` would give runs
    with seeds 0 and 1 the same orders one epoch apart.
    """
    key = hashlib.sha256(f"bnlab.shuffle:{seed}:{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randperm(n, generator=generator)


class DeviceLoader:
    """Shuffled (x, y) batches of a whole split kept on ``device``.

    ``x`` is float32 (B, 3, 32, 32) normalized by ``normalize`` in ``memory_format``;
    ``y`` is int64 (B,). The last partial batch is kept, except a batch of one
    image, which batch norm cannot train on: with ``drop_single`` it is left out
    (a warning says so once, at construction). Use ``drop_single=False`` for
    evaluation. To use part of a split, slice the tensors before passing them.

    Order contract (for resuming): every ``iter(loader)`` uses the loader's
    current epoch and then advances it by one; ``set_epoch(e)`` makes the next
    pass use epoch ``e``. The order of epoch ``e`` is ``epoch_order(n, seed, e)``
    and nothing else, so a run resumed at epoch ``e`` that calls ``set_epoch(e)``
    sees exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
        drop_single: bool = True,
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
            )
        if labels.shape != images_uint8.shape[:1]:
            raise ValueError(
                f"labels must have shape ({len(images_uint8)},), got {tuple(labels.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.epoch = 0
        # Move uint8 (a quarter of the bytes), then convert on the device.
        self.images = normalize(images_uint8.to(self.device)).contiguous(
            memory_format=memory_format
        )
        self.labels = labels.to(self.device, torch.int64)
        # The split as (N, values per image) in memory order (a view: each image is
        # one contiguous run in either format). A batch is then a row gather, half
        # the time of indexing the 4-d tensor (CPU, batch 64).
        n = len(self.images)
        if memory_format is torch.channels_last:
            self._rows = self.images.permute(0, 2, 3, 1).reshape(n, -1)
        else:
            self._rows = self.images.reshape(n, -1)
        n = len(images_uint8)
        self.dropped = int(drop_single and n % batch_size == 1)
        if self.dropped:
            warnings.warn(
                f"DeviceLoader: {n} images in batches of {batch_size} leave a last batch of "
                "one image, which batch norm cannot train on; it is dropped every epoch "
                "(pass drop_single=False to keep it).",
                stacklevel=2,
            )

    def __len__(self) -> int:
        return -(-(len(self.images) - self.dropped) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of ``epoch`` (see the class docstring)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        used = n - self.dropped  # shuffled, the dropped image is a different one each epoch
        order = epoch_order(n, self.seed, epoch).to(self.device) if self.shuffle else None
        for start in range(0, used, self.batch_size):
            stop = min(start + self.batch_size, used)
            if order is None:  # views: slicing dim 0 keeps the memory format
                yield self.images[start:stop], self.labels[start:stop]
                continue
            index = order[start:stop]
            yield self._gather(index), self.labels[index]

    def stacked_batches(
        self, seeds: Sequence[int], epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s batches for several seeds side by side: x (S, B, 3, 32, 32)
        and y (S, B), slice s being the batch a loader of ``seeds[s]`` gives (for runs
        trained together, `bnlab.experiments.stacked`). The loader's own epoch is left."""
        n = len(self.images)
        used = n - self.dropped
        orders = torch.stack([epoch_order(n, seed, epoch) for seed in seeds]).to(self.device)
        for start in range(0, used, self.batch_size):
            index = orders[:, start : min(start + self.batch_size, used)]
            x = self._gather(index.reshape(-1)).unflatten(0, index.shape)
            yield x, self.labels[index]

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index``, in ``memory_format``: a row gather of ``_rows``."""
        _, c, h, w = self.images.shape
        batch = self._rows.index_select(0, index)
        if self.memory_format is torch.channels_last:
            return batch.view(-1, h, w, c).permute(0, 3, 1, 2)
        return batch.view(-1, c, h, w)
