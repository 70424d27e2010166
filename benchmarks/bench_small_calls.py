"""Small calls: bnlab's C++ autograd node against its Python function and torch.nn.

    python benchmarks/bench_small_calls.py            # print the table
    python benchmarks/bench_small_calls.py --record   # ... and keep it in benchmarks/RESULTS.md

bnlab's autograd function is Python, where torch.nn's batch norm has its
autograd node in C++, and every call through it checks its tensors in
Python; plain eager calls of every size (training ones up to
``small_calls.MAX_BYTES``, which sets no limit unless changed) therefore run
the same kernels behind a C++ node (``bnlab.small_calls``). For each input size and
for a training step ("fwd+bwd") and inference ("eval", under no_grad),
three contenders are timed in interleaved rounds, module level:

* torch     — ``torch.nn.BatchNormXd``;
* function  — ``bnlab.nn.BatchNormXd`` with every call on the Python
  function and backend (``small_calls.ENABLED = False``);
* bnlab     — ``bnlab.nn.BatchNormXd`` as shipped: every call behind the
  node (training ones up to ``MAX_BYTES``).

"bnlab" should be at or above 1.0 everywhere; "function" shows what the
node saves, and where that stops mattering. A ratio is the median of the
rounds' torch/contender ratios; bnlab's cells below 1.0 are listed with the
95% confidence interval of that median, which says whether they are slower
beyond the noise of their rounds. glibc's mmap threshold is settled first,
as in bench_bn.py, so that outputs do not land on fresh pages in one round
and on reused ones in the next.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

import bnlab.nn
from bnlab import small_calls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (
    arguments,
    below_one_summary,
    cpu_model,
    inference,
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

# (N, C) of LeNet-5's widths and NCHW with 16 channels, from 1K to 512K elements
# ((64, 6, 28, 28), LeNet-5's conv1, and the last above 1 MiB in float32).
SHAPES = [(64, 16), (64, 84), (64, 120), (128, 120), (64, 6, 8, 8), (256, 120), (64, 16, 5, 5),
          (64, 16, 8, 8), (512, 120), (64, 16, 10, 10), (256, 512), (64, 16, 16, 16),
          (32, 4096), (64, 6, 28, 28), (1024, 256), (64, 16, 16, 32)]  # fmt: skip
DTYPES = (torch.float32, torch.bfloat16)


def _node_share() -> str:
    """Which calls run behind the C++ node, in words."""
    if small_calls.MAX_BYTES >= (1 << 62):
        return "every call behind the C++ node"
    return (
        f"training calls up to small_calls.MAX_BYTES = {small_calls.MAX_BYTES >> 10} KiB of "
        "input, and inference of every size, behind the C++ node"
    )


def measure(
    shape: tuple[int, ...], dtype: torch.dtype, mode: str, rounds: int
) -> dict[str, list[float]]:
    """Seconds per call of each contender, round by round."""
    cls = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    contenders = {
        "torch": getattr(torch.nn, cls)(shape[1]),
        "function": getattr(bnlab.nn, cls)(shape[1]),
        "bnlab": getattr(bnlab.nn, cls)(shape[1]),
    }
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)

    def on_function(run):  # the switch costs two attribute writes, not a module layer
        def switched():
            small_calls.ENABLED = False
            try:
                run()
            finally:
                small_calls.ENABLED = True

        return switched

    for m in contenders.values():
        m.train(mode == "fwd+bwd")
    if mode == "fwd+bwd":
        fns = {k: training_step(m, x, dy) for k, m in contenders.items()}
    else:
        fns = {k: inference(m, x) for k, m in contenders.items()}
    fns["function"] = on_function(fns["function"])
    return interleaved_samples(fns, rounds=rounds)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__).parse_args(argv)
    settle_mmap_threshold()
    rounds = rounds_for(args)
    thread_counts = sorted({1, torch.get_num_threads()})
    columns = [(m, d, n) for m in ("fwd+bwd", "eval") for d in DTYPES for n in thread_counts]
    header = " | ".join(
        f"{m} {str(d).removeprefix('torch.')} {n}t function / bnlab" for m, d, n in columns
    )
    lines = [
        "Module level; torch time / contender time (✗ below 1.00); function: every call on "
        f"bnlab's Python autograd function, bnlab: as shipped ({_node_share()}).",
        "",
        f"| shape | elements | {header} |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    before = torch.get_num_threads()
    below, beyond, count = [], 0, 0
    for shape in SHAPES:
        cells = []
        for mode, dtype, n in columns:
            torch.set_num_threads(n)
            t = measure(shape, dtype, mode, rounds)
            fn = statistics.median(round_ratios(t, "torch", "function"))
            ratios = round_ratios(t, "torch", "bnlab")
            ours = statistics.median(ratios)
            cells.append(f"{fn:.2f}{'✗' if fn < 1 else ''} / {ours:.2f}{'✗' if ours < 1 else ''}")
            count += 1
            if ours < 1:
                beyond += slower_beyond_noise(ratios)
                where = f"{'×'.join(map(str, shape))} {mode} {str(dtype).removeprefix('torch.')}"
                below.append(f"- {where} {n}t: {ratio_with_interval(ratios)}")
        torch.set_num_threads(before)
        numel = torch.Size(shape).numel()
        lines.append(f"| {'×'.join(map(str, shape))} | {numel} | {' | '.join(cells)} |")
        print(f"  measured {shape}", file=sys.stderr)
    lines += ["", "bnlab: " + below_one_summary(count, len(below), beyond)]
    if below:
        lines += ["", "bnlab below 1.0× (95% interval; †: wholly under 1.0):", "", *below]
    publish(
        "\n".join(lines) + "\n",
        RESULTS_MD,
        f"Small calls on {cpu_model()}: the C++ node, the Python function and torch "
        "(bench_small_calls.py)",
        args.record,
    )


if __name__ == "__main__":
    main()
