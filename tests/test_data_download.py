"""Download, verification and extraction with a stubbed opener: no network is used."""

from __future__ import annotations

import hashlib
import io
import urllib.error

import pytest

from bnlab.data import DataError, download_cifar10, extract_archive, load_cifar10

from ._cifar_writers import PER_BATCH, make_batches, py_archive, tar_gz, use_tiny_batches

URL = "https://example.invalid/cifar-10-python.tar.gz"


class _Response(io.BytesIO):
    """What urlopen returns, as far as the downloader uses it."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def _serving(payload: bytes):
    calls = []

    def urlopen(url, timeout):
        calls.append(url)
        return _Response(payload)

    return urlopen, calls


def _offline(url, timeout):
    raise urllib.error.URLError("Temporary failure in name resolution")


@pytest.fixture
def archive(tmp_path, monkeypatch):
    use_tiny_batches(monkeypatch)
    return py_archive(make_batches(PER_BATCH), tmp_path / "src")


def test_download_extracts_and_loads(tmp_path, archive, capsys):
    root = tmp_path / "data"
    urlopen, calls = _serving(archive)
    folder = download_cifar10(root, url=URL, md5=hashlib.md5(archive).hexdigest(), urlopen=urlopen)
    assert calls == [URL]
    assert "downloading cifar-10-python.tar.gz" in capsys.readouterr().err  # tqdm progress
    assert folder == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no scratch left
    data = load_cifar10(root, download=False)
    assert data.source.layout == "py" and data.train_images.shape == (5 * PER_BATCH, 3, 32, 32)


def test_checksum_failure_keeps_nothing(tmp_path, archive):
    root = tmp_path / "data"
    urlopen, _ = _serving(archive)
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32}, expected 0{32}"):
        download_cifar10(root, url=URL, md5="0" * 32, urlopen=urlopen, progress=False)
    assert not root.exists()  # made for the download, removed with it


def test_truncated_download_fails_checksum(tmp_path, archive):
    root = tmp_path / "data"
    urlopen, _ = _serving(archive[: len(archive) // 2])
    with pytest.raises(DataError, match="corrupt or incomplete"):
        download_cifar10(
            root, url=URL, md5=hashlib.md5(archive).hexdigest(), urlopen=urlopen, progress=False
        )
    assert not root.exists()


def test_interrupted_download_leaves_nothing(tmp_path):
    class Dying(_Response):
        def read(self, n=-1):
            raise KeyboardInterrupt

    root = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        download_cifar10(root, urlopen=lambda url, timeout: Dying(b"x"), progress=False)
    assert not root.exists()


def test_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError) as info:
        load_cifar10(root, download=True, urlopen=_offline)
    message = str(info.value)
    assert "could not download" in message and "Temporary failure in name resolution" in message
    for where in ("cifar-10-batches-bin", "cifar-10-batches-py", "cifar-10-python.tar.gz"):
        assert str(root / where) in message
    assert "--data-dir" in message and "BNLAB_DATA" in message
    assert list(root.iterdir()) == []


def test_local_archive_is_extracted(tmp_path, archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive)
    extract_archive(root / "cifar-10-python.tar.gz", root, md5=hashlib.md5(archive).hexdigest())
    assert load_cifar10(root, download=False).source.layout == "py"


def test_local_archive_with_wrong_md5_is_refused(tmp_path, archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(archive)  # not the official bytes
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: MD5 .* not the official"):
        load_cifar10(root, urlopen=_offline)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


@pytest.mark.parametrize(
    ("files", "links"),
    [
        ({"../escaped": b"x"}, None),
        ({"cifar-10-batches-py/../../escaped": b"x"}, None),
        ({"/tmp/escaped-abs": b"x"}, None),
        ({}, {"cifar-10-batches-py/data_batch_1": "/etc/passwd"}),
    ],
)
def test_unsafe_members_are_refused(tmp_path, files, links):
    payload = tar_gz(files, links)
    (tmp_path / "evil.tar.gz").write_bytes(payload)
    root = tmp_path / "a" / "data"
    with pytest.raises(DataError, match=r"evil\.tar\.gz: refusing to extract"):
        extract_archive(tmp_path / "evil.tar.gz", root, md5=hashlib.md5(payload).hexdigest())
    assert not (tmp_path / "a").exists()  # the folders made for it are gone again
    assert not (tmp_path / "a" / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_archive_without_the_batches_folder(tmp_path):
    payload = tar_gz({"something/else": b"x"})
    (tmp_path / "other.tar.gz").write_bytes(payload)
    with pytest.raises(DataError, match="holds no cifar-10-batches-py/"):
        extract_archive(
            tmp_path / "other.tar.gz", tmp_path / "data", md5=hashlib.md5(payload).hexdigest()
        )


def test_corrupt_gzip(tmp_path):
    payload = b"\x1f\x8b\x08\x00garbage"
    (tmp_path / "bad.tar.gz").write_bytes(payload)
    with pytest.raises(DataError, match=r"bad\.tar\.gz: cannot extract"):
        extract_archive(
            tmp_path / "bad.tar.gz", tmp_path / "data", md5=hashlib.md5(payload).hexdigest()
        )
