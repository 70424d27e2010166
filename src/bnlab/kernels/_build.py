"""The batch-norm CPU kernels as :class:`bnlab.native.Extension` modules.

* ``native()``: the kernels as Python functions (``cpu_kernels.cpp``), or
  ``None`` after one warning when they cannot be built; the caller then runs
  on the reference backend.
* ``node()``: the C++ autograd node (``cpu_node.cpp``, built against torch's
  headers and libraries), which runs the kernels of ``native()`` through the
  table it hands out, or ``None`` after one warning; small calls then run on
  the Python autograd function (:mod:`bnlab.small_calls`).

``BNLAB_BACKEND=reference`` (read at import, ``ENABLED``) skips both builds.
The building itself is :mod:`bnlab.native`'s.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from bnlab import _compat
from bnlab import native as _native
from bnlab.native import cache_dir

BATCH_NORM = _native.Extension(
    "_bnlab_bn_cpu",  # must match PyInit__bnlab_bn_cpu in cpu_kernels.cpp
    [Path(__file__).with_name("cpu_kernels.cpp")],
    fallback="the (slower) reference backend",
)


def _torch_flags() -> list[str]:
    """Compiler and linker flags for code that includes torch's headers and links its libraries."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    if not (include / "torch" / "library.h").exists():
        raise FileNotFoundError(f"torch's C++ headers are not in {include}")
    return [
        "-std=c++20",  # what torch's headers are written in (later than _COMMON's, so it wins)
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-D_GLIBCXX_USE_CXX11_ABI={_compat.cxx11_abi()}",
        # Part of the cache key: a torch upgrade in place rebuilds the node.
        f'-DBNLAB_TORCH_VERSION="{torch.__version__}"',
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-lc10",
        "-ltorch_cpu",
        "-ltorch_python",
    ]


NODE = _native.Extension(
    "_bnlab_bn_node",  # must match PyInit__bnlab_bn_node in cpu_node.cpp
    [Path(__file__).with_name("cpu_node.cpp")],
    fallback="bnlab's Python autograd function for small calls",
    flags=_torch_flags,
    for_cpu=False,  # it only calls the kernels, which _bnlab_bn_cpu holds
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


_node: ModuleType | object | None = _UNSET


def node() -> ModuleType | None:
    """The autograd node's module (``batch_norm``, see cpu_node.cpp), building it on first
    use and handing it the kernels; None if either cannot be had."""
    global _node
    if _node is _UNSET:
        kernels = native()
        _node = NODE.build(_compiler()) if kernels is not None else None
        if _node is not None:
            _node.use_kernels(kernels.KERNELS)  # the very kernels the Python functions run
    return _node  # type: ignore[return-value]


__all__ = ["BATCH_NORM", "ENABLED", "NODE", "cache_dir", "native", "node"]
