"""Compile and load bnlab's native extension modules, once per machine.

An :class:`Extension` is a module name and its C++ sources. Most sources need
only a C++ compiler, the Python headers and ``bnlab_native.h`` (this folder,
passed with ``-I``): no torch headers, so a cold build takes seconds; one that
needs more (the batch-norm autograd node: torch's headers and libraries)
names its extra flags. The
shared object is cached under ``$BNLAB_CACHE_DIR`` (default
``$XDG_CACHE_HOME/bnlab`` or ``~/.cache/bnlab``), named by a hash of
everything that shapes the binary: sources, header, compiler, flags, Python
ABI and CPU. Later processes load the cached file in about a millisecond.

The kernels are built for this CPU (``-march=native``), or for the ``-march``
target ``$BNLAB_MARCH`` names (for example ``x86-64-v3``: AVX2 and FMA).

``Extension.load()`` returns the loaded module, or ``None`` after one warning
when it cannot be built (no compiler, no Python headers, an unsupported
platform); the caller then takes its fallback. ``BNLAB_BACKEND=reference``
(read at import) skips every build: batch norm runs on the reference backend
and the experiment's layers on torch's own operations.
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
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

INCLUDE = Path(__file__).parent  # holds bnlab_native.h

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


def variants(march: str) -> list[list[str]]:
    """The builds tried in turn: for the CPU ``march`` names, then without it (a compiler
    that lacks it), with OpenMP and then without."""
    return [[f"-march={march}", "-fopenmp"], ["-fopenmp"], [f"-march={march}"], []]


# The CPU the kernels are built for: this one, unless BNLAB_MARCH names another
# -march target (x86-64-v3: AVX2 and FMA, no AVX-512), to build for the oldest
# CPUs of a cluster or to time the kernels as such a CPU runs them.
MARCH = os.environ.get("BNLAB_MARCH", "native")
_VARIANTS = variants(MARCH)


def _portable_variants() -> list[list[str]]:
    """The builds of _VARIANTS that name no CPU (at least the bare one)."""
    kept = [v for v in _VARIANTS if not any(f.startswith("-march=") for f in v)]
    return kept or [[]]


ENABLED = os.environ.get("BNLAB_BACKEND", "").lower() != "reference"
_UNSET = object()


class Extension:
    """A native module built from ``sources``; ``name`` must match the ``PyInit_<name>`` they define.

    ``fallback`` names what callers use without it, for the warning. ``for_cpu``: built for
    the CPU ``MARCH`` names; False for code that includes torch's headers, to compile them
    for the CPUs libtorch was compiled for. (Built with ``-march=native`` by GCC 12 on an
    Intel Xeon with AVX512-FP16, the autograd node took a float64 input's dtype for
    float32 in its backward.)
    """

    def __init__(
        self,
        name: str,
        sources: list[Path],
        fallback: str,
        flags: Callable[[], list[str]] | None = None,
        for_cpu: bool = True,
    ) -> None:
        self.name, self.sources, self.fallback = name, list(sources), fallback
        # Extra compiler and linker flags (include paths, libraries), asked for at build time.
        self.flags = flags or (lambda: [])
        self.for_cpu = for_cpu
        self._module: ModuleType | object | None = _UNSET

    def load(self) -> ModuleType | None:
        """The module, built on first use; None if it cannot be had (warned about once)."""
        if self._module is _UNSET:
            self._module = self.build(find_compiler()) if ENABLED else None
        return self._module  # type: ignore[return-value]

    def build(self, compiler: str | None) -> ModuleType | None:
        """The module from the cache, compiled with ``compiler`` first if need be; None after a
        warning when that fails. Not memoised: :meth:`load` is."""
        if sys.platform == "win32":
            return self._give_up("building with MSVC is not supported")
        if compiler is None:
            return self._give_up("no C++ compiler found (set CXX, or install g++ or clang++)")
        errors = []
        try:
            extra = self.flags()
        except Exception as e:  # what the flags come from is missing or broken
            return self._give_up(f"cannot find what the build needs ({e})")
        for variant in _VARIANTS if self.for_cpu else _portable_variants():
            flags = [*variant, *extra]
            suffix = sysconfig.get_config_var("EXT_SUFFIX")
            target = cache_dir() / f"{self.name}-{self._key(compiler, flags)}{suffix}"
            if not target.exists():
                error = self._compile(compiler, flags, target)
                if error is not None:
                    if variant is _VARIANTS[0] and MARCH != "native":
                        warnings.warn(
                            f"bnlab: cannot build {self.name} for BNLAB_MARCH={MARCH!r} "
                            f"({error}); building it without -march",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    errors.append(error)
                    continue
            try:
                return self._import(target)
            except (ImportError, OSError) as e:
                errors.append(str(e))
        return self._give_up(errors[0] if errors else "unknown error")

    def _key(self, compiler: str, flags: list[str]) -> str:
        h = hashlib.sha256()
        for part in (
            self.name.encode(),
            *(path.read_bytes() for path in [*self.sources, *self._headers()]),
            compiler.encode(),
            " ".join(flags).encode(),
            sysconfig.get_config_var("EXT_SUFFIX").encode(),
            sys.version.encode(),
            _cpu_signature().encode(),
        ):
            h.update(part)
            h.update(b"\0")
        return h.hexdigest()[:16]

    def _headers(self) -> list[Path]:
        """The headers a build may include: in bnlab_native.h's folder and the sources' own,
        and in folders below them."""
        folders = {INCLUDE, *(source.parent for source in self.sources)}
        return sorted({h for folder in folders for h in folder.rglob("*.h")})

    def _compile(self, compiler: str, flags: list[str], target: Path) -> str | None:
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
            f"-I{include}",
            f"-I{INCLUDE}",
            *map(str, self.sources),
            "-o",
            tmp,
            *flags,  # after the sources: libraries named here must follow what uses them
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

    def _import(self, path: Path) -> ModuleType:
        loader = importlib.machinery.ExtensionFileLoader(self.name, str(path))
        spec = importlib.util.spec_from_file_location(self.name, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module

    def _give_up(self, reason: str) -> None:
        warnings.warn(
            f"bnlab: native module {self.name} unavailable, using {self.fallback}: {reason}. "
            "Set BNLAB_BACKEND=reference to skip the build and silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def cache_dir() -> Path:
    explicit = os.environ.get("BNLAB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bnlab"


def find_compiler() -> str | None:
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


def _link_flags() -> list[str]:
    # Extension modules resolve Python's symbols from the running interpreter.
    return ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
