"""bnlab.native's builder: what enters a module's cache key, extra flags, and giving up."""

from __future__ import annotations

import pytest

from bnlab import native
from bnlab.kernels import _build

SOURCE = r"""
#include <Python.h>
#include "beside.h"

static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_bnlab_build_probe", nullptr, -1, nullptr,
                          nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__bnlab_build_probe(void) {
    PyObject* m = PyModule_Create(&def);
    if (m) PyModule_AddIntConstant(m, "VALUE", BESIDE + FLAG);
    return m;
}
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An extension whose source includes a header beside it, built into its own cache."""
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_VARIANTS", [[]])  # one build per test: no -march, no OpenMP
    source = tmp_path / "probe.cpp"
    source.write_text(SOURCE)
    (tmp_path / "beside.h").write_text("#define BESIDE 40\n")
    flags = ["-DFLAG=2"]
    ext = native.Extension(
        "_bnlab_build_probe", [source], fallback="nothing", flags=lambda: list(flags)
    )
    return ext, tmp_path, flags


def _key(ext) -> str:
    return ext._key(native.find_compiler(), [*native._VARIANTS[0], *ext.flags()])


def test_extra_flags_reach_the_compiler(probe):
    ext, _, _ = probe
    module = ext.build(native.find_compiler())
    assert module is not None and module.VALUE == 42


def test_a_header_beside_the_source_and_the_flags_are_in_the_key(probe):
    """Editing either must rebuild: a stale binary would run old kernels (or another
    torch's ABI, whose version the node's flags name)."""
    ext, folder, flags = probe
    first = _key(ext)
    (folder / "beside.h").write_text("#define BESIDE 41\n")
    second = _key(ext)
    flags[0] = "-DFLAG=3"
    third = _key(ext)
    assert len({first, second, third}) == 3


def test_a_header_in_a_folder_below_the_source_is_in_the_key(probe):
    """The CPU kernels' parts live in kernels/cpu_kernels/: editing one must rebuild."""
    ext, folder, _ = probe
    (folder / "parts").mkdir()
    part = folder / "parts" / "part.h"
    part.write_text("#define PART 1\n")
    first = _key(ext)
    part.write_text("#define PART 2\n")
    assert _key(ext) != first


def test_flags_that_cannot_be_had_give_up_with_the_reason(probe):
    ext, _, _ = probe

    def missing():
        raise FileNotFoundError("torch's C++ headers are not in /nowhere")

    ext.flags = missing
    with pytest.warns(RuntimeWarning, match="_bnlab_build_probe unavailable.*headers are not in"):
        assert ext.build(native.find_compiler()) is None


def test_code_that_includes_torch_is_built_for_no_cpu(probe, monkeypatch):
    """Extensions built for torch's ABI (for_cpu=False, the autograd node) never get
    -march: with -march=native on a Xeon with AVX512-FP16 the node misread dtypes. The
    kernels' own build tries the CPU's first."""
    ext, _, _ = probe
    monkeypatch.setattr(native, "_VARIANTS", native.variants("x86-64-v3"))
    tried = []

    def compile_(compiler, flags, target):
        tried.append(flags)
        return "stop here"

    monkeypatch.setattr(ext, "_compile", compile_)
    with pytest.warns(RuntimeWarning):
        ext.build(native.find_compiler())
    assert tried[0][:2] == ["-march=x86-64-v3", "-fopenmp"]
    tried.clear()
    ext.for_cpu = False
    with pytest.warns(RuntimeWarning):
        ext.build(native.find_compiler())
    assert tried == [["-fopenmp", "-DFLAG=2"], ["-DFLAG=2"]]
    assert _build.NODE.for_cpu is False and _build.BATCH_NORM.for_cpu is True
