"""bnlab layers inside DistributedDataParallel (gloo, two processes on this machine).

Running statistics are ordinary buffers, so DDP broadcasts rank 0's at every
forward and all-reduces the parameter gradients, exactly as with torch.nn.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnlab.nn

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = nn.Sequential(nn.Linear(4, 3), bnlab.nn.BatchNorm1d(3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(2):
        opt.zero_grad()
        ddp(torch.randn(8, 4) + rank).square().sum().backward()
        opt.step()
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker threads can abort the interpreter's shutdown ("terminate called
    # without an active exception"); everything is saved, so leave without it.
    os._exit(0)


def test_ddp_keeps_ranks_in_sync(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # Parameters: all-reduced gradients keep the ranks identical.
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-6, rtol=1e-6)
    # Buffers: rank 1's statistics were overwritten by rank 0's at the second
    # forward, then updated once with rank 1's own batch, so they differ from
    # rank 0's, and the counters agree.
    assert (
        states[0]["1.num_batches_tracked"].item() == states[1]["1.num_batches_tracked"].item() == 2
    )
    assert not torch.allclose(states[0]["1.running_mean"], states[1]["1.running_mean"])
