"""Run a function in a few gloo processes on this machine, with every wait bounded.

``spawn(fn, world, *args)`` starts ``world`` processes that join one gloo
process group on a free port and call ``fn(rank, world, *args)``; it returns
what each rank returned (None for a rank that left without returning). An exception in any rank fails the caller with that
rank's traceback. Every collective is bounded by the group's ``TIMEOUT`` and
the whole run by ``limit`` seconds, after which the processes are killed: a
failing test cannot hang.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable, world: int, port: int, out_dir: str, barrier: bool, args: tuple
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)  # two cores for two or three processes
    result = fn(rank, world, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if barrier:  # no rank leaves while a peer may still be sending to it
        dist.barrier()
    # gloo's worker threads can abort the interpreter's shutdown ("terminate
    # called without an active exception"); the result is saved, so leave now.
    os._exit(0)


def spawn(
    fn: Callable, world: int, *args: Any, limit: float = 60.0, barrier: bool = True
) -> list[Any]:
    """[fn(rank, world, *args) for each rank], each computed in its own gloo process.

    ``barrier=False`` for a run where a rank leaves early on purpose.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(
            _entry, args=(fn, world, _free_port(), out_dir, barrier, args), nprocs=world, join=False
        )
        deadline = time.monotonic() + limit
        try:
            while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{fn.__name__}: {world} processes ran past {limit} s")
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
        return [torch.load(p, weights_only=False) if os.path.exists(p) else None for p in paths]
