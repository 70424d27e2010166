"""Where bnlab looks for CIFAR-10: argument, else $BNLAB_DATA, else the user's cache.

The data directory is the parent of the official folders (like torchvision's
root); pointing at one of the folders itself works too. A folder the user
names must exist: a typo is reported, never created (only the default cache
is made on demand, or a named folder when downloading is asked for).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "BNLAB_DATA"
BIN_FOLDER = "cifar-10-batches-bin"
PY_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCHES = (*TRAIN_BATCHES, TEST_BATCH)  # the order the fingerprint hashes them in


@dataclass(frozen=True)
class DataDir:
    """The data directory and where that choice came from (for messages)."""

    path: Path
    origin: str  # "the data_dir argument (--data-dir)", "$BNLAB_DATA" or the default
    named: bool  # named by the user (argument or $BNLAB_DATA), not the default cache


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/bnlab``, or ``~/.cache/bnlab`` when that is unset."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative value, as if it were unset.
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "bnlab"


def data_dir_choice(data_dir: str | os.PathLike[str] | None = None) -> DataDir:
    """The data directory (``data_dir`` if given, else ``$BNLAB_DATA``, else the default)."""
    if data_dir is not None and str(data_dir) != "":
        return DataDir(Path(data_dir).expanduser(), "the data_dir argument (--data-dir)", True)
    env = os.environ.get(ENV_VAR, "")
    if env:
        return DataDir(Path(env).expanduser(), f"${ENV_VAR}", True)
    return DataDir(default_data_dir(), f"the default, ${ENV_VAR} being unset", False)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$BNLAB_DATA``, else the default."""
    return data_dir_choice(data_dir).path


def not_a_folder(path: str | os.PathLike[str]) -> Path | None:
    """The part of ``path`` (itself or a parent) that exists but is not a folder, if any.

    Such a path can be neither read as a folder nor created: the message should
    name the file in the way, not report "no such folder" or "File exists".
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def find_batches(root: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The batches folder under (or at) ``root`` and its layout, "bin" first; None if absent."""
    root = Path(root)
    for name, layout in ((BIN_FOLDER, "bin"), (PY_FOLDER, "py")):
        if (root / name).is_dir():
            return root / name, layout
    # root may be a batches folder itself, under its official name or another.
    if root.name == BIN_FOLDER or any((root / f"{b}.bin").is_file() for b in BATCHES):
        return root, "bin"
    if root.name == PY_FOLDER or any((root / b).is_file() for b in (*BATCHES, "batches.meta")):
        return root, "py"
    return None


def _where_and_how(root: Path, origin: str) -> str:
    """Every place looked at, and the ways to provide the data: the tail of a not-found error."""
    return (
        f"Data directory: {root} (from {origin}; the order is --data-dir, ${ENV_VAR}, "
        "$XDG_CACHE_HOME/bnlab, ~/.cache/bnlab). Looked for:\n"
        f"  {root / BIN_FOLDER}/\n"
        f"  {root / PY_FOLDER}/\n"
        f"  {root / ARCHIVE_NAME}\n"
        f"  {root}/ itself as a batches folder\n"
        "To provide CIFAR-10, do one of:\n"
        "  - pass --data-dir DIR (data_dir=DIR in Python), DIR holding cifar-10-batches-bin/ "
        "or cifar-10-batches-py/, or being one of them;\n"
        f"  - set {ENV_VAR}=DIR;\n"
        f"  - put the official archive {ARCHIVE_NAME} ({ARCHIVE_URL}) or its extracted "
        f"folder into {root};\n"
        "  - add --download (download=True) to download it into the folder you name; "
        "with no folder named, bnlab downloads into its cache."
    )
