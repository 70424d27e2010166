"""Where bnlab's own kernels overtake torch's: the crossover of ``bnlab.small_calls``.

    python benchmarks/bench_small_calls.py            # print the table
    python benchmarks/bench_small_calls.py --record   # ... and keep it in benchmarks/RESULTS.md

A training step (forward, then backward) through ``bnlab.nn`` pays for a
Python autograd function, where torch.nn's has its autograd node in C++, and
every call pays for bnlab's checks in Python. For each input size and for a
training step ("fwd+bwd") and inference ("eval", under no_grad), three
contenders are timed in interleaved rounds, module level:

* torch    — ``torch.nn.BatchNormXd``;
* own      — ``bnlab.nn.BatchNormXd`` with every call on bnlab's kernels
  (``small_calls.ENABLED = False``);
* bnlab    — ``bnlab.nn.BatchNormXd`` as shipped: calls at or below
  ``small_calls.MAX_BYTES`` on torch's kernel.

The crossover is the size from which "own" is at least torch's speed in every
column; ``MAX_BYTES`` should sit just below it, and "bnlab" should be at or
above 1.0 everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import bnlab.nn
from bnlab import small_calls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import arguments, interleaved, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

# (N, C) of LeNet-5's widths and NCHW with 16 channels, from 1K to 128K elements.
SHAPES = [(64, 16), (64, 84), (64, 120), (128, 120), (64, 6, 8, 8), (256, 120), (64, 16, 5, 5),
          (64, 16, 8, 8), (512, 120), (64, 16, 10, 10), (256, 512), (64, 16, 16, 16)]  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16)


def measure(shape: tuple[int, ...], dtype: torch.dtype, mode: str, rounds: int) -> dict:
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    contenders = {
        "torch": getattr(torch.nn, cls)(shape[1]),
        "own": getattr(bnlab.nn, cls)(shape[1]),
        "bnlab": getattr(bnlab.nn, cls)(shape[1]),
    }
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)

    def step(m):
        def run():
            x.grad = None
            torch.autograd.backward(m(x), dy)

        return run

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    def own_kernels(run):  # the switch costs two attribute writes, not a module layer
        def switched():
            small_calls.ENABLED = False
            try:
                run()
            finally:
                small_calls.ENABLED = True

        return switched

    make = step if mode == "fwd+bwd" else infer
    for m in contenders.values():
        m.train(mode == "fwd+bwd")
    fns = {k: make(m) for k, m in contenders.items()}
    fns["own"] = own_kernels(fns["own"])
    return interleaved(fns, rounds=rounds)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__).parse_args(argv)
    rounds = rounds_for(args)
    thread_counts = sorted({1, torch.get_num_threads()})
    columns = [(m, d, n) for m in ("fwd+bwd", "eval") for d in DTYPES for n in thread_counts]
    header = " | ".join(
        f"{m} {str(d).removeprefix('torch.')} {n}t own / bnlab" for m, d, n in columns
    )
    lines = [
        "Module level; torch time / contender time (✗ below 1.00); own: every call on "
        f"bnlab's kernels, bnlab: as shipped (calls up to small_calls.MAX_BYTES = "
        f"{small_calls.MAX_BYTES >> 10} KiB of input on torch's kernel).",
        "",
        f"| shape | elements | {header} |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    before = torch.get_num_threads()
    for shape in SHAPES:
        cells = []
        for mode, dtype, n in columns:
            torch.set_num_threads(n)
            t = measure(shape, dtype, mode, rounds)
            own, ours = t["torch"] / t["own"], t["torch"] / t["bnlab"]
            cells.append(f"{own:.2f}{'✗' if own < 1 else ''} / {ours:.2f}{'✗' if ours < 1 else ''}")
        torch.set_num_threads(before)
        numel = torch.Size(shape).numel()
        lines.append(f"| {'×'.join(map(str, shape))} | {numel} | {' | '.join(cells)} |")
        print(f"  measured {shape}", file=sys.stderr)
    publish(
        "\n".join(lines) + "\n",
        RESULTS_MD,
        "Small calls: where bnlab's kernels overtake torch's (bench_small_calls.py)",
        args.record,
    )


if __name__ == "__main__":
    main()
