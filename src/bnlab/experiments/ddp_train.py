"""One LeNet-5 trained data-parallel: every rank of the process group takes a shard of each batch.

The global batch is the one-process batch (`cfg.batch_size`, in the order of
`DeviceLoader`): every rank walks the same order and keeps its slice of each
batch (`shard`), so N ranks see exactly the images one process would. With B
images in a batch and n_r on rank r, rank r backpropagates

    loss_r = N/B · Σ_{i in shard r} CE_i        (= N·n_r/B · mean_r)

and DDP averages the gradients over the N ranks: (1/N)·Σ_r ∇loss_r =
∇(1/B · Σ_i CE_i), the gradient of the batch's mean loss, also when N does
not divide B, and also for a rank whose shard is empty. What differs from one process is only what the
norm layers see: "bn" normalizes each rank's n_r images by their own
statistics, "syncbn" by those of all B (bnlab.nn.SyncBatchNorm).

Rank 0 evaluates (the test set, with the running statistics DDP broadcasts
from it) while its peers wait in the next step's collectives. Norms that the
loop freezes mid-run are refused: freezing changes the parameters DDP holds.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bnlab.data import CIFAR10, DeviceLoader
from bnlab.experiments.config import Config
from bnlab.experiments.outdir import ExperimentError
from bnlab.experiments.train import (
    EpochResult,
    MakeBar,
    amp_context,
    build_model,
    build_optimizer,
    evaluate,
    make_test_loader,
    memory_formats,
    terminal_bar,
)
from bnlab.models.lenet import FREEZE_AFTER_EPOCHS


def shard(batch: int, world: int, rank: int) -> slice:
    """Rank `rank`'s slice of a batch of `batch` images: contiguous, sizes differing by at most 1."""
    base, extra = divmod(batch, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def check_norm(norm: str) -> None:
    """Refuse (ExperimentError) a norm this loop cannot train."""
    if norm in FREEZE_AFTER_EPOCHS:
        raise ExperimentError(
            f"norm {norm!r} freezes its layers during training, which data-parallel "
            "training does not support; train it in one process"
        )


# Norms whose training needs no batch statistics of a rank's own shard.
_SHARD_FREE = ("none", "gn", "syncbn")


def check_shards(loader: DeviceLoader, world: int, norm: str) -> None:
    """Refuse (ExperimentError) batches that leave a rank with too few images.

    bnlab's native CPU kernels take no empty batch, and a norm with per-rank
    statistics cannot train on one image; only the last, partial batch (or
    more ranks than half a batch) can come to that.
    """
    used = len(loader.images) - loader.dropped
    sizes = {min(loader.batch_size, used), used % loader.batch_size or loader.batch_size}
    fewest = min(size // world for size in sizes)
    need = 1 if norm in _SHARD_FREE else 2
    if fewest < need:
        raise ExperimentError(
            f"{world} processes would give a rank {fewest} of the images of a batch "
            f"(batches of {sorted(sizes, reverse=True)} images, norm {norm!r}), and it "
            f"needs {need}: change --limit-train or the number of processes"
        )


def ddp_epochs(
    cfg: Config,
    norm: str,
    seed: int,
    data: CIFAR10,
    device: torch.device,
    *,
    checkpoint: dict[str, Any] | None = None,
    make_bar: MakeBar = terminal_bar,
) -> Iterator[tuple[EpochResult, dict[str, Any]]]:
    """As `train.train_run`, in the default process group: yield (result, state) per epoch.

    Every rank yields; the results' test accuracy is rank 0's (NaN elsewhere).
    The state adds `world_size` and `step_losses` (per epoch, the global
    batch's mean loss at every step) to a one-process checkpoint.
    """
    check_norm(norm)
    amp_context(cfg, device)  # refuses a setting it cannot run before anything is built
    precision = functools.partial(amp_context, cfg, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    model_fmt, data_fmt = memory_formats(cfg, norm, device)
    n_train = len(data.train_images) if cfg.limit_train is None else cfg.limit_train
    train_loader = DeviceLoader(
        data.train_images[:n_train],
        data.train_labels[:n_train],
        batch_size=cfg.batch_size,
        seed=seed,
        device=device,
        memory_format=data_fmt,
    )
    test_loader = make_test_loader(data, cfg, device, data_fmt)
    check_shards(train_loader, world, norm)
    model = build_model(norm, seed, device, model_fmt, renorm_warmup=len(train_loader))
    history: list[dict[str, float]] = []
    step_losses: list[list[float]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        history = list(checkpoint["history"])[: checkpoint["epochs_done"]]
        step_losses = list(checkpoint["step_losses"])[: checkpoint["epochs_done"]]
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg.lr)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])

    for epoch in range(len(history), cfg.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        ddp.train()
        sums, sizes = [], []  # per step: this rank's summed loss, the global batch's size
        bar = make_bar(len(train_loader), f"{norm} seed {seed} epoch {epoch + 1}/{cfg.epochs}")
        try:
            for x, y in train_loader:
                part = shard(len(y), world, rank)
                with precision():
                    logits = ddp(x[part])
                loss_sum = F.cross_entropy(logits.float(), y[part], reduction="sum")
                optimizer.zero_grad(set_to_none=True)
                (loss_sum * (world / len(y))).backward()
                optimizer.step()
                sums.append(loss_sum.detach())
                sizes.append(len(y))
                bar.update(1)
        finally:
            bar.close()
        # One collective per epoch for the loss curve, rather than one per step.
        totals = torch.stack(sums)
        dist.all_reduce(totals)
        steps = (totals.cpu().double() / torch.tensor(sizes, dtype=torch.float64)).tolist()
        train_loss = totals.sum().item() / sum(sizes)
        t1 = time.perf_counter()
        test_acc = evaluate(model, test_loader, precision) if rank == 0 else float("nan")
        t2 = time.perf_counter()
        result = EpochResult(epoch + 1, train_loss, test_acc, t1 - t0, t2 - t1, t2 - t0)
        history.append(dataclasses.asdict(result))
        step_losses.append(steps)
        state = {
            "norm": norm,
            "seed": seed,
            "epochs_done": epoch + 1,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": None,
            "loader_epoch": epoch + 1,
            "history": list(history),
            "world_size": world,
            "step_losses": list(step_losses),
        }
        yield result, state
