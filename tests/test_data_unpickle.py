"""The restricted unpickler: numpy arrays load, anything that could run code is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from bnlab.data import DataError, load_cifar10
from bnlab.data._unpickle import load_pickle

from ._cifar_writers import PER_BATCH, make_batches, py2_pickle, use_tiny_batches, write_py_layout


def _str(s: str) -> bytes:
    return b"U" + bytes([len(s)]) + s.encode()


def _calls(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle whose loading calls module.name(arg) (GLOBAL + REDUCE)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _str(arg) + b"\x85R."


def _stack_global_calls(module: str, name: str, arg: str) -> bytes:
    """The same through protocol 4's STACK_GLOBAL."""

    def short(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."


def _attacks(marker: Path) -> list[tuple[bytes, str]]:
    code = f"open({str(marker)!r}, 'w')"
    return [
        (_calls("os", "system", f"touch {marker}"), "os.system"),
        (_calls("posix", "system", f"touch {marker}"), "posix.system"),
        (_calls("builtins", "eval", code), "builtins.eval"),
        (_calls("__builtin__", "eval", code), "__builtin__.eval"),
        (_stack_global_calls("builtins", "exec", code), "builtins.exec"),
        (pickle.dumps(np.float64(1.0), protocol=2), "numpy"),  # a scalar: allowed by plain pickle
    ]


@pytest.mark.parametrize("case", range(6))
def test_code_running_pickles_are_refused_unrun(tmp_path, case):
    marker = tmp_path / "pwned"
    raw, name = _attacks(marker)[case]
    with pytest.raises(DataError, match=rf"evil\.pkl: refusing to unpickle the global '{name}"):
        load_pickle(raw, tmp_path / "evil.pkl")
    assert not marker.exists()


def test_refused_inside_a_batches_folder(tmp_path, monkeypatch):
    use_tiny_batches(monkeypatch)
    folder = write_py_layout(tmp_path / "cifar-10-batches-py", make_batches(PER_BATCH))
    marker = tmp_path / "pwned"
    (folder / "data_batch_2").write_bytes(_calls("os", "system", f"touch {marker}"))
    with pytest.raises(
        DataError, match=r"data_batch_2: refusing to unpickle the global 'os\.system'"
    ):
        load_cifar10(tmp_path, download=False)
    assert not marker.exists()


@pytest.mark.parametrize("spelling", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_both_numpy_spellings_load(spelling):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = py2_pickle({"data": array}).replace(b"numpy.core.multiarray", spelling)
    out = load_pickle(raw, Path("batch"))
    assert out["data"].dtype == np.uint8 and np.array_equal(out["data"], array)


def test_py2_strings_become_str():
    assert load_pickle(py2_pickle({"label_names": ["cat", "dog"]}), Path("meta")) == {
        "label_names": ["cat", "dog"]
    }


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x80\x02}(U\x04data", b"not a pickle at all", b"\x80\x02K\x01R.", b"\x80\x02h\x05."],
)
def test_corrupt_pickles(raw):
    with pytest.raises(DataError, match=r"broken: cannot read this pickle"):
        load_pickle(raw, Path("broken"))
