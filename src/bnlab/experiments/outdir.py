"""The output folder of a comparison: what may go there, who writes there, what a resume continues.

Checks are cheap (no data is read) and create nothing. `claimed` makes the
folder if need be and takes its lock (one writer per folder: see lock.py);
the comparison then checks what the folder holds, as its only writer, once.
A resume must keep every setting that changes the numbers; those that mean
something only once resolved (device, threads per run, the data folder) are
compared as resolved, so two spellings of the same thing agree.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bnlab.data import find_batches, resolve_data_dir
from bnlab.data.paths import not_a_folder
from bnlab.experiments.config import Config, changed_settings
from bnlab.experiments.lock import LOCK, FolderBusy, FolderLock
from bnlab.experiments.results import (
    RESULTS,
    TEMPORARY_SUFFIX,
    load_results,
    remove_temporary_files,
)

COMMANDS = ("train", "compare")


class ExperimentError(ValueError):
    """A refused output folder or resume; the message says why and what to do."""


def default_out(command: str) -> str:
    return str(Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def _content(out: Path) -> list[Path]:
    """What `out` holds, but for the lock file and what killed writers left half-written."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name != LOCK and not p.name.endswith(TEMPORARY_SUFFIX)]


def check_out(cfg: Config, command: str = "compare") -> dict[str, Any] | None:
    """Refuse an output folder that would mix runs; return the results to resume, if any.

    `command` is the kind of runs ("train" or "compare"): a resume continues
    only its own kind. Cheap and creates nothing; `run_compare` calls it once
    it holds the folder's lock, so nothing changes the folder after the check.
    """
    if cfg.out is None:
        raise ExperimentError("no output folder given")
    out = Path(cfg.out)
    check_out_path(out, cfg.resume)
    content = _content(out)
    if not cfg.resume:
        if content:
            raise ExperimentError(
                f"--out {out}: the folder exists and is not empty; "
                "pass --resume to continue the runs in it, or choose another folder"
            )
        return None
    previous = load_results(out)
    if previous is None:
        raise ExperimentError(
            f"--resume: {out} holds no {RESULTS} to continue"
            + ("" if content else "; drop --resume to start the runs there")
        )
    made_by = previous.get("command") or _command_of(previous["environment"].get("command"))
    if made_by in COMMANDS and made_by != command:
        raise ExperimentError(
            f"--resume: {out} holds the runs of `bnlab {made_by}`, not `bnlab {command}`; "
            f"continue them with `bnlab {made_by} --resume`"
        )
    changed = changed_settings(Config.from_dict(previous["config"]), cfg)
    if changed:
        raise ExperimentError(
            f"--resume: the settings differ from those of the runs in {out}:\n  "
            + "\n  ".join(changed)
            + "\nresume with the same settings, or start a new --out"
        )
    return previous


def _command_of(line: str | None) -> str | None:
    """'train' from 'bnlab train --epochs 1': what results written before "command" say."""
    words = (line or "").split()
    return words[1] if len(words) > 1 and words[0] == "bnlab" else None


def check_out_path(out: Path, resume: bool) -> None:
    """Refuse a path that cannot be the output folder, before anything is created."""
    blocking = not_a_folder(out)
    if blocking == out:
        raise ExperimentError(f"--out {out}: is a file, not a folder")
    if blocking is not None:
        raise ExperimentError(
            f"--out {out}: {blocking} is a file, not a folder, so no folder can be made in it"
        )
    if resume and not out.is_dir():
        raise ExperimentError(
            f"--resume: {out} does not exist, so there are no runs to continue; "
            "check the path, or drop --resume to start new runs there"
        )


@contextlib.contextmanager
def claimed(out: Path, command: str | None, log: Callable[[str], None]) -> Iterator[FolderLock]:
    """`out` created if need be and locked for this command; released (and removed again,
    if it was created here and holds nothing) when the block ends.
    """
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExperimentError(f"--out {out}: cannot create the folder ({e})") from e
    lock = None
    try:
        try:
            lock = FolderLock.acquire(out, command)
        except FolderBusy as e:
            raise ExperimentError(
                f"--out {e}. Wait for it to finish or stop it, or choose another --out"
            ) from None
        if lock.left_by is not None:
            by = lock.left_by
            log(
                f"note: {out}/{LOCK} was left by pid {by.get('pid')} on host {by.get('host')}, "
                "which did not end cleanly and holds it no more; taking it over"
            )
            removed = remove_temporary_files(out)
            if removed:
                files = "file" if removed == 1 else "files"
                log(f"note: removed {removed} half-written temporary {files} it left")
        yield lock
    finally:
        if lock is not None:
            lock.release()
        for folder in created:  # deepest first; a folder with results stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _same_place(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def data_place(cfg: Config) -> str | None:
    """The batches folder the settings point at, if it is there (nothing is read)."""
    found = find_batches(resolve_data_dir(cfg.data_dir))
    return None if found is None else str(found[0])


def check_resolved(
    previous: dict[str, Any],
    out: Path,
    device: str,
    threads: int,
    place: str | None,
    fingerprint: str | None = None,
) -> None:
    """Refuse a resume whose settings, resolved, differ from those of the runs it continues.

    Compared by meaning, not by spelling: `--device auto` and `cpu`, `--threads 0`
    and the threads it stands for, and a data folder named by --data-dir, by
    $BNLAB_DATA or through another path are the same when they resolve alike.
    """
    env = previous["environment"]
    data = env.get("data") or {}
    changed = []
    if env.get("device") not in (None, device):
        changed.append(f"device: {env['device']} -> {device}")
    if env.get("threads") not in (None, threads):
        changed.append(
            f"threads per run: {env['threads']} -> {threads} (the numbers depend on it: "
            f"add --threads {env['threads']})"
        )
    if place is not None and data.get("path") and not _same_place(data["path"], place):
        changed.append(
            f"data: {data['path']} -> {place} (name the first with --data-dir or $BNLAB_DATA)"
        )
    elif fingerprint is not None and data.get("fingerprint") not in (None, fingerprint):
        changed.append(
            f"data: the files differ (fingerprint {data['fingerprint']} -> {fingerprint})"
        )
    if changed:
        raise ExperimentError(
            f"--resume: the settings differ from those of the runs in {out}:\n  "
            + "\n  ".join(changed)
            + "\nresume with the same settings, or start a new --out"
        )
