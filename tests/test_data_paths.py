"""Where the data directory comes from, and what a missing data set says."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnlab.data import DataError, find_batches, load_cifar10, resolve_data_dir

from ._cifar_writers import PER_BATCH, make_batches, use_tiny_batches, write_bin_layout


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_argument_wins_over_env(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_env_var(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "env"


def test_xdg_cache_home(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "bnlab"


def test_default_is_home_cache(clean_env, monkeypatch, tmp_path):
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "bnlab"
    # Empty or relative XDG_CACHE_HOME counts as unset (XDG base directory spec).
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert resolve_data_dir() == tmp_path / "home" / ".cache" / "bnlab"
    monkeypatch.setenv("BNLAB_DATA", "")
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "bnlab"


def test_load_reads_env_and_xdg(clean_env, monkeypatch, tmp_path):
    use_tiny_batches(monkeypatch)
    write_bin_layout(tmp_path / "xdg" / "bnlab" / "cifar-10-batches-bin", make_batches(PER_BATCH))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_cifar10(download=False).source.path == str(
        tmp_path / "xdg" / "bnlab" / "cifar-10-batches-bin"
    )
    write_bin_layout(tmp_path / "env" / "cifar-10-batches-bin", make_batches(PER_BATCH))
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert load_cifar10(download=False).source.path == str(
        tmp_path / "env" / "cifar-10-batches-bin"
    )


def test_find_batches_ignores_other_folders(tmp_path):
    assert find_batches(tmp_path / "absent") is None
    assert find_batches(tmp_path) is None
    # What a killed download leaves behind is never taken for data.
    scratch = tmp_path / ".bnlab-download-x1" / "extract" / "cifar-10-batches-py"
    scratch.mkdir(parents=True)
    (scratch / "data_batch_1").write_bytes(b"half")
    assert find_batches(tmp_path) is None


def test_absent_without_download_says_where_and_how(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "nothing"))
    with pytest.raises(DataError) as info:
        load_cifar10(download=False)
    message = str(info.value)
    root = Path(tmp_path / "nothing")
    for where in (
        root / "cifar-10-batches-bin",
        root / "cifar-10-batches-py",
        root / "cifar-10-python.tar.gz",
    ):
        assert str(where) in message
    for how in (
        "download=False",
        "$BNLAB_DATA",
        "--data-dir",
        "BNLAB_DATA=DIR",
        "cifar-10-python.tar.gz",
    ):
        assert how in message
    assert not root.exists()  # looking creates nothing
