"""Tiny CIFAR-10 copies in both official layouts, written byte by byte for the data tests.

The python layout is written with raw pickle opcodes the way the official
files are: protocol 2, Python 2 byte strings (SHORT_BINSTRING/BINSTRING) and
numpy 1 module paths (numpy.core.multiarray._reconstruct).
"""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def make_batches(per_batch: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random images (n, 3, 32, 32) uint8 and labels (n,) for each official batch name."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, per_batch, dtype=np.int64),
        )
        for name in BATCHES
    }


def make_learnable_batches(
    per_batch: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like :func:`make_batches`, but the label sets the brightness: a model can learn it."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in BATCHES:
        labels = rng.integers(0, 10, per_batch)
        noise = rng.integers(-40, 41, (per_batch, 3, 32, 32))
        images = (30 + 20 * labels[:, None, None, None] + noise).clip(0, 255).astype(np.uint8)
        batches[name] = (images, labels)
    return batches


def write_bin_layout(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        records = np.concatenate(
            [labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], axis=1
        )
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return folder


def write_py_layout(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        batch = {
            "batch_label": f"{name} of the tests",
            "labels": [int(v) for v in labels],
            "data": images.reshape(len(images), -1),
            "filenames": [f"{name}_{i}.png" for i in range(len(labels))],
        }
        (folder / name).write_bytes(py2_pickle(batch))
    meta = {"num_cases_per_batch": 10000, "label_names": CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as Python 2 + numpy 1 wrote it (no memo, which is optional)."""
    return b"\x80\x02" + _op(obj) + b"."


def _op(obj: object) -> bytes:
    if isinstance(obj, dict):
        return b"}(" + b"".join(_op(k) + _op(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_op(v) for v in obj) + b"e"
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin1"))
    if isinstance(obj, bool | type(None)):
        return {None: b"N", True: b"\x88", False: b"\x89"}[obj]
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, np.ndarray):
        return _uint8_array(obj)
    raise TypeError(type(obj))


def _py2_str(raw: bytes) -> bytes:
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING
    return b"T" + struct.pack("<i", len(raw)) + raw  # BINSTRING


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _uint8_array(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    parts = [
        # _reconstruct(ndarray, (0,), 'b'): an empty array to fill
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n",
        _int(0) + b"\x85" + _py2_str(b"b") + b"\x87R",
        # BUILD with (1, shape, dtype, fortran_order=False, raw bytes)
        b"(" + _int(1),
        b"(" + b"".join(_int(s) for s in a.shape) + b"t",
        # dtype('u1', 0, 1), then BUILD with (3, '|', None, None, None, -1, -1, 0)
        b"cnumpy\ndtype\n" + _py2_str(b"u1") + _int(0) + _int(1) + b"\x87R",
        b"(" + _int(3) + _py2_str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb",
        b"\x89" + _py2_str(np.ascontiguousarray(a).tobytes()) + b"tb",
    ]
    return b"".join(parts)


def tar_gz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz in memory holding ``files`` (name -> content) and symlinks (name -> target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def py_archive(batches: dict[str, tuple[np.ndarray, np.ndarray]], tmp: Path) -> bytes:
    """The official python archive's structure (cifar-10-batches-py/...) as .tar.gz bytes."""
    folder = write_py_layout(tmp / "cifar-10-batches-py", batches)
    return tar_gz(
        {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}
    )


PER_BATCH = 4  # records per tiny batch: 20 train, 4 test images


def use_tiny_batches(monkeypatch, per_batch: int = PER_BATCH) -> None:
    """Make the readers expect ``per_batch`` records per file instead of 10000."""
    import bnlab.data.cifar10

    monkeypatch.setattr(bnlab.data.cifar10, "_RECORDS_PER_BATCH", per_batch)


def tiny_cifar_dir(root: Path, monkeypatch, per_batch: int, learnable: bool) -> Path:
    """``root/data``: a tiny CIFAR-10 in the official bin layout, which the readers are
    told to expect (``learnable``: the label sets the brightness)."""
    use_tiny_batches(monkeypatch, per_batch)
    make = make_learnable_batches if learnable else make_batches
    write_bin_layout(root / "data" / "cifar-10-batches-bin", make(per_batch))
    return root / "data"
