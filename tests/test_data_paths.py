"""Where the data directory comes from, and what a missing data set says."""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import pytest

import bnlab.data.cifar10 as cifar10
from bnlab.data import DataError, download_cifar10, find_batches, load_cifar10, resolve_data_dir

from ._cifar_writers import PER_BATCH, make_batches, py_archive, use_tiny_batches, write_bin_layout


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
    (tmp_path / "nothing").mkdir()
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
    assert list(root.iterdir()) == []  # looking creates nothing


def _no_download(url, timeout):
    raise AssertionError("nothing may be downloaded here")


@pytest.mark.parametrize("how", ["argument", "env"])
def test_a_named_folder_that_does_not_exist_is_named_and_not_created(
    clean_env, monkeypatch, tmp_path, how
):
    typo = tmp_path / "cifra"
    if how == "env":
        monkeypatch.setenv("BNLAB_DATA", str(typo))
    with pytest.raises(DataError) as info:
        load_cifar10(str(typo) if how == "argument" else None, urlopen=_no_download)
    message = str(info.value)
    assert (
        f"{typo} (from {'the data_dir argument (--data-dir)' if how == 'argument' else '$BNLAB_DATA'}): no such folder"
        in message
    )
    assert "--download" in message
    assert not typo.exists()
    assert not (tmp_path / "home").exists()  # nor the default cache


@pytest.mark.parametrize("how", ["argument", "env"])
def test_a_file_where_the_folder_should_be_is_named(clean_env, monkeypatch, tmp_path, how):
    file = tmp_path / "cifar.tar"
    file.write_bytes(b"not a folder")
    if how == "env":
        monkeypatch.setenv("BNLAB_DATA", str(file))
    with pytest.raises(DataError, match=f"{file} is a file, not a folder"):
        load_cifar10(str(file) if how == "argument" else None, urlopen=_no_download)
    with pytest.raises(DataError, match=f"{file} is a file, not a folder"):
        load_cifar10(file / "sub", urlopen=_no_download)  # under a file: the file is named
    assert file.read_bytes() == b"not a folder"


def test_a_named_empty_folder_downloads_only_when_asked(clean_env, monkeypatch, tmp_path):
    use_tiny_batches(monkeypatch)
    root = tmp_path / "mine"
    root.mkdir()
    with pytest.raises(DataError, match=r"(?s)not found in .*mine.*--download"):
        load_cifar10(root, urlopen=_no_download)
    assert list(root.iterdir()) == []


def test_download_true_makes_the_named_folder(clean_env, monkeypatch, tmp_path):
    """--download into a folder that does not exist yet: made, filled, read."""
    use_tiny_batches(monkeypatch)
    payload = py_archive(make_batches(PER_BATCH), tmp_path / "src")
    # The stub serves tiny test data, not the official archive: expect its MD5.
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(cifar10, "download_cifar10", functools.partial(download_cifar10, md5=md5))

    root = tmp_path / "new" / "data"
    data = load_cifar10(root, download=True, urlopen=lambda url, timeout: io.BytesIO(payload))
    assert data.source.path == str(root / "cifar-10-batches-py")


def test_the_default_cache_downloads_without_being_asked(clean_env, monkeypatch, tmp_path):
    calls = []

    def offline(url, timeout):
        calls.append(url)
        raise OSError("offline")

    with pytest.raises(DataError, match="could not download"):
        load_cifar10(urlopen=offline)
    assert len(calls) == 1
    assert not (tmp_path / "home" / ".cache" / "bnlab").exists()  # removed again on failure


def test_a_default_cache_that_is_a_file_is_named(clean_env, monkeypatch, tmp_path):
    (tmp_path / "xdg").write_text("a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(DataError, match=f"{tmp_path / 'xdg'} is a file, not a folder"):
        load_cifar10(urlopen=_no_download)
