"""bnlab's batch norm vs torch.nn's on the CPU, side by side in one process.

    python benchmarks/bench_bn.py                 # print the table
    python benchmarks/bench_bn.py --record        # ... and append it to benchmarks/RESULTS.md
    python benchmarks/bench_bn.py --quick         # fewer rounds, for a smoke test
    python benchmarks/bench_bn.py --keep-memory   # glibc keeps freed memory (no page faults)
    python benchmarks/bench_bn.py --floor         # ... and the least a Python or C++ layer costs

Module level, float32: ``bnlab.nn.BatchNorm{1,2,3}d`` against
``torch.nn.BatchNorm{1,2,3}d``, what a model sees, autograd included.

* fwd+bwd  — training: ``y = m(x); torch.autograd.backward(y, dy)``
* train    — training forward alone (running stats updated, graph recorded)
* eval     — inference: ``m.eval()`` under ``torch.no_grad()``

Times are medians of interleaved rounds (torch, bnlab, torch, ...). GB/s
counts the bytes each pass must move at least, with S = x's size in bytes:
the training forward reads x for the statistics and again to write y (3S),
the backward reads dy and x for the sums and again to write dx (5S), eval
reads x and writes y (2S). The copy bandwidth (a large tensor copied into
an existing one, 2 bytes moved per byte) is measured in the same run.

Each call allocates its outputs, and glibc returns large freed blocks to the
system, so outputs often land on fresh pages whose first touch (a page fault
each 4 KiB) can cost more than the batch norm itself, for torch and bnlab
alike. ``--keep-memory`` raises glibc's mmap and trim thresholds for this
process (both contenders), which shows the batch norm without that cost.

Without it, glibc's own state is settled first: its mmap threshold starts at
128 KiB and rises to the largest mapped block freed so far (at most 32 MiB),
so a 16 MiB tensor is allocated and freed before timing, as any training
process does in its first step. Otherwise LeNet-5's shapes, timed first, got
a fresh mapping for every output and the later ones did not: the same shape
measured 1.5× or 2.6× depending on what the process had freed before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import bnlab.nn
from bnlab import kernels
from bnlab.experiments.memory import keep_freed_memory
from bnlab.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _empty_op import empty_cpp_op
from _timing import arguments, copy_bandwidth, interleaved, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool = False
    target: float = 1.0  # fwd+bwd speedup the CPU backend aims for

    @property
    def label(self) -> str:
        return "×".join(map(str, self.shape)) + (" CL" if self.channels_last else "")


CASES = [
    Case((64, 6, 28, 28), target=3.0),  # LeNet-5 conv1
    Case((64, 16, 10, 10), target=3.0),  # LeNet-5 conv2
    Case((64, 120)),  # LeNet-5 fc1
    Case((64, 84)),  # LeNet-5 fc2
    Case((64, 64, 56, 56), target=1.5),
    Case((64, 64, 56, 56), channels_last=True, target=1.5),
    Case((128, 256, 14, 14), target=1.5),
    Case((8192, 1024), target=1.5),
    Case((8, 32, 16, 32, 32), target=1.5),
]

BYTES_PER_PASS = {"fwd+bwd": 8, "train": 3, "eval": 2}  # multiples of S


def _modules(case: Case):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(case.shape)]
    c = case.shape[1]
    return getattr(torch.nn, cls)(c), getattr(bnlab.nn, cls)(c)


def _input(case: Case) -> torch.Tensor:
    x = torch.randn(case.shape)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _settle_mmap_threshold() -> None:
    """Raise glibc's dynamic mmap threshold to 16 MiB, as freeing such a tensor does."""
    block = torch.empty(16 << 20, dtype=torch.uint8)
    del block


def measure(case: Case, rounds: int) -> dict[str, dict[str, float]]:
    """{mode: {"torch": seconds, "bnlab": seconds}} for one case."""
    theirs, ours = _modules(case)
    x = _input(case).requires_grad_()
    dy = _input(case)

    def fwd_bwd(m):
        def step():
            x.grad = None
            torch.autograd.backward(m(x), dy)

        return step

    def train(m):
        return lambda: m(x)

    def evaluate(m):
        def step():
            with torch.no_grad():
                m(x)

        return step

    results = {}
    for mode, make in (("fwd+bwd", fwd_bwd), ("train", train), ("eval", evaluate)):
        for m in (theirs, ours):
            m.train(mode != "eval")
        results[mode] = interleaved({"torch": make(theirs), "bnlab": make(ours)}, rounds=rounds)
    return results


class _EmptyFunction(torch.autograd.Function):
    """What any autograd.Function costs: fresh outputs of the right sizes, no work.

    The Python twin of ``empty_autograd_op.cpp``: the same allocations and saved tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        stats = x.new_empty(3 * x.size(1), dtype=torch.float64)
        ctx.save_for_backward(x, weight, stats)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def floor(case: Case, rounds: int, empty_cpp: Callable | None) -> dict[str, float]:
    """fwd+bwd seconds of torch, bnlab, empty autograd ops, and bnlab's kernels alone.

    A layer pays at least an empty op's cost plus its kernels': an
    autograd.Function the Python one's ("empty"), a layer in C++ the C++ one's
    ("empty_cpp", when ``empty_cpp`` is given). When that sum exceeds
    torch / target, the target is out of reach for such a layer on this machine.
    """
    theirs, ours = _modules(case)
    x = _input(case).requires_grad_()
    dy = _input(case)
    weight, bias = ours.weight, ours.bias
    w, b = weight.detach(), bias.detach()
    buffers = (ours.running_mean, ours.running_var, ours.momentum)
    _, stats, _ = cpu.eager_forward_train(x.detach(), w, b, ours.eps, *buffers)

    def fwd_bwd(f):
        def step():
            x.grad = None
            torch.autograd.backward(f(x), dy)

        return step

    def kernels_alone():
        cpu.eager_forward_train(x.detach(), w, b, ours.eps, *buffers)
        cpu.eager_backward(dy, x.detach(), w, stats, True)

    contenders = {
        "torch": fwd_bwd(theirs),
        "bnlab": fwd_bwd(ours),
        "empty": fwd_bwd(lambda t: _EmptyFunction.apply(t, weight, bias)),
        "kernels": kernels_alone,
    }
    if empty_cpp is not None:
        contenders["empty_cpp"] = fwd_bwd(lambda t: empty_cpp(t, weight, bias))
    return interleaved(contenders, rounds=rounds)


def floor_table(rows: list[tuple[Case, dict[str, float]]], cpp_missing: str) -> str:
    lines = [
        "Training fwd+bwd against what a layer cannot avoid: an empty autograd op (fresh",
        "outputs and saved tensors as bnlab's, no work) plus bnlab's kernels alone (statistics,",
        "normalize, both backward passes, their outputs allocated). The floor of a Python",
        "autograd.Function is the empty Function's plus the kernels'; that of a layer whose",
        "dispatch, autograd node and backward are all C++, the empty C++ op's plus the kernels'.",
        "",
        "| shape | torch µs | bnlab µs | kernels µs | empty Function µs | floor µs "
        "| empty C++ op µs | C++ floor µs | torch / target µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, t in rows:
        us = {k: v * 1e6 for k, v in t.items()}
        cpp = ["–", "–"]
        if "empty_cpp" in us:
            cpp = [f"{us['empty_cpp']:.0f}", f"{us['empty_cpp'] + us['kernels']:.0f}"]
        lines.append(
            f"| {case.label} | {us['torch']:.0f} | {us['bnlab']:.0f} | {us['kernels']:.0f} | "
            f"{us['empty']:.0f} | {us['empty'] + us['kernels']:.0f} | {cpp[0]} | {cpp[1]} | "
            f"{us['torch'] / case.target:.0f} |"
        )
    if cpp_missing:
        lines += ["", f"No C++ column: {cpp_missing}."]
    return "\n".join(lines) + "\n"


def compile_costs() -> tuple[float, float]:
    """Seconds to build the native kernels into an empty cache, then to load them from it."""
    code = (
        "import time, torch, bnlab; from bnlab.kernels import _build; "
        "t = time.perf_counter(); m = _build.native(); "
        "print(time.perf_counter() - t if m is not None else float('nan'))"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "BNLAB_CACHE_DIR": cache}
        times = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()
            )
            for _ in range(2)
        ]
    return times[0], times[1]


def table(rows: list[tuple[Case, dict]], copy_gbs: float) -> str:
    lines = [
        "| shape | mode | torch µs | bnlab µs | speedup | target | torch GB/s | bnlab GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, results in rows:
        nbytes = 4 * torch.Size(case.shape).numel()
        for mode, t in results.items():
            target = case.target if mode == "fwd+bwd" else 1.0
            speedup = t["torch"] / t["bnlab"]
            gbs = [BYTES_PER_PASS[mode] * nbytes / t[k] / 1e9 for k in ("torch", "bnlab")]
            mark = "" if speedup >= target else " ✗"
            lines.append(
                f"| {case.label} | {mode} | {t['torch'] * 1e6:.0f} | {t['bnlab'] * 1e6:.0f} | "
                f"{speedup:.2f}×{mark} | ≥{target:g}× | {gbs[0]:.1f} | {gbs[1]:.1f} |"
            )
    lines.append("")
    lines.append(f"Copy bandwidth (same run): {copy_gbs:.1f} GB/s. ✗: below target.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--no-compile-cost", action="store_true", help="skip the build timing")
    parser.add_argument(
        "--floor", action="store_true", help="also time the autograd floor of the 3x shapes"
    )
    parser.add_argument(
        "--keep-memory", action="store_true", help="glibc keeps freed memory (no page faults)"
    )
    args = parser.parse_args(argv)
    if args.keep_memory:
        keep_freed_memory()
    else:
        _settle_mmap_threshold()
    backend = kernels.select(torch.randn(2, 2)).name
    rounds = rounds_for(args)
    allocator = "glibc keeps freed memory" if args.keep_memory else "default allocator"
    print(f"backend for float32 CPU tensors: {backend}; {allocator}")

    copy_gbs = copy_bandwidth(rounds=rounds)
    rows = []
    for case in CASES:
        rows.append((case, measure(case, rounds)))
        print(f"  measured {case.label}", file=sys.stderr)
    text = f"Allocator: {allocator}.\n\n" + table(rows, copy_gbs)
    if args.floor:
        empty_cpp, cpp_missing = empty_cpp_op()
        small = [case for case in CASES if case.target > 2]
        rows = [(case, floor(case, rounds, empty_cpp)) for case in small]
        text += "\n\n" + floor_table(rows, cpp_missing)
    if not args.no_compile_cost:
        cold, cached = compile_costs()
        text += (
            f"\nNative kernels: first build {cold:.1f} s (once per machine, cached), "
            f"load from the cache {cached * 1e3:.1f} ms."
        )
    publish(text, RESULTS_MD, "CPU batch norm: bnlab vs torch.nn (bench_bn.py)", args.record)


if __name__ == "__main__":
    main()
