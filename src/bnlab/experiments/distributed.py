"""bnlab under torchrun: starting the ranks, joining their process group, ending with the launcher.

`bnlab train --nproc N` replaces its own process by torch's elastic launcher
(`python -m torch.distributed.run --standalone`), which starts N ranks of the
same program: killing the command is killing the launcher, with no process
in between that could outlive it.

A rank must not outlive its launcher, however the launcher ends:
- SIGKILL: the kernel re-parents the rank, which a watcher thread sees as a
  new parent PID within WATCH_SECONDS and ends the rank at once;
- SIGTERM, SIGINT: the launcher forwards SIGTERM to its ranks; the rank's
  handler unwinds (rank 0 releases the output folder), but a rank blocked in
  a collective whose peer has gone cannot run Python handlers. The watcher
  learns of the signal through `signal.set_wakeup_fd`, which the C-level
  handler writes at once, and ends the rank hard after GRACE_SECONDS.
A peer that dies while the others wait in a collective is noticed by the
group's COLLECTIVE_TIMEOUT at the latest.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import NoReturn

import torch
import torch.distributed as dist

from bnlab.experiments.config import Config

# Long enough for rank 0 to evaluate and write an epoch's files while its peers wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)
WATCH_SECONDS = 0.2  # how often a rank looks for a new parent
GRACE_SECONDS = 3.0  # a stopped rank that has not unwound by then is ended hard
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_ORPHANED_EXIT = 128 + signal.SIGKILL  # as if killed along with the launcher


def launched() -> bool:
    """Whether this process is a rank started by torchrun (torch's elastic launcher)."""
    return dist.is_torchelastic_launched()


def _program() -> list[str]:
    """How the ranks run this program: the script itself, or the bnlab module."""
    script = sys.argv[0]
    if os.path.isfile(script) and os.path.basename(script) != "__main__.py":
        return [script]  # the `bnlab` entry point, or a script that calls bnlab.cli.main
    return ["-m", "bnlab"]


def launcher_argv(nproc: int, argv: Sequence[str], out: str | None) -> list[str]:
    """The torchrun command that runs `bnlab ARGV` (less --nproc) in `nproc` ranks on this machine.

    `out` is added when ARGV names no --out: the ranks must agree on one folder,
    and a default made of each rank's clock might not.
    """
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    if out is not None:
        rest += ["--out", out]
    return [
        sys.executable,
        *("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"),
        *_program(),
        *rest,
    ]


def launch(nproc: int, argv: Sequence[str], cfg: Config, *, default_out: bool) -> NoReturn:
    """Become torchrun running `bnlab train ARGV` (`cfg`) in `nproc` ranks (see launcher_argv).

    A norm or folder the ranks would refuse is refused here first
    (ExperimentError), in one clear message rather than a failed job; `default_out`: `cfg.out` is
    the default, which ARGV does not name.
    """
    from bnlab.experiments.ddp_train import check_norm
    from bnlab.experiments.outdir import check_out

    for norm in cfg.norms:
        check_norm(norm)
    check_out(cfg, "train")
    command = launcher_argv(nproc, argv, cfg.out if default_out else None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def device_of_rank(device: torch.device) -> torch.device:
    """A rank's own device: its local GPU on CUDA, else `device`."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def rank_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise) and watch the launcher.

    Call from the main thread of a rank, with Python handlers installed for
    SIGTERM and SIGHUP (the `bnlab` command installs them).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _watch_launcher()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        # Every rank done before any tears the group down: a rank that leaves
        # while a peer still talks to it can die in gloo's teardown.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a rank's process with ``code`` now, its output flushed, skipping the
    interpreter's teardown.

    A rank's teardown, after its group was destroyed and the results written,
    aborted now and then inside torch's C++ threads ("terminate called without
    an active exception", SIGABRT: about 2 in 100 two-process runs), and
    torchrun then reported the whole job failed. Nothing left at that point
    needs tearing down: results are written atomically, and this flushes the
    output.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _watch_launcher() -> None:
    parent = os.getppid()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(
        target=_watch, args=(parent, read_end), name="bnlab-launcher-watch", daemon=True
    ).start()


def _watch(parent: int, wakeups: int) -> None:
    hard_exit_at, code = None, 0
    while True:
        if os.getppid() != parent:
            os._exit(_ORPHANED_EXIT)
        ready, _, _ = select.select([wakeups], [], [], WATCH_SECONDS)
        if ready:
            for signum in os.read(wakeups, 64):
                if signum in _STOP_SIGNALS and hard_exit_at is None:
                    hard_exit_at, code = time.monotonic() + GRACE_SECONDS, 128 + signum
        if hard_exit_at is not None and time.monotonic() >= hard_exit_at:
            os._exit(code)
