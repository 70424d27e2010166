"""Keep freed memory in the process instead of handing it back to the OS.

A CPU training step allocates and frees the same megabyte-sized buffers
(activations, gradients) every batch. glibc serves blocks that large with
fresh mmap()s and returns them on free(), so every step pays page faults on
all of them (``benchmarks/bench_bn.py --keep-memory`` shows what that costs
a batch norm). Raising glibc's mmap and trim thresholds makes it reuse that
memory; the process then holds on to its peak heap size.

This changes the allocator of the whole process, so bnlab never calls it on
a library user's behalf: the ``bnlab`` command opts in for its own process,
and the experiment's worker processes for themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # blocks up to 1 GiB come from the reusable heap


def keep_freed_memory() -> bool:
    """Raise glibc's thresholds for this process; False where there is no glibc (a no-op)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _KEEP)) and bool(mallopt(_M_MMAP_THRESHOLD, _KEEP))
