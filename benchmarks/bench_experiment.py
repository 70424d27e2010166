"""The BN experiment two ways, on the same machine in one run: the original script's pipeline vs bnlab's.

    python benchmarks/bench_experiment.py                       # 2 epochs, 1 seed, all data
    python benchmarks/bench_experiment.py --epochs 1 --limit-train 5000 --no-record

Reference ("script"): what the classic LeNet-5 + BN script does. A Dataset that
turns one image at a time into a tensor and normalizes it (PIL image, then
ToTensor + Normalize, as torchvision's CIFAR10 with that transform does), a
DataLoader with 2 worker processes, batch 64, shuffled; torch.nn's BatchNorm;
Adam; `loss.item()` every 100 batches and per test batch, as the script prints.

bnlab: `bnlab.experiments.run_compare`, the code behind `bnlab compare`, with
its default settings (on a multi-core CPU it trains runs side by side, in
worker processes).

Both train the same LeNet-5 (the script's BN model uses torch.nn's BatchNorm,
bnlab's uses bnlab's) with the same seeds. The headline is the whole
comparison's wall time divided by the epochs it trains (runs x epochs), for
the script run after run, for bnlab as `bnlab compare` runs it (worker start-up,
reports and plots included; data loading excluded from both), and their ratio.
Per norm it also prints each run's median seconds per epoch (training + test
pass) and the final accuracies. Appends a dated section to
benchmarks/RESULTS.md (replacing the previous one, atomically) unless --no-record.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bnlab.data import CIFAR10, load_cifar10
from bnlab.experiments import Config, run_compare
from bnlab.experiments.environment import cpu_name, device_name
from bnlab.experiments.train import resolve_device
from bnlab.models import LeNet5

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import replace_section

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
# bnlab's norm -> the norm the script's model uses for it
SCRIPT_NORM = {"bn": "torch-bn", "torch-bn": "torch-bn", "none": "none"}


class PerImageCIFAR(Dataset):
    """torchvision's CIFAR10 with ToTensor + Normalize((0.5,)*3, (0.5,)*3), one image per call."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.data = images.permute(
            0, 2, 3, 1
        ).numpy()  # (N, 32, 32, 3) uint8, as torchvision keeps it
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[i])  # torchvision hands the transform a PIL image
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()  # ToTensor
        x = x.to(torch.float32).div(255)
        x = x.sub_(0.5).div_(0.5)  # Normalize
        return x, self.targets[i]


def script_run(
    norm: str, seed: int, data: CIFAR10, args: argparse.Namespace, device: torch.device
) -> list[dict]:
    """The script's training and test loops, timed per epoch."""
    n = args.limit_train or len(data.train_images)
    train_set = PerImageCIFAR(data.train_images[:n], data.train_labels[:n])
    test_set = PerImageCIFAR(data.test_images, data.test_labels)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        train_set, batch_size=64, shuffle=True, num_workers=2, generator=generator
    )
    test_loader = DataLoader(test_set, batch_size=64, shuffle=False, num_workers=2)
    torch.manual_seed(seed)
    model = LeNet5(norm).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    epochs = []
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        for i, (inputs, labels) in enumerate(train_loader):
            inputs, labels = inputs.to(device), labels.to(device)
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % 100 == 0:
                loss.item()  # the script prints it
        t1 = time.perf_counter()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in test_loader:
                images, labels = images.to(device), labels.to(device)
                _, predicted = torch.max(model(images).data, 1)
                total += labels.size(0)
                correct += (predicted == labels).sum().item()
        t2 = time.perf_counter()
        epochs.append(
            {
                "epoch": epoch,
                "test_acc": 100 * correct / total,
                "seconds": t2 - t0,
                "train_seconds": t1 - t0,
            }
        )
        print(
            f"  script {norm:>8} seed {seed} epoch {epoch}: {t2 - t0:.1f} s, test acc {100 * correct / total:.2f}%"
        )
    return epochs


def _epoch_lines_only(line: str) -> None:
    if "train loss" in line:
        print("  " + line)


def summarize(runs: dict[str, list[list[dict]]]) -> dict[str, dict[str, float]]:
    """Per norm: median seconds per epoch (all epochs of all seeds) and mean final accuracy."""
    return {
        norm: {
            "epoch_s": statistics.median(e["seconds"] for run in seeds for e in run),
            "train_s": statistics.median(e["train_seconds"] for run in seeds for e in run),
            "acc": statistics.fmean(run[-1]["test_acc"] for run in seeds),
        }
        for norm, seeds in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..K-1")
    parser.add_argument("--norms", nargs="+", default=["bn", "none"], choices=list(SCRIPT_NORM))
    parser.add_argument("--limit-train", type=int, default=None, metavar="N")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-record", action="store_true", help="do not record in RESULTS.md")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_cifar10(args.data_dir)
    seeds = range(args.seeds)
    print(
        f"{device} ({device_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    print("script pipeline (per-image Dataset, DataLoader with 2 workers):")
    start = time.perf_counter()
    script = {
        norm: [script_run(SCRIPT_NORM[norm], s, data, args, device) for s in seeds]
        for norm in args.norms
    }
    script_wall = time.perf_counter() - start

    print("bnlab compare:")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config(
            norms=tuple(args.norms),
            seeds=tuple(seeds),
            epochs=args.epochs,
            limit_train=args.limit_train,
            device=args.device,
            out=str(Path(tmp) / "run"),
        )
        start = time.perf_counter()
        results = run_compare(cfg, data=data, log=_epoch_lines_only)
        bnlab_wall = time.perf_counter() - start
    env = results["environment"]
    ours = {
        norm: [r["epochs"] for r in results["runs"] if r["norm"] == norm] for norm in args.norms
    }

    a, b = summarize(script), summarize(ours)
    header = "| norm (script -> bnlab) | script s/epoch per run | bnlab s/epoch per run | per-run ratio | script train s | bnlab train s | script acc % | bnlab acc % |"
    rows = [header, "|" + "---|" * 8]
    for norm in args.norms:
        rows.append(
            f"| {SCRIPT_NORM[norm]} -> {norm} | {a[norm]['epoch_s']:.2f} | {b[norm]['epoch_s']:.2f} "
            f"| {a[norm]['epoch_s'] / b[norm]['epoch_s']:.1f}x | {a[norm]['train_s']:.2f} | {b[norm]['train_s']:.2f} "
            f"| {a[norm]['acc']:.2f} | {b[norm]['acc']:.2f} |"
        )
    epochs_trained = len(args.norms) * args.seeds * args.epochs
    whole = (
        f"Whole comparison ({epochs_trained} epochs): script {script_wall:.1f} s, "
        f"bnlab {bnlab_wall:.1f} s ({env['jobs']} run(s) at once, {env['threads']} thread(s) each); "
        f"per epoch trained {script_wall / epochs_trained:.2f} s vs "
        f"{bnlab_wall / epochs_trained:.2f} s: **{script_wall / bnlab_wall:.2f}x**"
    )
    table = "\n".join(rows)
    print("\n" + whole + "\n\n" + table)

    if args.no_record:
        return
    command = shlex.join(["python", "benchmarks/bench_experiment.py", *sys.argv[1:]])
    n_train = args.limit_train or len(data.train_images)
    section = f"""
## Experiment: script pipeline vs bnlab compare — {datetime.date.today().isoformat()}

- machine: {cpu_name()}, {os.cpu_count()} cores; device {device} ({device_name(device)}), {torch.get_num_threads()} torch threads
- torch {torch.__version__}, Python {sys.version.split()[0]}
- command: `{command}`
- {args.epochs} epochs x {args.seeds} seed(s), {n_train} training images, batch 64, Adam lr 0.01
- per norm: each run's median seconds per epoch (training + test pass), speed-up = script / bnlab

{whole}

{table}
"""
    replace_section(RESULTS_MD, "Experiment: script pipeline vs bnlab compare", section)
    print(f"\nrecorded in {RESULTS_MD}")


if __name__ == "__main__":
    main()
