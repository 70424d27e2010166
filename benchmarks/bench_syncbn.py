"""SyncBatchNorm's per-step cost over plain batch norm: two gloo processes on the CPU.

    python benchmarks/bench_syncbn.py            # print the table
    python benchmarks/bench_syncbn.py --record   # ... and make it benchmarks/RESULTS.md's section
    python benchmarks/bench_syncbn.py --quick    # fewer rounds, for a smoke test

Two processes on this machine, one thread each (``--threads`` for more), in
one gloo process group. Each shape is one process's half of a global batch of
64 at LeNet-5's batch norms, plus one larger layer. A training step,
``y = m(x); torch.autograd.backward(y, dy)`` in float32, of:

* torch — ``torch.nn.BatchNorm``, statistics of this process's half only
* bnlab — ``bnlab.nn.BatchNorm``, likewise
* sync  — ``bnlab.nn.SyncBatchNorm`` over both processes: one all_gather of
  2C + 1 numbers forward, one all_reduce of 2C backward
* comm  — those two collectives alone, on tensors of the same sizes: what
  synchronizing costs at least

(torch's own SyncBatchNorm refuses CPU tensors.) Each contender runs in
interleaved rounds, as ``_timing.interleaved`` does, with the number of calls
per round agreed by both processes (the collectives must pair up) and a
barrier before each round, so a sync step waits only for the other process's
same step. Times are rank 0's medians.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bnlab.nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import arguments, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
WORLD = 2
SHAPES = [  # one process's half of the batch
    (32, 6, 28, 28),  # LeNet-5 conv1
    (32, 16, 10, 10),  # LeNet-5 conv2
    (32, 120),  # LeNet-5 fc1
    (32, 84),  # LeNet-5 fc2
    (32, 64, 56, 56),
]
# The name SyncBatchNorm's collective has in this torch (renamed in 2.12).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rounds(fns: dict[str, Callable[[], object]], rounds: int, round_time: float = 0.02):
    """Median seconds per call of each function, the same calls per round on every rank."""
    once = []
    for fn in fns.values():
        fn()
        fn()
        dist.barrier()
        start = time.perf_counter()
        fn()
        once.append(max(time.perf_counter() - start, 1e-7))
    slowest = torch.tensor(once, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    calls = {
        name: max(1, int(round_time / s)) for name, s in zip(fns, slowest.tolist(), strict=True)
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, k = fns[name], calls[name]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(s) for name, s in samples.items()}


def _measure(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    c = shape[1]
    layers = {
        "torch": getattr(torch.nn, cls)(c),
        "bnlab": getattr(bnlab.nn, cls)(c),
        "sync": bnlab.nn.SyncBatchNorm(c),
    }
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    gathered, reduced = torch.empty(WORLD * (2 * c + 1)), torch.empty(2 * c)

    def step(m):
        def run():
            x.grad = None
            torch.autograd.backward(m(x), dy)

        return run

    def comm():
        _all_gather(gathered, torch.zeros(2 * c + 1))
        dist.all_reduce(reduced)

    fns = {name: step(m) for name, m in layers.items()}
    fns["comm"] = comm
    return _rounds(fns, rounds)


def _worker(rank: int, port: int, out: str, rounds: int, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(threads)
    results = [(shape, _measure(shape, rounds)) for shape in SHAPES]
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown


def table(rows: list[tuple[tuple[int, ...], dict[str, float]]]) -> str:
    lines = [
        "| shape (per process) | torch µs | bnlab µs | sync µs | comm µs "
        "| sync / bnlab | sync / torch | sync − bnlab − comm µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, t in rows:
        us = {k: v * 1e6 for k, v in t.items()}
        lines.append(
            f"| {'×'.join(map(str, shape))} | {us['torch']:.0f} | {us['bnlab']:.0f} | "
            f"{us['sync']:.0f} | {us['comm']:.0f} | {t['sync'] / t['bnlab']:.2f}× | "
            f"{t['sync'] / t['torch']:.2f}× | {us['sync'] - us['bnlab'] - us['comm']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__).parse_args(argv)
    rounds = rounds_for(args)
    threads = args.threads or 1
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.spawn(_worker, args=(_free_port(), out, rounds, threads), nprocs=WORLD, join=True)
        rows = torch.load(out, weights_only=False)
    text = (
        f"{WORLD} gloo processes, {threads} thread(s) each, float32, fwd+bwd per step; "
        "rank 0's medians.\n\n" + table(rows)
    )
    publish(text, RESULTS_MD, "SyncBatchNorm over 2 gloo processes (bench_syncbn.py)", args.record)


if __name__ == "__main__":
    main()
