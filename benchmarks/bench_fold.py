"""CPU inference with batch norms folded into the layers feeding them, side by side in one process.

    python benchmarks/bench_fold.py            # print the table
    python benchmarks/bench_fold.py --record   # ... and put it in benchmarks/RESULTS.md
    python benchmarks/bench_fold.py --quick    # fewer rounds, for a smoke test

Float32, eval mode under ``torch.no_grad()``. For each model, built with
torch.nn's batch norms and with bnlab's, the contenders are:

* eval      — the model as it is (torch's or bnlab's batch norm layers)
* fold      — ``bnlab.fold(model)``: each batch norm absorbed into its conv/linear
* fx fuse   — ``torch.fx.experimental.optimization.fuse`` (torch's layers only)

Times are medians of interleaved rounds; the speed-up is eval / fold.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import bnlab
import bnlab.nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import arguments, interleaved, publish, rounds_for

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

Norms = tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]  # (2d, 1d)
LIBRARIES: dict[str, Norms] = {
    "torch": (nn.BatchNorm2d, nn.BatchNorm1d),
    "bnlab": (bnlab.nn.BatchNorm2d, bnlab.nn.BatchNorm1d),
}


def lenet(norms: Norms) -> nn.Module:
    """LeNet-5 with batch norm after each conv and hidden linear layer (CIFAR-10 input)."""
    bn2d, bn1d = norms
    return nn.Sequential(
        nn.Conv2d(3, 6, 5), bn2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), bn2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), bn1d(120), nn.ReLU(),
        nn.Linear(120, 84), bn1d(84), nn.ReLU(),
        nn.Linear(84, 10),
    )  # fmt: skip


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn2d: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(norms: Norms) -> nn.Module:
    """A CIFAR ResNet-8: stem, three stages of one basic block (16, 32, 64 channels)."""
    bn2d, _ = norms
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), bn2d(16), nn.ReLU(),
        BasicBlock(16, 16, 1, bn2d), BasicBlock(16, 32, 2, bn2d), BasicBlock(32, 64, 2, bn2d),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


def separable(norms: Norms) -> nn.Module:
    """MobileNet-style depthwise-separable blocks: cheap convolutions, so batch norm weighs more."""
    bn2d, _ = norms

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), bn2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), bn2d(cout), nn.ReLU(),
        ]  # fmt: skip

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1, bias=False), bn2d(32), nn.ReLU(),
        *block(32, 64, 1), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )  # fmt: skip


def mlp(norms: Norms) -> nn.Module:
    """Three 1024-wide linear layers, each followed by BatchNorm1d."""
    _, bn1d = norms
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 32 * 32, 1024), bn1d(1024), nn.ReLU(),
        nn.Linear(1024, 1024), bn1d(1024), nn.ReLU(),
        nn.Linear(1024, 1024), bn1d(1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip


CASES = [
    ("LeNet-5", lenet, 64),
    ("LeNet-5", lenet, 512),
    ("ResNet-8", resnet, 64),
    ("depthwise-separable", separable, 64),
    ("MLP 3×1024", mlp, 256),
]


def _with_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters as after training (not the defaults)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def measure(build: Callable[[Norms], nn.Module], batch: int, rounds: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 32, 32)
    contenders = {}
    for library, norms in LIBRARIES.items():
        torch.manual_seed(0)
        model = _with_statistics(build(norms))
        folded = bnlab.fold(model)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
        contenders[f"{library} eval"] = model
        contenders[f"{library} fold"] = folded
        if library == "torch":
            contenders["torch fx fuse"] = fuse(model)

    def call(m: nn.Module) -> Callable[[], object]:
        def step() -> None:
            with torch.no_grad():
                m(x)

        return step

    return interleaved({k: call(m) for k, m in contenders.items()}, rounds=rounds, round_time=0.05)


def table(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    lines = [
        "| model | batch | torch eval µs | bnlab eval µs | fold µs | fx fuse µs "
        "| fold vs torch eval | fold vs bnlab eval |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, batch, t in rows:
        us = {k: v * 1e6 for k, v in t.items()}
        fold_us = us["bnlab fold"]
        lines.append(
            f"| {name} | {batch} | {us['torch eval']:.0f} | {us['bnlab eval']:.0f} | "
            f"{fold_us:.0f} | {us['torch fx fuse']:.0f} | "
            f"{us['torch eval'] / fold_us:.2f}× | {us['bnlab eval'] / fold_us:.2f}× |"
        )
    lines += [
        "",
        "fold µs: `bnlab.fold` of the bnlab model (the fold of the torch model is the same "
        "graph of torch convs and linears). fx fuse: torch's own pass, on the torch model.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = arguments(__doc__).parse_args(argv)
    rounds = rounds_for(args)
    rows = []
    for name, build, batch in CASES:
        rows.append((name, batch, measure(build, batch, rounds)))
        print(f"  measured {name} batch {batch}", file=sys.stderr)
    publish(
        table(rows), RESULTS_MD, "CPU inference with folded batch norm (bench_fold.py)", args.record
    )


if __name__ == "__main__":
    main()
