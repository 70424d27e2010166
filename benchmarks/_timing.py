"""Timing helpers for the benchmark scripts: interleaved medians, machine facts, recording.

Machines are noisy (other processes, frequency changes), so contenders are
timed in alternation, many short rounds each, and compared by their medians:
a disturbance hits both sides instead of one. Where one ratio matters (bnlab
against torch), it is taken round by round, between the two timings made back
to back, and the median of those ratios comes with a confidence interval
(``median_interval``), which says whether a cell just under 1.0 is slower
beyond the machine's noise.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 15, round_time: float = 0.02
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds."""
    samples = interleaved_samples(fns, rounds, round_time)
    return {name: statistics.median(s) for name, s in samples.items()}


def interleaved_samples(
    fns: dict[str, Callable[[], object]], rounds: int = 15, round_time: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each function in each round, timed in alternating rounds.

    Each function is first warmed up and calibrated to a number of calls that
    takes about ``round_time``; then every round times each function once (in
    an order that rotates, so none always runs first). Entry r of every list
    comes from round r, so ratios between two functions can be taken round by round.
    """
    calls = {}
    for name, fn in fns.items():
        fn()
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, int(round_time / once))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, k = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - start) / k)
    return samples


def round_ratios(
    samples: dict[str, list[float]], numerator: str, denominator: str
) -> tuple[float, ...]:
    """numerator's time over denominator's, round by round.

    The two timings of a round ran back to back, so their ratio cancels what
    slows the machine for seconds at a time; a speedup is these ratios' median.
    """
    pairs = zip(samples[numerator], samples[denominator], strict=True)
    return tuple(a / b for a, b in pairs)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of ``values``.

    The median lies below the k-th smallest of n independent values with
    probability P(Binomial(n, 1/2) < k), whatever their distribution, so the
    interval runs from the k-th smallest to the k-th largest value, with k the
    largest order for which both tails together stay within 1 - confidence.
    Fewer than 6 values cannot reach 95%: the interval is then their whole range.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    tail = (1 - confidence) / 2
    below = 0.0  # P(Binomial(n, 1/2) < k), for k = 1, 2, ...
    k = 0
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def slower_beyond_noise(ratios: tuple[float, ...]) -> bool:
    """torch/bnlab ratios whose median's 95% interval lies wholly under 1.0."""
    return median_interval(list(ratios))[1] < 1


def ratio_with_interval(ratios: tuple[float, ...]) -> str:
    """The ratios' median and its 95% interval, "0.97× (0.95–0.99)", with † when
    the interval lies wholly under 1.0."""
    lo, hi = median_interval(list(ratios))
    return f"{statistics.median(ratios):.2f}× ({lo:.2f}–{hi:.2f}){'†' if hi < 1 else ''}"


def below_one_summary(count: int, below: int, beyond: int) -> str:
    """How many of `count` cells reach 1.0×, and how many of the `below` others lie
    under it beyond the noise."""
    return (
        f"{count - below} of {count} cells at or above 1.0×; {beyond} below it beyond the "
        "noise (95% interval of the median wholly under 1.0)."
    )


def settle_mmap_threshold() -> None:
    """Raise glibc's dynamic mmap threshold to 16 MiB, as freeing such a tensor does.

    glibc's threshold starts at 128 KiB and rises to the largest mapped block
    freed so far, so until then every output above it lands on fresh pages
    (a page fault each 4 KiB); a training process settles it in its first step.
    """
    block = torch.empty(16 << 20, dtype=torch.uint8)
    del block


def training_step(f: Callable, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """A contender: one forward through ``f`` and its backward from ``dy``, x's gradient
    cleared first (so each step allocates it, as a training step does)."""

    def step():
        x.grad = None
        torch.autograd.backward(f(x), dy)

    return step


def inference(f: Callable, x: torch.Tensor) -> Callable[[], None]:
    """A contender: one forward through ``f`` under no_grad."""

    def step():
        with torch.no_grad():
            f(x)

    return step


def copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 15) -> float:
    """GB/s of a plain tensor copy into an existing tensor (read + write counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = interleaved({"copy": lambda: dst.copy_(src)}, rounds=rounds, round_time=0.05)["copy"]
    return 2 * nbytes / seconds / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def replace_section(path: Path, title: str, section: str) -> None:
    """Put ``section`` (a markdown section headed ``## {title} — ...``) into ``path``.

    One current section per title: the one recorded before, if any, is replaced
    in place (git keeps the history). Written atomically (temp file + rename).
    """
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    parts = [p.strip("\n") for p in re.split(r"(?m)^(?=## )", old) if p.strip()]
    head = f"## {title} — "
    at = next((i for i, p in enumerate(parts) if p.startswith(head)), len(parts))
    parts = [p for p in parts if not p.startswith(head)]
    parts.insert(at, section.strip("\n"))
    text = "\n\n".join(parts)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text.rstrip("\n") + "\n")
    os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
    os.replace(tmp, path)


def publish(text: str, path: Path, title: str, record: bool) -> None:
    """Print a result; with ``record``, also make it ``path``'s current section for ``title``."""
    print(text)
    if record:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        section = (
            f"## {title} — {stamp}\n\n"
            f"- Machine: {machine_summary()}\n"
            f"- Command: `{command_line()}`\n\n"
            f"{text.rstrip()}\n"
        )
        replace_section(path, title, section)
        print(f"recorded in {path}")


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options every CPU benchmark takes: --record, --quick, --threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="append to benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds per measurement (default 15, --quick 5)"
    )
    return parser


def rounds_for(args: argparse.Namespace) -> int:
    """Apply --threads; the interleaved rounds --rounds or --quick ask for.

    A noisy machine (a shared host) needs more rounds for a median to settle.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds:
        return args.rounds
    return 5 if args.quick else 15
