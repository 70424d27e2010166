"""What a run leaves in its output folder, and the only code (with report.py and plots.py) that writes it.

    results.json              config, environment, every run's epochs, summary per norm
    metrics.csv               one row per (norm, seed, epoch)
    checkpoints/NORM-seedS.pt the latest epoch of each run: model, Adam, RNG, loader epoch, history

Every file is written to a temporary file in the same folder and then renamed
over the old one (`os.replace` is atomic), so a kill at any moment leaves
either the old or the new file, never half of one. The temporary file's name
carries the writer's PID: a process killed in the middle of a write leaves a
file that its workers, or the next command in the folder, can tell apart and
remove (`remove_temporary_files`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import secrets
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

RESULTS = "results.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
TEMPORARY_SUFFIX = ".tmp"
CSV_COLUMNS = ("norm", "seed", "epoch", "train_loss", "test_acc", "train_seconds", "eval_seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only when the block finishes without error."""
    path = Path(path)
    # Named before it exists, and created inside the try: a stop (a worker's
    # SIGTERM raises in its main thread) that lands right after the file is
    # created still finds the name to remove. (mkstemp returns the name only
    # once the file exists.)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # created private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temporary_files(folder: Path, pid: int | None = None) -> int:
    """Remove what killed writers left in `folder` and its checkpoints: every temporary
    file, or only those of process `pid`. Returns how many there were.

    Only for a folder no live process writes in (its lock is held), or for a dead `pid`.
    """
    pattern = f".*.{pid}.*{TEMPORARY_SUFFIX}" if pid is not None else f".*{TEMPORARY_SUFFIX}"
    removed = 0
    for where in (folder, folder / CHECKPOINTS):
        for path in where.glob(pattern):
            with contextlib.suppress(FileNotFoundError):  # another worker was quicker
                path.unlink()
                removed += 1
    return removed


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path) as f:
        f.write(text.encode())


def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json and metrics.csv, both from `results`."""
    write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for run in results["runs"]:
        for e in run["epochs"]:
            writer.writerow([run["norm"], run["seed"], *(e[c] for c in CSV_COLUMNS[2:])])
    write_text(out / METRICS, buf.getvalue())


def load_results(out: Path) -> dict[str, Any] | None:
    path = out / RESULTS
    return json.loads(path.read_text()) if path.exists() else None


def checkpoint_path(out: Path, norm: str, seed: int) -> Path:
    return out / CHECKPOINTS / f"{norm}-seed{seed}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
    # Loaded to the CPU: RNG states must be CPU tensors, and load_state_dict copies
    # weights and optimizer state to wherever the model lives.
    return torch.load(path, map_location="cpu", weights_only=True)


def summarize(runs: list[dict[str, Any]], epochs: int) -> dict[str, dict[str, Any]]:
    """Per norm, over its finished runs: final accuracy mean and sample std, mean run time."""
    summary: dict[str, dict[str, Any]] = {}
    for norm in dict.fromkeys(run["norm"] for run in runs):
        done = [r for r in runs if r["norm"] == norm and len(r["epochs"]) == epochs]
        if not done:
            continue
        finals = [r["epochs"][-1]["test_acc"] for r in done]
        summary[norm] = {
            "final_acc_mean": statistics.fmean(finals),
            "final_acc_std": statistics.stdev(finals) if len(finals) > 1 else None,
            "seconds_mean": statistics.fmean(sum(e["seconds"] for e in r["epochs"]) for r in done),
            "runs": len(done),
        }
    return summary
