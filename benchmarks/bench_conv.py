"""bnlab's direct CPU convolution vs torch's, part by part, side by side in one process.

    python benchmarks/bench_conv.py             # print the table
    python benchmarks/bench_conv.py --record    # ... and append it to benchmarks/RESULTS.md
    python benchmarks/bench_conv.py --quick     # fewer rounds, for a smoke test

float32, batch 64, LeNet-5's two convolutions in the layouts the experiment
trains them in (NCHW images into a channels_last model), plus conv1 all-NCHW,
and two padded 3x3 layers on larger images (batch 8).
Each part of a layer is timed on its own, both sides called the way
autograd calls them:

* forward  — ``F.conv2d`` vs bnlab's forward kernel
* dx       — ``aten.convolution_backward`` (input gradient only) vs bnlab's
* dw, db   — ``aten.convolution_backward`` (weight and bias) vs bnlab's

``bnlab.speedups.conv2d`` runs a part natively only where it is faster (see
the "used" column); the others stay torch's. Times are medians of
interleaved rounds; GFLOP/s counts 2 * N * O * Ho * Wo * C * KH * KW per part.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bnlab.speedups import _ext
from bnlab.speedups.conv2d import native_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import arguments, interleaved, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
CL, NCHW = torch.channels_last, torch.contiguous_format


@dataclass(frozen=True)
class Layer:
    name: str
    c: int
    o: int
    hw: int  # input height = width
    x_fmt: torch.memory_format
    w_fmt: torch.memory_format
    k: int = 5
    n: int = 64
    pad: int = 0

    @property
    def out_fmt(self) -> torch.memory_format:  # torch's rule: channels_last if x or w is
        return CL if CL in (self.x_fmt, self.w_fmt) else NCHW

    @property
    def out_hw(self) -> int:
        return self.hw + 2 * self.pad - self.k + 1

    @property
    def gflop(self) -> float:
        ho = self.out_hw
        return 2 * self.n * self.o * ho * ho * self.c * self.k * self.k / 1e9


LAYERS = [
    Layer("conv1 (x NCHW, model CL)", 3, 6, 32, NCHW, CL),
    Layer("conv1 (all NCHW)", 3, 6, 32, NCHW, NCHW),
    Layer("conv2 (all CL)", 6, 16, 14, CL, CL),
    Layer("3->8 k3 pad 1, 224x224, batch 8", 3, 8, 224, NCHW, NCHW, k=3, n=8, pad=1),
    Layer("8->8 k3 pad 1, 112x112 CL, batch 8", 8, 8, 112, CL, CL, k=3, n=8, pad=1),
]


def measure(layer: Layer, rounds: int) -> dict[str, tuple[float, float]]:
    """part -> (torch seconds, bnlab seconds)."""
    k, n, c, o, hw, pad = layer.k, layer.n, layer.c, layer.o, layer.hw, layer.pad
    x = torch.randn(n, c, hw, hw).contiguous(memory_format=layer.x_fmt)
    w = torch.randn(o, c, k, k).contiguous(memory_format=layer.w_fmt)
    wc = w.contiguous()
    b = torch.randn(o)
    y = F.conv2d(x, w, b, padding=pad)
    dy = torch.randn_like(y)
    dx = torch.empty(x.shape, memory_format=layer.out_fmt)
    dw, db = torch.empty(o, c, k, k), torch.empty(o)
    flipped = w.flip(2, 3).transpose(0, 1).contiguous()

    def torch_grads(mask):
        sizes = [o] if mask[2] else None
        args = ([1, 1], [pad, pad], [1, 1], False, [0, 0], 1, mask)
        return lambda: torch.ops.aten.convolution_backward(dy, x, w, sizes, *args)

    parts = {
        "forward": (
            lambda: F.conv2d(x, w, b, padding=pad),
            lambda: _ext.conv2d_forward(x, wc, b, y, (pad, pad)),
        ),
        "dx": (
            torch_grads([True, False, False]),
            lambda: _ext.conv2d_forward(dy, flipped, None, dx, (k - 1 - pad, k - 1 - pad)),
        ),
        "dw, db": (
            torch_grads([False, True, True]),
            lambda: _ext.conv2d_grad_weight(x, dy, dw, db, (pad, pad)),
        ),
    }
    result = {}
    for part, (theirs, ours) in parts.items():
        t = interleaved({"torch": theirs, "bnlab": ours}, rounds=rounds)
        result[part] = (t["torch"], t["bnlab"])
    return result


def used(layer: Layer, part: str) -> str:
    x = torch.empty(1, layer.c, 2, 2).contiguous(memory_format=layer.x_fmt)
    w = torch.empty(layer.o, layer.c, 2, 2).contiguous(memory_format=layer.w_fmt)
    native = dict(zip(("forward", "dx", "dw, db"), native_parts(x, w), strict=True))
    return "bnlab" if native[part] else "torch"


def table(rows: list[tuple[Layer, dict]]) -> str:
    lines = [
        "| layer | part | torch µs | bnlab µs | speedup | torch GFLOP/s | bnlab GFLOP/s | used |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for layer, parts in rows:
        for part, (theirs, ours) in parts.items():
            lines.append(
                f"| {layer.name} | {part} | {theirs * 1e6:.0f} | {ours * 1e6:.0f} | "
                f"{theirs / ours:.2f}× | {layer.gflop / theirs:.1f} | {layer.gflop / ours:.1f} | "
                f"{used(layer, part)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    args = parser.parse_args(argv)
    if not _ext.available():
        parser.error("the native CPU kernels are unavailable (see the warning above)")
    rounds = rounds_for(args)
    rows = []
    for layer in LAYERS:
        rows.append((layer, measure(layer, rounds)))
        print(f"  measured {layer.name}", file=sys.stderr)
    text = f"{torch.get_num_threads()} thread(s), float32.\n\n" + table(rows)
    publish(text, RESULTS_MD, "CPU convolution: bnlab vs torch (bench_conv.py)", args.record)


if __name__ == "__main__":
    main()
