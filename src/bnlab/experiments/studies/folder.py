"""A study's output folder: claimed by one writer, refused when it would mix studies, resumable.

The study folder holds the study's own files and, under runs/, one comparison
folder per cell (each claimed and checked by `run_compare` as it runs). A
resume continues the cells from their checkpoints; it must keep every setting
that changes the numbers, the study's own and the training's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bnlab.experiments.config import Config, changed_settings
from bnlab.experiments.lock import LOCK
from bnlab.experiments.outdir import ExperimentError, check_out_path, claimed
from bnlab.experiments.results import RESULTS, TEMPORARY_SUFFIX, load_results


def _content(out: Path) -> list[Path]:
    """What `out` holds, but for the lock file and half-written temporary files."""
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name != LOCK and not p.name.endswith(TEMPORARY_SUFFIX)]


def check_study_out(
    out: Path, kind: str, settings: dict[str, Any], base: Config
) -> dict[str, Any] | None:
    """Refuse a folder that would mix studies; return the results to resume, if any."""
    content = _content(out)
    if not base.resume:
        if content:
            raise ExperimentError(
                f"--out {out}: the folder exists and is not empty; "
                "pass --resume to continue the study in it, or choose another folder"
            )
        return None
    previous = load_results(out)
    if previous is None:
        raise ExperimentError(
            f"--resume: {out} holds no {RESULTS} to continue"
            + ("" if content else "; drop --resume to start the study there")
        )
    if previous.get("command") != kind:
        raise ExperimentError(
            f"--resume: {out} holds `bnlab {previous.get('command')}`, not `bnlab {kind}`"
        )
    old = previous.get("study", {})
    changed = [
        f"{name}: {old.get(name)!r} -> {value!r}"
        for name, value in settings.items()
        if old.get(name) != value
    ]
    changed += changed_settings(Config.from_dict(previous["config"]), base)
    if changed:
        raise ExperimentError(
            f"--resume: the settings differ from those of the study in {out}:\n  "
            + "\n  ".join(changed)
            + "\nresume with the same settings, or start a new --out"
        )
    return previous


@contextlib.contextmanager
def study_folder(
    kind: str,
    settings: dict[str, Any],
    base: Config,
    command: str | None,
    log: Callable[[str], None],
) -> Iterator[tuple[Path, dict[str, Any] | None]]:
    """`base.out`, claimed for this study: yields (the folder, the results it resumes or None)."""
    if base.out is None:
        raise ExperimentError("no output folder given")
    out = Path(base.out)
    check_out_path(out, base.resume)  # before anything is created
    with claimed(out, command, log):
        yield out, check_study_out(out, kind, settings, base)
