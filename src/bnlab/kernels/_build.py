"""Compile and load the native CPU kernels (``SOURCES``, one module), once per machine.

The sources need only a C++ compiler and the Python headers (no torch
headers), so a cold build takes about 5-15 s. The shared object is cached
under ``$BNLAB_CACHE_DIR`` (default ``$XDG_CACHE_HOME/bnlab`` or
``~/.cache/bnlab``), named by a hash of everything that shapes the binary:
source, compiler, flags, Python ABI and CPU. Later processes load the cached
file in about a millisecond.

``native()`` returns the loaded module, or ``None`` after one warning when it
cannot be built (no compiler, no Python headers, an unsupported platform); the
caller then runs on the reference backend. ``BNLAB_BACKEND=reference`` (read
at import) skips the build altogether.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.cpp", "conv_kernels.cpp")]
MODULE_NAME = "_bnlab_cpu"  # must match PyInit__bnlab_cpu in cpu_kernels.cpp

# Tried in order; the first set that compiles wins. OpenMP may be missing
# (e.g. Apple clang): the kernels then run on one thread.
_COMMON = [
    "-O3",
    "-std=c++17",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fPIC",
    "-shared",
    "-Wno-psabi",
]
_VARIANTS = [
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native"],
    [],
]

ENABLED = os.environ.get("BNLAB_BACKEND", "").lower() != "reference"
_UNSET = object()
_module: ModuleType | object | None = _UNSET


def native() -> ModuleType | None:
    """The compiled kernels, building them on first use; None if they cannot be had."""
    global _module
    if _module is _UNSET:
        _module = _load_or_build()
    return _module  # type: ignore[return-value]


def cache_dir() -> Path:
    explicit = os.environ.get("BNLAB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab"


def _compiler() -> str | None:
    candidates = [os.environ.get("CXX"), (sysconfig.get_config_var("CXX") or "").split(" ")[0]]
    candidates += ["c++", "g++", "clang++"]
    for name in candidates:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _key(compiler: str, flags: list[str]) -> str:
    h = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in SOURCES),
        compiler.encode(),
        " ".join(flags).encode(),
        sysconfig.get_config_var("EXT_SUFFIX").encode(),
        sys.version.encode(),
        _cpu_signature().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _link_flags() -> list[str]:
    # Extension modules resolve Python's symbols from the running interpreter.
    return ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build into a temporary file and move it into place; returns an error or None."""
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"Python headers not found in {include} (install the python3-dev package)"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        return f"cannot write the cache directory {target.parent} ({e}); set BNLAB_CACHE_DIR"
    cmd = [
        compiler,
        *_COMMON,
        *flags,
        f"-I{include}",
        *map(str, SOURCES),
        "-o",
        tmp,
        *_link_flags(),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return done.stderr.strip()[-2000:] or f"{compiler} exited with {done.returncode}"
        os.chmod(tmp, 0o755)  # mkstemp makes it private; a shared cache needs it readable
        os.replace(tmp, target)  # atomic: concurrent builders leave one whole file
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_or_build() -> ModuleType | None:
    if not ENABLED:
        return None
    if sys.platform == "win32":
        return _give_up("building the native kernels with MSVC is not supported")
    compiler = _compiler()
    if compiler is None:
        return _give_up("no C++ compiler found (set CXX, or install g++ or clang++)")
    errors = []
    for flags in _VARIANTS:
        target = (
            cache_dir()
            / f"{MODULE_NAME}-{_key(compiler, flags)}{sysconfig.get_config_var('EXT_SUFFIX')}"
        )
        if not target.exists():
            error = _compile(compiler, flags, target)
            if error is not None:
                errors.append(error)
                continue
        try:
            return _import(target)
        except (ImportError, OSError) as e:
            errors.append(str(e))
    return _give_up(errors[0] if errors else "unknown error")


def _give_up(reason: str) -> None:
    warnings.warn(
        f"bnlab: native CPU kernels unavailable, using the (slower) reference backend: {reason}. "
        "Set BNLAB_BACKEND=reference to skip the build and silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None
