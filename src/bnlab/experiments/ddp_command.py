"""`bnlab train` and `bnlab compare` in the ranks of a torchrun job: rank 0 leads, the others follow.

Rank 0 runs the ordinary command (`run_compare`): it alone checks, creates
and locks --out, loads resumed checkpoints, and writes results, checkpoints
and plots. Its peers write nothing. They wait for rank 0's word before they
read any data: the runs to train, each with the checkpoint to continue from,
or nothing, when rank 0 refused the folder or the settings (rank 0 then
says why). Then `train` trains its one run data-parallel on every rank
(ddp_train.py), and `compare` spreads its runs over the ranks
(spread_compare.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from bnlab.data import CIFAR10, load_cifar10
from bnlab.experiments import ddp_train, spread_compare
from bnlab.experiments.compare import run_compare
from bnlab.experiments.config import Config
from bnlab.experiments.distributed import device_of_rank, launched, rank_group
from bnlab.experiments.lock import FolderLock
from bnlab.experiments.outdir import ExperimentError
from bnlab.experiments.results import save_checkpoint
from bnlab.experiments.runner import EpochDone, Plan, Task, plan, state_from_bytes, state_to_bytes
from bnlab.experiments.train import Bar, resolve_device

Order = list[tuple[int, str, int, bytes | None]]  # (index, norm, seed, checkpoint) per run left


def run_command(cfg: Config, *, command: str | None, kind: str) -> dict[str, Any] | None:
    """What `bnlab KIND` does: in one process `run_compare`; in a torchrun rank, its share.

    Returns the results on the process that writes them, None on the others.
    """
    if not launched():
        return run_compare(cfg, command=command, kind=kind)
    if kind == "train":
        for norm in cfg.norms:
            ddp_train.check_norm(norm)
    device = device_of_rank(resolve_device(cfg.device))
    with rank_group(device):
        if dist.get_rank() == 0:
            return _lead(cfg, command, kind, device)
        try:
            _follow(cfg, kind, device)
        except KeyboardInterrupt:
            # Rank 0 says what was saved and how to continue; once is enough.
            raise SystemExit(1) from None
        return None


def _tell(order: Order | None) -> Order | None:
    box = [order]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _lead(cfg: Config, command: str | None, kind: str, device: torch.device) -> dict[str, Any]:
    told = False

    def runner(
        cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan, _: torch.device, lock: FolderLock
    ) -> Iterator[EpochDone]:
        nonlocal told
        if kind == "train":
            _check_world(cfg, tasks)
        _tell([(t.index, t.norm, t.seed, state_to_bytes(t.state)) for t in tasks])
        told = True
        if kind == "train":
            return _train(cfg, tasks, data, how, device)
        return spread_compare.lead(cfg, tasks, data, how)

    try:
        return run_compare(cfg, command=command, kind=kind, runner=runner)
    finally:
        if not told:
            _tell(None)  # the peers stop; this rank raises why


def _check_world(cfg: Config, tasks: list[Task]) -> None:
    """A data-parallel run's numbers depend on the number of processes: a resume keeps it."""
    world = dist.get_world_size()
    for task in tasks:
        was = world if task.state is None else task.state.get("world_size", 1)
        if was != world:
            raise ExperimentError(
                f"--resume: the run in {cfg.out} was trained by {was} processes, not {world}; "
                f"resume it with {was}"
            )


def _train(
    cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan, device: torch.device
) -> Iterator[EpochDone]:
    torch.set_num_threads(how.threads)
    for task in tasks:
        for result, state in ddp_train.ddp_epochs(
            cfg, task.norm, task.seed, data, device, checkpoint=task.state
        ):
            save_checkpoint(task.checkpoint, state)
            yield EpochDone(task.index, result, state["history"])


def _quiet(total: int, desc: str) -> Bar:
    return tqdm(total=total, disable=True)


def _follow(cfg: Config, kind: str, device: torch.device) -> None:
    order = _tell(None)
    if order is None:
        return
    data = load_cifar10(cfg.data_dir, download=True if cfg.download else None)
    how = plan(cfg, len(cfg.norms) * len(cfg.seeds), device)
    torch.set_num_threads(how.threads)
    if kind != "train":
        spread_compare.follow(cfg, order, data)
        return
    for _, norm, seed, raw in order:
        for _ in ddp_train.ddp_epochs(
            cfg, norm, seed, data, device, checkpoint=state_from_bytes(raw), make_bar=_quiet
        ):
            pass
