"""CIFAR-10 from its official files, and batches from a split kept on the device."""

from .cifar10 import CIFAR10, DataSource, load_cifar10, read_bin, read_py
from .download import ARCHIVE_MD5, download_cifar10, extract_archive
from .errors import DataError
from .loader import DeviceLoader, epoch_order, normalize
from .paths import ARCHIVE_URL, ENV_VAR, default_data_dir, find_batches, resolve_data_dir

__all__ = [
    "ARCHIVE_MD5",
    "ARCHIVE_URL",
    "CIFAR10",
    "ENV_VAR",
    "DataError",
    "DataSource",
    "DeviceLoader",
    "default_data_dir",
    "download_cifar10",
    "epoch_order",
    "extract_archive",
    "find_batches",
    "load_cifar10",
    "normalize",
    "read_bin",
    "read_py",
    "resolve_data_dir",
]
