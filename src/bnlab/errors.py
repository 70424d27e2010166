"""Exceptions bnlab raises where torch's own are unclear."""


class ChannelMismatchError(ValueError, RuntimeError):
    """An input's channel count or a parameter/buffer's size disagrees with num_features.

    torch raises a ``RuntimeError`` from deep inside (or, with neither affine
    parameters nor running buffers, silently accepts the input). bnlab always
    raises this one, deriving from both ``ValueError`` and ``RuntimeError`` so
    code written to catch either keeps working.
    """
