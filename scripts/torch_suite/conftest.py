"""pytest plugin for running PyTorch's own batch-norm tests against bnlab.

Loaded as a conftest by ``run.sh`` (which links it next to PyTorch's test
files), so it runs before any test module is imported. It

* with ``BNLAB_TORCH_SUITE_IMPL=bnlab`` (the default) puts bnlab's classes in
  place of torch's: ``BatchNorm1d/2d/3d`` and ``LazyBatchNorm1d/2d/3d`` in
  ``torch.nn``, ``torch.nn.modules`` and ``torch.nn.modules.batchnorm``, and
  ``bnlab.functional.batch_norm`` as ``torch.nn.functional.batch_norm``.
  Everything that looks these names up after this point (the test files,
  ``common_modules.module_db``, ``common_nn``'s ``getattr(nn, name)``) gets
  bnlab's. With ``BNLAB_TORCH_SUITE_IMPL=torch`` nothing is replaced: the
  baseline.
* checks, once the tests are collected, that ``module_db``'s batch-norm
  entries really are the selected implementation (a module_db imported before
  the swap would silently test torch);
* with ``BNLAB_TORCH_SUITE_RESULTS=<path>`` records every selected test's
  outcome (passed / failed / skipped / xfailed / xpassed, or crashed) and a
  one-line reason in that JSON-lines file as it goes, and resumes after a
  crash (see below), for ``run.sh`` to compare.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

IMPL = os.environ.get("BNLAB_TORCH_SUITE_IMPL", "bnlab").strip().lower()
if IMPL not in ("torch", "bnlab"):
    raise pytest.UsageError(f"BNLAB_TORCH_SUITE_IMPL must be 'torch' or 'bnlab', not {IMPL!r}")

CLASS_NAMES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
)
_NAMESPACES = (torch.nn, torch.nn.modules, torch.nn.modules.batchnorm)

# The modules whose import-time view of torch.nn would escape the swap.
_EARLY = [
    m
    for m in ("torch.testing._internal.common_modules", "torch.testing._internal.common_nn")
    if m in sys.modules
]


def _swap_in_bnlab() -> dict[str, type]:
    # bnlab's classes subclass torch's, so bnlab is imported while torch.nn
    # still holds the originals.
    import bnlab.functional
    import bnlab.nn

    replacements = {name: getattr(bnlab.nn, name) for name in CLASS_NAMES}
    for cls in replacements.values():
        if not cls.__module__.startswith("bnlab."):
            raise RuntimeError(f"bnlab.nn.{cls.__name__} comes from {cls.__module__}, not bnlab")
    for namespace in _NAMESPACES:
        for name, cls in replacements.items():
            setattr(namespace, name, cls)
    torch.nn.functional.batch_norm = bnlab.functional.batch_norm
    return replacements


if IMPL == "bnlab":
    EXPECTED = _swap_in_bnlab()
else:
    EXPECTED = {name: getattr(torch.nn, name) for name in CLASS_NAMES}


def pytest_report_header(config):
    where = {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in EXPECTED.items()}
    fn = torch.nn.functional.batch_norm
    return [
        f"bnlab torch suite: implementation = {IMPL}",
        f"  torch.nn.BatchNorm2d -> {where['BatchNorm2d']}",
        f"  torch.nn.LazyBatchNorm2d -> {where['LazyBatchNorm2d']}",
        f"  torch.nn.functional.batch_norm -> {fn.__module__}.{fn.__qualname__}",
    ]


def _check_module_db() -> None:
    if _EARLY:
        raise pytest.UsageError(
            f"{_EARLY} were imported before the swap; run through run.sh so the conftest loads first"
        )
    common_modules = sys.modules.get("torch.testing._internal.common_modules")
    if common_modules is None:
        return
    for info in common_modules.module_db:
        name = info.module_cls.__name__
        if name in EXPECTED and info.module_cls is not EXPECTED[name]:
            raise pytest.UsageError(
                f"module_db's {name} is {info.module_cls.__module__}.{name}, "
                f"not the selected implementation ({IMPL})"
            )


# ---- outcome recording -------------------------------------------------------------------
#
# BNLAB_TORCH_SUITE_RESULTS names a JSON-lines file that grows one record per event, flushed at
# once, so a run that dies (a segfault in a kernel, say) loses nothing already finished:
#   {"kind": "start", "nodeid": ...}                       a test began
#   {"kind": "result", "nodeid": ..., "outcome": ..., "reason": ...}   it ended
#   {"kind": "session", "collected": N, "exitstatus": S}   pytest finished normally
# When the file already has results (run.sh restarting after a crash), those tests are deselected
# and a test that started but never ended is recorded as "crashed", so the rerun goes on after it.

_PATH = os.environ.get("BNLAB_TORCH_SUITE_RESULTS")
_DONE: set[str] = set()
_PHASES: dict[str, dict] = {}
_RESUMED = 0


def _write(record: dict) -> None:
    if _PATH:
        with open(_PATH, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _load_previous() -> None:
    if not _PATH or not os.path.exists(_PATH):
        return
    started = []
    with open(_PATH) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            if record.get("kind") == "start":
                started.append(record["nodeid"])
            elif record.get("kind") == "result":
                _DONE.add(record["nodeid"])
    for nodeid in started:
        if nodeid not in _DONE:
            _write(
                {
                    "kind": "result",
                    "nodeid": nodeid,
                    "outcome": "crashed",
                    "reason": "the pytest process died during this test (signal, abort or timeout)",
                }
            )
            _DONE.add(nodeid)


_load_previous()


def _resume_deselect(config, items):
    global _RESUMED
    if not _DONE:
        return
    keep = [item for item in items if item.nodeid not in _DONE]
    dropped = [item for item in items if item.nodeid in _DONE]
    if dropped:
        _RESUMED = len(dropped)
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(trylast=True)  # after -k has deselected
def pytest_collection_modifyitems(session, config, items):
    _check_module_db()
    _resume_deselect(config, items)


def _reason(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
    text = crash if crash else str(longrepr)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def pytest_runtest_logstart(nodeid, location):
    _write({"kind": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    entry = _PHASES.setdefault(report.nodeid, {"outcome": None, "reason": ""})
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        else:
            entry["outcome"] = report.outcome  # passed / failed / skipped
        entry["reason"] = "" if report.passed else _reason(report)
    elif report.when == "teardown" and report.failed and entry["outcome"] in (None, "passed"):
        entry["outcome"] = "failed"
        entry["reason"] = "teardown: " + _reason(report)


def pytest_runtest_logfinish(nodeid, location):
    entry = _PHASES.pop(nodeid, {"outcome": None, "reason": ""})
    if entry["outcome"] is None:
        entry = {"outcome": "failed", "reason": "no outcome reported"}
    _write({"kind": "result", "nodeid": nodeid, **entry})


def pytest_sessionfinish(session, exitstatus):
    collected = len(getattr(session, "items", ())) + _RESUMED
    _write({"kind": "session", "collected": collected, "exitstatus": int(exitstatus)})
