"""Fetch the official CIFAR-10 python archive, check its MD5, extract it safely and atomically.

Everything is written into a hidden scratch folder inside the data directory
and only the finished ``cifar-10-batches-py`` folder is renamed into place, so
a killed download leaves nothing that later looks like valid data.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tqdm import tqdm

from .errors import DataError
from .paths import ARCHIVE_NAME, ARCHIVE_URL, PY_FOLDER, not_a_folder

ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_CHUNK = 1 << 20


def download_cifar10(
    root: str | os.PathLike[str],
    *,
    url: str = ARCHIVE_URL,
    md5: str = ARCHIVE_MD5,
    urlopen: Callable[..., Any] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download the archive into ``root``, verify and extract it; return the batches folder.

    ``urlopen(url, timeout=...)`` must return a context manager with ``read(n)``
    (``urllib.request.urlopen`` when None; tests pass a stub). Raises ``DataError``.
    """
    urlopen = urlopen or urllib.request.urlopen
    with _made_root(root) as root, _scratch(root) as tmp:
        archive = tmp / ARCHIVE_NAME
        got = _fetch(url, archive, urlopen, progress, timeout)
        if got != md5:
            raise DataError(
                f"downloaded {url} has MD5 {got}, expected {md5}: the download is "
                "corrupt or incomplete, and nothing was kept"
            )
        return _install(archive, root, tmp)


def extract_archive(
    archive: str | os.PathLike[str], root: str | os.PathLike[str], *, md5: str = ARCHIVE_MD5
) -> Path:
    """Verify a local copy of the archive and extract it into ``root``; return the batches folder."""
    archive = Path(archive)
    got = _md5_of_file(archive)
    if got != md5:
        raise DataError(
            f"{archive}: MD5 {got} is not the official archive's {md5}; "
            f"replace it with a complete copy from {ARCHIVE_URL}, or delete it"
        )
    with _made_root(root) as root, _scratch(root) as tmp:
        return _install(archive, root, tmp)


@contextlib.contextmanager
def _made_root(root: str | os.PathLike[str]) -> Iterator[Path]:
    """``root``, created if missing; the folders created are removed again if the block fails.

    A failed download then leaves the file system as it found it.
    """
    root = Path(root)
    blocking = not_a_folder(root)
    if blocking is not None:
        raise DataError(f"{root}: cannot be the data directory: {blocking} is a file, not a folder")
    created = [p for p in (root, *root.parents) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the data directory ({e})") from e
    try:
        yield root
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
                folder.rmdir()
        raise


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    # Beside the target, so the final rename stays on one file system (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=".bnlab-download-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(
    url: str, archive: Path, urlopen: Callable[..., Any], progress: bool, timeout: float
) -> str:
    """Stream ``url`` into ``archive``; return the MD5 hex digest of what arrived."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urlopen(url, timeout=timeout) as response, open(archive, "wb") as f:
            length = getattr(response, "headers", {}).get("Content-Length")
            with tqdm(
                total=int(length) if length else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {ARCHIVE_NAME}",
                disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from e
    return digest.hexdigest()


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    return digest.hexdigest()


def _install(archive: Path, root: Path, tmp: Path) -> Path:
    """Extract ``archive`` under ``tmp``, then rename its batches folder into ``root``."""
    out = tmp / "extract"
    out.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = _safe_members(tar, archive)
            # The "data" filter (Python >= 3.12, backported) re-checks what we checked.
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(out, members=members, **extra)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot extract ({e}); the archive is corrupt") from e
    extracted = out / PY_FOLDER
    if not extracted.is_dir():
        raise DataError(f"{archive}: holds no {PY_FOLDER}/ folder; not the CIFAR-10 python archive")
    target = root / PY_FOLDER
    try:
        os.rename(extracted, target)
    except OSError as e:
        # Another process may have finished the same download first: keep its copy.
        if not target.is_dir():
            raise DataError(f"{target}: cannot move the extracted data into place ({e})") from e
    return target


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """All members, after refusing any that could write outside the extraction folder."""
    members = tar.getmembers()
    for m in members:
        posix, windows = PurePosixPath(m.name), PureWindowsPath(m.name)
        if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise DataError(
                f"{archive}: refusing to extract '{m.name}': absolute paths and '..' are not allowed"
            )
        if not (m.isfile() or m.isdir()):
            raise DataError(
                f"{archive}: refusing to extract '{m.name}': only plain files and folders are "
                "allowed, not links or devices"
            )
    return members
