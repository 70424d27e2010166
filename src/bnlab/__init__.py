"""bnlab: batch normalization for PyTorch, from first principles."""

from . import functional, nn
from .errors import ChannelMismatchError

__version__ = "0.1.0"

__all__ = ["ChannelMismatchError", "__version__", "functional", "nn"]
