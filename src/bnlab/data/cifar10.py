"""Read CIFAR-10 from either official on-disk layout into uint8 tensors.

Layouts (each folder sits in the data directory, like torchvision's root):

- ``cifar-10-batches-bin``: ``data_batch_1..5.bin``, ``test_batch.bin``, each
  10000 records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32),
  and ``batches.meta.txt`` (one class name a line). Preferred: no unpickling.
- ``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``, Python 2 pickles
  of dicts with ``data`` (10000, 3072) uint8 and ``labels`` (list of ints), and
  ``batches.meta`` (``label_names``). Read through a restricted unpickler.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._unpickle import load_pickle
from .download import download_cifar10, extract_archive
from .errors import DataError
from .paths import (
    ARCHIVE_NAME,
    BATCHES,
    _where_and_how,
    data_dir_choice,
    find_batches,
    not_a_folder,
)

NUM_CLASSES = 10
_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS
# Records in every official batch file; the tests shrink it to write tiny files.
_RECORDS_PER_BATCH = 10_000


@dataclass(frozen=True)
class DataSource:
    """Which copy of the data was read."""

    path: str  # the batches folder
    layout: str  # "bin" or "py"
    fingerprint: str  # 16 hex digits of sha256 over the batch files, train 1..5 then test


# eq=False: tensors do not compare to a single bool.
@dataclass(frozen=True, eq=False)
class CIFAR10:
    """The whole data set in memory."""

    train_images: torch.Tensor  # (50000, 3, 32, 32) uint8
    train_labels: torch.Tensor  # (50000,) int64
    test_images: torch.Tensor  # (10000, 3, 32, 32) uint8
    test_labels: torch.Tensor  # (10000,) int64
    classes: list[str]  # the 10 names, in label order
    source: DataSource


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
    urlopen: Callable[..., Any] | None = None,
) -> CIFAR10:
    """Load CIFAR-10 from ``data_dir`` (else ``$BNLAB_DATA``, else ``$XDG_CACHE_HOME/bnlab``).

    ``data_dir`` holds ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``
    (bin is used when both exist) or is one of those folders. When neither is
    there, an official ``cifar-10-python.tar.gz`` placed in ``data_dir`` is
    extracted, else the archive is downloaded: into the default cache unless
    ``download=False``, into a folder named by ``data_dir`` or ``$BNLAB_DATA``
    only with ``download=True`` (a misspelt name must not start a download).
    A named folder that does not exist is an error, unless ``download=True``.
    ``urlopen`` replaces ``urllib.request.urlopen`` (tests). Raises ``DataError``.
    """
    where = data_dir_choice(data_dir)
    root = where.path
    blocking = not_a_folder(root)
    if blocking is not None:
        raise DataError(
            f"{root} (from {where.origin}): {blocking} is a file, not a folder. "
            "Name the folder that holds CIFAR-10."
        )
    if where.named and not root.exists() and download is not True:
        raise DataError(
            f"{root} (from {where.origin}): no such folder. Check the spelling; "
            "to download CIFAR-10 into it, add --download (download=True)."
        )
    found = find_batches(root)
    if found is None:
        allowed = download if download is not None else not where.named
        try:
            if (root / ARCHIVE_NAME).is_file():
                found = extract_archive(root / ARCHIVE_NAME, root), "py"
            elif allowed:
                found = download_cifar10(root, urlopen=urlopen), "py"
            elif download is None:
                raise DataError(
                    f"CIFAR-10 not found in {root}, and bnlab downloads into a folder you "
                    "name only when asked (--download, download=True)."
                )
            else:
                raise DataError("CIFAR-10 not found, and downloading is off (download=False).")
        except DataError as e:
            raise DataError(f"{e}\n\n{_where_and_how(root, where.origin)}") from e
    folder, layout = found
    return read_bin(folder) if layout == "bin" else read_py(folder)


def read_bin(folder: str | os.PathLike[str]) -> CIFAR10:
    """Read a ``cifar-10-batches-bin`` folder."""
    folder = Path(folder)
    _require_files(folder, [f"{b}.bin" for b in BATCHES] + ["batches.meta.txt"])
    digest = hashlib.sha256()
    parts = [_read_bin_batch(folder / f"{b}.bin", digest) for b in BATCHES]
    meta_path = folder / "batches.meta.txt"
    names = [line.strip() for line in _read_text(meta_path).splitlines()]
    classes = _check_classes(
        [n for n in names if n], meta_path
    )  # the official file ends in blank lines
    return _assemble(parts, classes, DataSource(str(folder), "bin", digest.hexdigest()[:16]))


def read_py(folder: str | os.PathLike[str]) -> CIFAR10:
    """Read a ``cifar-10-batches-py`` folder (Python 2 pickles, restricted unpickler)."""
    folder = Path(folder)
    _require_files(folder, [*BATCHES, "batches.meta"])
    digest = hashlib.sha256()
    parts = [_read_py_batch(folder / b, digest) for b in BATCHES]
    meta_path = folder / "batches.meta"
    meta = load_pickle(_read_bytes(meta_path), meta_path)
    names = _get(meta, "label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise DataError(f"{meta_path}: expected a dict with a 'label_names' list")
    classes = _check_classes(
        [n.decode("latin1") if isinstance(n, bytes) else n for n in names], meta_path
    )
    return _assemble(parts, classes, DataSource(str(folder), "py", digest.hexdigest()[:16]))


def _require_files(folder: Path, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"{folder}: incomplete CIFAR-10 copy, missing {', '.join(missing)}. "
            "Restore the files, or delete the folder to let bnlab fetch it again."
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file of class names ({e})") from e


def _read_bin_batch(path: Path, digest: Any) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8 view, labels (n,) uint8) of one .bin batch."""
    n = _RECORDS_PER_BATCH
    raw = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    if raw.size % _RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {_RECORD}-byte records "
            "(1 label + 3072 pixels); the file is truncated or corrupt"
        )
    if raw.size // _RECORD != n:
        raise DataError(
            f"{path}: {raw.size // _RECORD} records, expected {n}; truncated or wrong file"
        )
    digest.update(raw)
    records = raw.reshape(n, _RECORD)
    labels = records[:, 0]
    _check_labels(labels, path)
    return records[:, 1:].reshape(n, 3, 32, 32), labels


def _read_py_batch(path: Path, digest: Any) -> tuple[np.ndarray, np.ndarray]:
    n = _RECORDS_PER_BATCH
    raw = _read_bytes(path)
    digest.update(raw)
    batch = load_pickle(raw, path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (n, _PIXELS):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"{path}: 'data' must be a uint8 array of shape ({n}, {_PIXELS}), got {got}"
        )
    if not isinstance(labels, list | np.ndarray):
        raise DataError(f"{path}: 'labels' must be a list, got {type(labels).__name__}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: 'labels' must be integers ({e})") from e
    if labels.shape != (n,):
        raise DataError(f"{path}: {labels.size} labels, expected {n}")
    _check_labels(labels, path)
    return data.reshape(n, 3, 32, 32), labels


def _get(d: dict, key: str) -> Any:
    # latin1 decoding gives str keys; a pickle written with bytes keys is read too.
    return d[key] if key in d else d.get(key.encode())


def _check_labels(labels: np.ndarray, path: Path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path}: label {int(labels[i])} at record {i} is outside 0..{NUM_CLASSES - 1} "
            f"({bad.size} such records); the file is corrupt"
        )


def _check_classes(names: list[Any], path: Path) -> list[str]:
    if len(names) != NUM_CLASSES or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: expected {NUM_CLASSES} class names, got {names!r}")
    return names


def _assemble(
    parts: list[tuple[np.ndarray, np.ndarray]], classes: list[str], source: DataSource
) -> CIFAR10:
    train, test = parts[:-1], parts[-1]
    return CIFAR10(
        train_images=torch.from_numpy(np.concatenate([p[0] for p in train])),
        train_labels=torch.from_numpy(np.concatenate([p[1] for p in train]).astype(np.int64)),
        test_images=torch.from_numpy(test[0].copy()),  # C-contiguous, writable
        test_labels=torch.from_numpy(test[1].astype(np.int64)),
        classes=classes,
        source=source,
    )
