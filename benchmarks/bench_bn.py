"""bnlab's batch norm vs torch.nn's on the CPU, side by side in one process.

    python benchmarks/bench_bn.py                 # print the table
    python benchmarks/bench_bn.py --record        # ... and append it to benchmarks/RESULTS.md
    python benchmarks/bench_bn.py --quick         # fewer rounds, for a smoke test
    python benchmarks/bench_bn.py --keep-memory   # glibc keeps freed memory (no page faults)
    python benchmarks/bench_bn.py --floor         # ... and the least a Python or C++ layer costs
    python benchmarks/bench_bn.py --sweep         # every dtype, shape, mode and thread count
    python benchmarks/bench_bn.py --sweep --quick --dtypes bf16 --shapes resnet,3d

Module level, float32: ``bnlab.nn.BatchNorm{1,2,3}d`` against
``torch.nn.BatchNorm{1,2,3}d``, what a model sees, autograd included.

* fwd+bwd  — training: ``y = m(x); torch.autograd.backward(y, dy)``
* train    — training forward alone (running stats updated, graph recorded)
* eval     — inference: ``m.eval()`` under ``torch.no_grad()``

Times are medians of interleaved rounds (torch, bnlab, torch, ...); a
speedup is the median of torch/bnlab taken round by round, between the two
timings made back to back, which cancels what slows the machine for seconds
at a time. GB/s
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

The sweep (``--sweep``) times the same three modes for float32, bfloat16 and
float16 inputs (the modules keep float32 parameters and buffers, as CPU
autocast hands batch norm a bfloat16 input), on LeNet-5's and ResNet's
shapes, (N, C) and (N, C, L) inputs, one image and a 3d volume, each on one
thread and on all of torch's (both contenders under the same setting). It
prints a matrix of speedups (torch time / bnlab time, above 1 when bnlab is
faster; cells below 1 are marked), the cells below 1 with the 95%
confidence interval of their median (a cell whose interval lies wholly under
1.0 is slower beyond the noise of its rounds), and for the shapes
over 8 MiB in float32: bnlab's GB/s per dtype and mode (S counted in the
input's dtype), with two checks — bfloat16 and float16 reach at least 70% of
float32's bandwidth, and training fwd+bwd is at least 1.5× torch's.
Filters, for iterating on one kernel: ``--dtypes`` (comma-separated; fp32,
bf16 and fp16 are accepted), ``--shapes`` (comma-separated pieces of a row's
label, "x" for "×", spaces and case ignored: ``--shapes lenet,1d,32x2048``), and
``--threads N`` (only N threads instead of one and all). ``--record`` puts
the sweep in its own section of RESULTS.md, beside the table's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import bnlab.nn
from bnlab import kernels, native
from bnlab.experiments.memory import keep_freed_memory
from bnlab.kernels import cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_cuda
from _empty_op import empty_cpp_op
from _timing import (
    arguments,
    below_one_summary,
    copy_bandwidth,
    cpu_model,
    inference,
    interleaved,
    interleaved_samples,
    publish,
    ratio_with_interval,
    round_ratios,
    rounds_for,
    settle_mmap_threshold,
    slower_beyond_noise,
    training_step,
)

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    channels_last: bool = False
    target: float = 1.0  # fwd+bwd speedup the CPU backend aims for
    dtype: torch.dtype = torch.float32  # the input's; the modules stay float32
    name: str = ""  # where the shape comes from, for the sweep's rows

    @property
    def label(self) -> str:
        return "×".join(map(str, self.shape)) + (" CL" if self.channels_last else "")

    @property
    def title(self) -> str:
        return f"{self.name} {self.label}".strip()

    @property
    def nbytes(self) -> int:
        """S: the input's size in bytes, in its own dtype."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize


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
    x = torch.randn(case.shape, dtype=case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def measure(case: Case, rounds: int, round_time: float = 0.02) -> dict[str, dict[str, list[float]]]:
    """{mode: {"torch": seconds per round, "bnlab": seconds per round}} for one case."""
    theirs, ours = _modules(case)
    x = _input(case).requires_grad_()
    dy = _input(case)

    def fwd_bwd(m):
        return training_step(m, x, dy)

    def train(m):
        return lambda: m(x)

    def evaluate(m):
        return inference(m, x)

    results = {}
    for mode, make in (("fwd+bwd", fwd_bwd), ("train", train), ("eval", evaluate)):
        for m in (theirs, ours):
            m.train(mode != "eval")
        contenders = {"torch": make(theirs), "bnlab": make(ours)}
        results[mode] = interleaved_samples(contenders, rounds=rounds, round_time=round_time)
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
        return training_step(f, x, dy)

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


def paired(samples: dict[str, list[float]]) -> tuple[float, float, tuple[float, ...]]:
    """torch's and bnlab's median seconds, and torch/bnlab round by round."""
    ratios = round_ratios(samples, "torch", "bnlab")
    return statistics.median(samples["torch"]), statistics.median(samples["bnlab"]), ratios


def table(rows: list[tuple[Case, dict]], copy_gbs: float) -> str:
    lines = [
        "| shape | mode | torch µs | bnlab µs | speedup | target | torch GB/s | bnlab GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case, results in rows:
        nbytes = case.nbytes
        for mode, samples in results.items():
            target = case.target if mode == "fwd+bwd" else 1.0
            theirs, ours, ratios = paired(samples)
            speedup = statistics.median(ratios)
            gbs = [BYTES_PER_PASS[mode] * nbytes / t / 1e9 for t in (theirs, ours)]
            mark = "" if speedup >= target else " ✗"
            lines.append(
                f"| {case.label} | {mode} | {theirs * 1e6:.0f} | {ours * 1e6:.0f} | "
                f"{speedup:.2f}×{mark} | ≥{target:g}× | {gbs[0]:.1f} | {gbs[1]:.1f} |"
            )
    lines.append("")
    lines.append(f"Copy bandwidth (same run): {copy_gbs:.1f} GB/s. ✗: below target.")
    return "\n".join(lines)


# The sweep: every dtype, shape, mode and thread count.

SWEEP_CASES = [
    Case((64, 6, 28, 28), name="LeNet-5 conv1"),
    Case((64, 16, 10, 10), name="LeNet-5 conv2"),
    Case((64, 120), name="LeNet-5 fc1"),
    Case((64, 84), name="LeNet-5 fc2"),
    Case((32, 64, 56, 56), name="ResNet stage 1"),
    Case((32, 64, 56, 56), channels_last=True, name="ResNet stage 1"),
    Case((32, 256, 28, 28), name="ResNet stage 2"),
    Case((32, 256, 28, 28), channels_last=True, name="ResNet stage 2"),
    Case((32, 512, 14, 14), name="ResNet stage 3"),
    Case((32, 512, 14, 14), channels_last=True, name="ResNet stage 3"),
    Case((32, 2048, 7, 7), name="ResNet stage 4"),
    Case((32, 2048, 7, 7), channels_last=True, name="ResNet stage 4"),
    Case((32, 120), name="1d features"),
    Case((256, 512), name="1d features"),
    Case((32, 4096), name="1d features"),
    Case((8192, 1024), name="1d features"),
    Case((32, 256, 100), name="1d sequence"),
    Case((1, 64, 112, 112), name="one image"),
    Case((8, 32, 16, 32, 32), name="3d volume"),
]

SWEEP_MODES = ("train", "fwd+bwd", "eval")  # the matrix's column order, per thread count
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Large shapes, where a pass costs its bytes rather than its call's overhead.
LARGE_BYTES = 8 << 20  # counted in float32, so a shape is large in every dtype or in none
LOW_PRECISION_BANDWIDTH = 0.7  # of float32's GB/s, that bfloat16 and float16 should reach
LARGE_SPEEDUP = 1.5  # over torch, on the large shapes
# Eval and the training forward are passes torch also runs near the memory's
# bandwidth, so the 1.5× is asked of the whole training step only.
LARGE_SPEEDUP_MODES = ("fwd+bwd",)
# 19 shapes × 3 dtypes × 2 thread counts: half the table's round time halves
# the small shapes' share of the run, and a median of many rounds still settles.
SWEEP_ROUND_TIME = 0.01


@dataclass(frozen=True)
class Cell:
    """One cell of the sweep: a case (in its dtype) in one mode on some threads."""

    case: Case
    mode: str
    threads: int
    torch_s: float  # median seconds per call
    bnlab_s: float
    ratios: tuple[float, ...]  # torch/bnlab, round by round

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    @property
    def column(self) -> str:
        return f"{self.mode} {self.threads}t"

    @property
    def bnlab_gbs(self) -> float:
        return BYTES_PER_PASS[self.mode] * self.case.nbytes / self.bnlab_s / 1e9

    def where(self) -> str:
        return f"{self.case.title} {SHORT_NAMES[self.case.dtype]} {self.column}"


def dtype_list(text: str) -> list[torch.dtype]:
    """The dtypes a comma-separated --dtypes names (full names or fp32, bf16, fp16)."""
    dtypes = []
    for word in filter(None, (w.strip().lower() for w in text.split(","))):
        name = DTYPE_ALIASES.get(word, word)
        if name not in DTYPES:
            known = ", ".join([*DTYPES, *DTYPE_ALIASES])
            raise argparse.ArgumentTypeError(f"unknown dtype {word!r} (known: {known})")
        dtypes.append(DTYPES[name])
    return dtypes


def _searchable(text: str) -> str:
    """Lower case, "x" for "×", no spaces: what a --shapes pattern is matched in."""
    return text.lower().replace("×", "x").replace(" ", "")


def select_cases(patterns: str | None) -> list[Case]:
    """The sweep's cases whose title contains one of the comma-separated patterns."""
    if not patterns:
        return SWEEP_CASES
    wanted = [_searchable(p) for p in patterns.split(",") if p.strip()]
    return [c for c in SWEEP_CASES if any(w in _searchable(c.title) for w in wanted)]


def is_large(case: Case) -> bool:
    return torch.Size(case.shape).numel() * torch.float32.itemsize > LARGE_BYTES


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sweep(
    cases: list[Case], dtypes: list[torch.dtype], thread_counts: list[int], rounds: int
) -> list[Cell]:
    """Every case in every dtype and mode on every thread count, torch and bnlab interleaved."""
    cells = []
    start = time.perf_counter()
    for i, shape in enumerate(cases, 1):
        for dtype in dtypes:
            case = replace(shape, dtype=dtype)
            for n in thread_counts:
                with num_threads(n):
                    results = measure(case, rounds, SWEEP_ROUND_TIME)
                for mode in SWEEP_MODES:  # in the matrix's order, which the lists below keep
                    cells.append(Cell(case, mode, n, *paired(results[mode])))
        elapsed = time.perf_counter() - start
        print(f"  [{i}/{len(cases)}] {shape.title} ({elapsed:.0f} s)", file=sys.stderr)
    return cells


def _speedup_text(speedup: float) -> str:
    return f"{speedup:.2f}" if speedup >= 1 else f"**{speedup:.2f}✗**"


def speedup_matrix(cells: list[Cell]) -> str:
    """One row per shape and dtype, one column per mode and thread count."""
    thread_counts = sorted({c.threads for c in cells})
    columns = [f"{mode} {n}t" for n in thread_counts for mode in SWEEP_MODES]
    rows: dict[Case, dict[str, Cell]] = {}
    for cell in cells:
        rows.setdefault(cell.case, {})[cell.column] = cell
    lines = [
        "| shape | dtype | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for case, by_column in rows.items():
        values = " | ".join(_speedup_text(by_column[c].speedup) for c in columns)
        lines.append(f"| {case.title} | {SHORT_NAMES[case.dtype]} | {values} |")
    return "\n".join(lines)


def below_one(cells: list[Cell]) -> str:
    """How many cells reach 1.0×, and the others with their intervals, one line per row."""
    below = [c for c in cells if c.speedup < 1]
    beyond = [c for c in below if slower_beyond_noise(c.ratios)]
    lines = [below_one_summary(len(cells), len(below), len(beyond))]
    rows: dict[Case, list[Cell]] = {}
    for cell in below:
        rows.setdefault(cell.case, []).append(cell)
    if rows:
        lines += ["", "Below 1.0× (95% interval; †: wholly under 1.0):", ""]
    for case, row in rows.items():
        listed = ", ".join(f"{c.column} {ratio_with_interval(c.ratios)}" for c in row)
        lines.append(f"- {case.title} {SHORT_NAMES[case.dtype]}: {listed}")
    return "\n".join(lines)


def _in_float32(cell: Cell) -> tuple[Case, str, int]:
    """What a cell's float32 counterpart has: its shape in float32, its mode and threads."""
    return replace(cell.case, dtype=torch.float32), cell.mode, cell.threads


def _float32_twins(cells: list[Cell]) -> dict[Cell, Cell]:
    """Each bfloat16 or float16 cell's float32 cell, where that was timed too."""
    float32 = {_in_float32(c): c for c in cells if c.case.dtype == torch.float32}
    low = [c for c in cells if c.case.dtype != torch.float32]
    return {c: float32[_in_float32(c)] for c in low if _in_float32(c) in float32}


def bandwidth_table(large: list[Cell]) -> str:
    """bnlab's GB/s on the large shapes, per dtype and mode; bf16/fp16 also as float32's %."""
    twins = _float32_twins(large)
    dtypes = list(dict.fromkeys(c.case.dtype for c in large))
    columns = [(mode, dtype) for mode in SWEEP_MODES for dtype in dtypes]
    rows: dict[tuple[Case, int], dict[tuple[str, torch.dtype], Cell]] = {}
    for c in large:
        row = rows.setdefault((replace(c.case, dtype=torch.float32), c.threads), {})
        row[c.mode, c.case.dtype] = c
    header = " | ".join(f"{mode} {SHORT_NAMES[dtype]}" for mode, dtype in columns)
    lines = [
        f"| shape | threads | {header} |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for (case, threads), row in rows.items():
        values = []
        for column in columns:
            cell = row[column]
            text = f"{cell.bnlab_gbs:.1f}"
            if cell in twins:
                fraction = cell.bnlab_gbs / twins[cell].bnlab_gbs
                low = fraction < LOW_PRECISION_BANDWIDTH
                text += f" ({'**' if low else ''}{fraction:.0%}{'✗**' if low else ''})"
            values.append(text)
        lines.append(f"| {case.title} | {threads} | {' | '.join(values)} |")
    return "\n".join(lines)


def _check_line(passed: list[Cell], cells: list[Cell], claim: str, lowest: str) -> str:
    mark = "✓" if len(passed) == len(cells) else "✗"
    return f"{mark} {claim}: {len(passed)} of {len(cells)} cells; lowest {lowest}."


def bandwidth_check(large: list[Cell]) -> str:
    claim = (
        f"bnlab's bf16/fp16 bandwidth ≥ {LOW_PRECISION_BANDWIDTH:.0%} of float32's "
        "on the large shapes"
    )
    twins = _float32_twins(large)
    if not twins:
        return f"– {claim}: not checked (needs float32 and bfloat16 or float16 timed)."
    fraction = {c: c.bnlab_gbs / f.bnlab_gbs for c, f in twins.items()}
    passed = [c for c in twins if fraction[c] >= LOW_PRECISION_BANDWIDTH]
    worst = min(twins, key=fraction.__getitem__)
    return _check_line(passed, list(twins), claim, f"{fraction[worst]:.0%} ({worst.where()})")


def large_speedup_check(large: list[Cell]) -> str:
    modes = "/".join(LARGE_SPEEDUP_MODES)
    claim = (
        f"large shapes, {modes}: bnlab ≥ {LARGE_SPEEDUP:g}× torch (every dtype and thread count)"
    )
    cells = [c for c in large if c.mode in LARGE_SPEEDUP_MODES]
    passed = [c for c in cells if c.speedup >= LARGE_SPEEDUP]
    worst = min(cells, key=lambda c: c.speedup)
    return _check_line(passed, cells, claim, f"{worst.speedup:.2f}× ({worst.where()})")


def sweep_report(cells: list[Cell], header: str) -> str:
    parts = [
        header,
        "Speedup of bnlab over torch.nn: torch time / bnlab time, above 1 when bnlab is faster "
        "(**✗**: below 1.00). The modules keep float32 parameters; dtype is the input's; "
        "Nt: N threads.",
        speedup_matrix(cells),
        below_one(cells),
    ]
    large = [c for c in cells if is_large(c.case)]
    if large:
        parts += [
            f"bnlab's GB/s on the shapes over {LARGE_BYTES >> 20} MiB in float32 (S in the "
            "input's dtype); for bf16 and fp16, in parentheses, the share of float32's GB/s "
            "in the same mode and threads (**✗**: below "
            f"{LOW_PRECISION_BANDWIDTH:.0%}).",
            bandwidth_table(large),
            bandwidth_check(large) + "\n" + large_speedup_check(large),
        ]
    return "\n\n".join(parts) + "\n"


def run_sweep(args: argparse.Namespace, allocator: str, all_threads: int) -> None:
    cases = select_cases(args.shapes)
    if not cases:
        known = "; ".join(c.title for c in SWEEP_CASES)
        sys.exit(f"--shapes {args.shapes!r} matches none of: {known}")
    dtypes = args.dtypes or list(DTYPES.values())
    # --threads N times N threads only; otherwise one thread and all of torch's.
    thread_counts = [args.threads] if args.threads else sorted({1, all_threads})
    rounds = rounds_for(args)
    backends = ", ".join(
        f"{name} {kernels.select(torch.randn(2, 2, dtype=dtype)).name}"
        for name, dtype in DTYPES.items()
        if dtype in dtypes
    )
    with num_threads(max(thread_counts)):
        copy_gbs = copy_bandwidth(rounds=rounds)
    start = time.perf_counter()
    cells = sweep(cases, dtypes, thread_counts, rounds)
    minutes = (time.perf_counter() - start) / 60
    header = (
        f"- Allocator: {allocator}; threads: {' and '.join(map(str, thread_counts))}; "
        f"{rounds} interleaved rounds of about {SWEEP_ROUND_TIME * 1e3:.0f} ms per contender\n"
        f"- bnlab's backend per input dtype: {backends}\n"
        f"- Copy bandwidth: {copy_gbs:.1f} GB/s (threads: {max(thread_counts)}); "
        f"the sweep took {minutes:.1f} min"
    )
    # Each CPU model keeps a section of its own: a sweep on another machine
    # does not replace this one's.
    title = f"CPU sweep on {cpu_model()}: dtypes, shapes, modes, threads (bench_bn.py --sweep)"
    if native.MARCH != "native":
        # Built for another CPU (BNLAB_MARCH): a section of its own, next to this CPU's.
        capability = os.environ.get("ATEN_CPU_CAPABILITY", "(unset: this CPU's best)")
        header += (
            f"\n- Built for another CPU: BNLAB_MARCH={native.MARCH} (bnlab's kernels), "
            f"ATEN_CPU_CAPABILITY={capability} (torch's)"
        )
        title = (
            f"CPU sweep on {cpu_model()}, bnlab built for -march={native.MARCH} "
            "(bench_bn.py --sweep)"
        )
    publish(sweep_report(cells, header), RESULTS_MD, title, args.record)


def run_table(args: argparse.Namespace, allocator: str) -> None:
    """The float32 table of CASES, optionally with the autograd floor and the build cost."""
    backend = kernels.select(torch.randn(2, 2)).name
    rounds = rounds_for(args)
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


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--no-compile-cost", action="store_true", help="skip the build timing")
    parser.add_argument(
        "--floor", action="store_true", help="also time the autograd floor of the 3x shapes"
    )
    parser.add_argument(
        "--keep-memory", action="store_true", help="glibc keeps freed memory (no page faults)"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="every dtype, shape, mode and thread count"
    )
    parser.add_argument(
        "--dtypes", type=dtype_list, help="sweep only these, e.g. bf16,fp16 (default: all three)"
    )
    parser.add_argument(
        "--shapes", help="sweep only rows whose label contains one of these, e.g. lenet,1d,32x4096"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the Triton kernels against torch's on a GPU (_bench_cuda.py)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if args.sweep or args.floor or args.keep_memory:
            parser.error("--sweep, --floor and --keep-memory are CPU options")
        text = _bench_cuda.run(rounds_for(args))
        publish(text, RESULTS_MD, "GPU batch norm: bnlab (Triton) vs torch.nn", args.record)
        return
    if not args.sweep and (args.dtypes or args.shapes):
        parser.error("--dtypes and --shapes select what --sweep times")
    if args.sweep and args.floor:
        parser.error("--floor belongs to the float32 table, not to --sweep")
    all_threads = torch.get_num_threads()  # before --threads changes it
    if args.keep_memory:
        keep_freed_memory()
    else:
        settle_mmap_threshold()
    allocator = "glibc keeps freed memory" if args.keep_memory else "default allocator"
    if args.sweep:
        run_sweep(args, allocator, all_threads)
    else:
        run_table(args, allocator)


if __name__ == "__main__":
    main()
