"""A restricted unpickler for the official CIFAR-10 python-layout batches.

Those files are Python 2 pickles of plain dicts, lists, strings and numpy
arrays. Unpickling can call any global a file names, so a tampered file could
run code; this unpickler resolves only the three globals numpy needs to
rebuild an array and refuses everything else before it is called.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

from .errors import DataError

# (module, name) pairs a CIFAR-10 pickle may reference, in both numpy 1 and
# numpy >= 2 spellings (numpy 2 moved numpy.core to numpy._core).
_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


def _import_numpy_module(module: str) -> Any:
    # Prefer numpy._core: under numpy 2, importing numpy.core warns that it is deprecated.
    if module.startswith("numpy.core"):
        candidates = ["numpy._core" + module.removeprefix("numpy.core"), module]
    elif module.startswith("numpy._core"):
        candidates = [module, "numpy.core" + module.removeprefix("numpy._core")]
    else:
        candidates = [module]
    for name in candidates:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"cannot import {module}")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # latin1 turns Python 2 byte strings into str keys and keeps the
        # array bytes intact (numpy re-encodes them with latin1).
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise DataError(
                f"{self._path}: refusing to unpickle the global '{module}.{name}'; "
                "a CIFAR-10 batch may only reference numpy's array reconstruction "
                "(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype). "
                "The file is not an official CIFAR-10 batch or has been tampered with."
            )
        return getattr(_import_numpy_module(module), name)


def load_pickle(raw: bytes, path: Path) -> Any:
    """Unpickle ``raw`` (the bytes of ``path``) allowing only numpy array globals."""
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean the same
        raise DataError(
            f"{path}: cannot read this pickle ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt"
        ) from e
