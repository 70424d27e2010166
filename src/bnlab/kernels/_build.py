"""The batch-norm CPU kernels (``cpu_kernels.cpp``) as a :class:`bnlab.native.Extension`.

``native()`` returns the loaded module, or ``None`` after one warning when it
cannot be built; the caller then runs on the reference backend.
``BNLAB_BACKEND=reference`` (read at import, ``ENABLED``) skips the build.
The building itself is :mod:`bnlab.native`'s.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from bnlab import native as _native
from bnlab.native import cache_dir

BATCH_NORM = _native.Extension(
    "_bnlab_bn_cpu",  # must match PyInit__bnlab_bn_cpu in cpu_kernels.cpp
    [Path(__file__).with_name("cpu_kernels.cpp")],
    fallback="the (slower) reference backend",
)

ENABLED = _native.ENABLED
_compiler = _native.find_compiler
_UNSET = object()
_module: ModuleType | object | None = _UNSET


def native() -> ModuleType | None:
    """The compiled kernels, building them on first use; None if they cannot be had.

    Memoised here rather than by ``BATCH_NORM.load()``: the tests reset ``_module`` and patch
    ``_compiler`` and ``ENABLED`` to reach the fallback.
    """
    global _module
    if _module is _UNSET:
        _module = BATCH_NORM.build(_compiler()) if ENABLED else None
    return _module  # type: ignore[return-value]


__all__ = ["BATCH_NORM", "ENABLED", "cache_dir", "native"]
