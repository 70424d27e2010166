"""Where a result came from: versions, commit, device, threads and the data read."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bnlab.data import DataSource


def bnlab_version() -> str:
    try:
        return importlib.metadata.version("bnlab")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        import bnlab

        return bnlab.__version__


def git_commit() -> str | None:
    """The commit of the checkout bnlab runs from, or None (not a checkout, no git, ...)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def collect(
    device: torch.device, source: DataSource | None = None, command: str | None = None
) -> dict[str, Any]:
    """A JSON-ready record of the software, hardware and data behind a result."""
    return {
        "bnlab": bnlab_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "command": command,
        "data": None
        if source is None
        else {"path": source.path, "layout": source.layout, "fingerprint": source.fingerprint},
    }
