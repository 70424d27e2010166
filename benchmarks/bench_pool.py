"""bnlab's fused ReLU + 2x2 max-pool vs torch's two ops, side by side in one process.

    python benchmarks/bench_pool.py             # print the table
    python benchmarks/bench_pool.py --record    # ... and append it to benchmarks/RESULTS.md

float32, LeNet-5's two pooled shapes and a small deeper one, NCHW and
channels_last: ``F.max_pool2d(F.relu(x), 2)`` against
``bnlab.speedups.relu_maxpool.relu_maxpool2d(x)`` (bit-identical results), the
forward alone and forward + backward through autograd. Medians of
interleaved rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bnlab.speedups.relu_maxpool import relu_maxpool2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import arguments, interleaved, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SHAPES = [(64, 6, 28, 28), (64, 16, 10, 10), (64, 32, 8, 8)]
LAYOUTS = {"NCHW": torch.contiguous_format, "CL": torch.channels_last}


def torch_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(F.relu(x), 2)


def measure(shape: tuple[int, ...], fmt: torch.memory_format, rounds: int) -> dict[str, float]:
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    n, c, h, w = shape
    dy = torch.randn(n, c, h // 2, w // 2).contiguous(memory_format=fmt)

    def forward(fn):
        return lambda: fn(x.detach())

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(x), x, dy)

    return interleaved(
        {
            "torch fwd": forward(torch_pool),
            "bnlab fwd": forward(relu_maxpool2d),
            "torch fwd+bwd": forward_backward(torch_pool),
            "bnlab fwd+bwd": forward_backward(relu_maxpool2d),
        },
        rounds=rounds,
    )


def table(rows: list[tuple[str, str, dict[str, float]]]) -> str:
    lines = [
        "| shape | layout | pass | torch µs | bnlab µs | speedup |",
        "|---|---|---|---:|---:|---:|",
    ]
    for shape, layout, t in rows:
        for part in ("fwd", "fwd+bwd"):
            theirs, ours = t[f"torch {part}"], t[f"bnlab {part}"]
            lines.append(
                f"| {shape} | {layout} | {part} | {theirs * 1e6:.0f} | {ours * 1e6:.0f} | "
                f"{theirs / ours:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    args = parser.parse_args(argv)
    rounds = rounds_for(args)
    rows = []
    for shape in SHAPES:
        for layout, fmt in LAYOUTS.items():
            rows.append(("×".join(map(str, shape)), layout, measure(shape, fmt, rounds)))
    text = f"{torch.get_num_threads()} thread(s), float32.\n\n" + table(rows)
    publish(text, RESULTS_MD, "CPU ReLU + max-pool: bnlab vs torch (bench_pool.py)", args.record)


if __name__ == "__main__":
    main()
