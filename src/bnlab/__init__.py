"""bnlab: batch normalization for PyTorch, from first principles."""

from . import functional, nn, toolkit
from .errors import ChannelMismatchError, InputRankError
from .toolkit import diagnose, fold, format_diagnosis, precise_bn

__version__ = "0.1.0"

__all__ = [
    "ChannelMismatchError",
    "InputRankError",
    "__version__",
    "diagnose",
    "fold",
    "format_diagnosis",
    "functional",
    "nn",
    "precise_bn",
    "toolkit",
]
