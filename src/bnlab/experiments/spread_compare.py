"""`bnlab compare` under torchrun: its runs spread over the ranks, their epochs gathered on rank 0.

Every rank trains its share of the runs left (`share`: every world-th one),
one after another, each run as one process trains it (`train_run`, the
numbers of `bnlab compare --threads T` with T the rank's threads). After each
epoch a rank other than 0 sends rank 0 the epoch and its checkpoint state,
point to point; rank 0 writes them, as it writes the epochs of its own runs:
it alone writes into --out. A run that raises on another rank is reported
by rank 0 (`RunFailed`, with the traceback), and the rank that raised stops
training.

Rank 0 receives in a thread of its own, so the epochs of other ranks wait
only until rank 0 finishes its current epoch. A message is a header of two
int64 (the run's index, the payload's size) and the payload (torch.save
bytes); messages come from any rank in any order, and a rank sends DONE
when its share is trained.
"""

from __future__ import annotations

import dataclasses
import io
import queue
import threading
import traceback
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from tqdm import tqdm

from bnlab.data import CIFAR10
from bnlab.experiments.config import Config
from bnlab.experiments.results import save_checkpoint
from bnlab.experiments.runner import EpochDone, Plan, RunFailed, Task, run_one, state_from_bytes
from bnlab.experiments.train import Bar, EpochResult, terminal_bar, train_run

_HEADER_TAG, _PAYLOAD_TAG = 1, 2
_DONE, _FAILED = -1, -2  # in place of a run's index in the header

T = TypeVar("T")


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank `rank`'s runs of `items`: every `world`-th one, from the `rank`-th."""
    return list(items[rank::world])


def lead(cfg: Config, tasks: list[Task], data: CIFAR10, how: Plan) -> Iterator[EpochDone]:
    """Rank 0: train its share, and save and yield the epochs every rank trains."""
    world = dist.get_world_size()
    inbox: queue.Queue[tuple[int, bytes] | BaseException | None] = queue.Queue()
    threading.Thread(
        target=_receive, args=(world - 1, inbox), name="bnlab-epochs-in", daemon=True
    ).start()
    by_index = {task.index: task for task in tasks}
    torch.set_num_threads(how.threads)
    for task in share(tasks, 0, world):
        for done in run_one(cfg, task, data, terminal_bar):
            yield done
            yield from _received(inbox, by_index, wait=False)
    yield from _received(inbox, by_index, wait=True)
    dist.barrier()  # the peers leave only once everything they sent is in


def _received(inbox: queue.Queue, by_index: dict[int, Task], *, wait: bool) -> Iterator[EpochDone]:
    """The epochs received so far (`wait`: until every other rank is done), saved."""
    while True:
        try:
            message = inbox.get(block=wait)
        except queue.Empty:
            return
        if message is None:  # every peer is done; it stays for the final wait
            inbox.put(None)
            return
        if isinstance(message, BaseException):
            raise message
        index, raw = message
        if index == _FAILED:
            raise RunFailed(raw.decode())
        sent = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        save_checkpoint(by_index[index].checkpoint, sent["state"])
        yield EpochDone(index, EpochResult(**sent["result"]), sent["state"]["history"])


def _receive(senders: int, inbox: queue.Queue) -> None:
    try:
        while senders:
            header = torch.zeros(2, dtype=torch.int64)
            src = dist.recv(header, tag=_HEADER_TAG)
            index, size = header.tolist()
            if index == _DONE:
                senders -= 1
                continue
            payload = torch.empty(size, dtype=torch.uint8)
            dist.recv(payload, src=src, tag=_PAYLOAD_TAG)
            inbox.put((index, payload.numpy().tobytes()))
        inbox.put(None)
    except BaseException as e:  # a peer lost mid-run: rank 0's main thread raises it
        inbox.put(e)


def _send(index: int, raw: bytes = b"") -> None:
    dist.send(torch.tensor([index, len(raw)], dtype=torch.int64), dst=0, tag=_HEADER_TAG)
    if index != _DONE:
        payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        dist.send(payload, dst=0, tag=_PAYLOAD_TAG)


def _quiet(total: int, desc: str) -> Bar:
    return tqdm(total=total, disable=True)


def follow(cfg: Config, order: list[tuple[int, str, int, bytes | None]], data: CIFAR10) -> None:
    """A rank but 0: train its share of `order` (index, norm, seed, checkpoint), sending each
    epoch to rank 0; a failure is sent too, for rank 0 to report."""
    try:
        for index, norm, seed, raw in share(order, dist.get_rank(), dist.get_world_size()):
            state = state_from_bytes(raw)
            for result, new in train_run(cfg, norm, seed, data, checkpoint=state, make_bar=_quiet):
                buffer = io.BytesIO()
                torch.save({"result": dataclasses.asdict(result), "state": new}, buffer)
                _send(index, buffer.getvalue())
    except Exception:
        _send(_FAILED, f"run on rank {dist.get_rank()}:\n{traceback.format_exc()}".encode())
    finally:
        _send(_DONE)
    dist.barrier()
