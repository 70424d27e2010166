"""One writer per output folder: an OS lock on a file in it, shared by the command's workers.

The lock is `fcntl.flock` on `.bnlab.lock`. flock belongs to the open file,
so worker processes that inherit the descriptor (`InheritedLock`) hold it
too: the folder stays locked until the last process that writes there has
exited, even when the command itself was killed with SIGKILL. The kernel
drops the lock of a dead process, so a file left behind by a killed run is
never mistaken for a live one: it is taken over, with a note. The file
names the holder (PID, host, command) for the refusal message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from multiprocessing import reduction
from pathlib import Path
from typing import Any

LOCK = ".bnlab.lock"


class FolderBusy(RuntimeError):
    """Another bnlab command writes into the folder; the message names it."""


def holder_text(info: dict[str, Any] | None) -> str:
    """'pid 123 on host h (`bnlab compare ...`)', from what the lock file holds."""
    if not info:
        return "a bnlab that is still starting"
    text = f"pid {info.get('pid')} on host {info.get('host')}"
    if info.get("command"):
        text += f" (`{info['command']}`)"
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        text += ", which has ended; its worker processes are still stopping"
    return text


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def busy_holder(folder: Path) -> str | None:
    """Who holds the lock of `folder`, or None when nobody does. Creates nothing."""
    try:
        fd = os.open(folder / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody writes there
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder_text(_read(fd))
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken


class FolderLock:
    """The held lock of a folder; `release()` (or the death of every holder) frees it."""

    def __init__(self, folder: Path, fd: int, left_by: dict[str, Any] | None) -> None:
        self.folder, self.fd = folder, fd
        self.left_by = left_by  # what a killed run's file said, when one was taken over

    @classmethod
    def acquire(cls, folder: Path, command: str | None = None) -> FolderLock:
        """Lock `folder` (which must exist) or raise FolderBusy naming the holder."""
        path = folder / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = holder_text(_read(fd))
                os.close(fd)
                raise FolderBusy(f"{folder} is in use by another bnlab: {holder}") from None
            # The holder before us may have removed the file between our open and our
            # lock: then we hold a lock on a file nobody else can find. Start again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left_by = _read(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        return cls(folder, fd, left_by)

    def inherited(self) -> InheritedLock:
        """The lock for a spawned worker to hold as long as it lives."""
        return InheritedLock(self.fd)

    def release(self) -> None:
        """Remove the file, then let go. Call only when no worker holds the lock any more."""
        if self.fd < 0:
            return
        # Removed while still locked: a newcomer then either finds no file (and makes a
        # new one) or fails to lock this one; `acquire` handles both.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / LOCK)
        os.close(self.fd)
        self.fd = -1


class InheritedLock:
    """A lock descriptor pickled into a spawned process: the same open file, so the same lock.

    Pickled only while a process is being started (as the arguments of a
    worker pool's initializer are), when multiprocessing passes the
    descriptor itself to the child. The child keeps it open until it exits.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (reduction.DupFd(self.fd),)


def _rebuild(dup: Any) -> InheritedLock:
    return InheritedLock(dup.detach())
