"""Exceptions bnlab raises where torch's own are unclear."""


class ChannelMismatchError(ValueError, RuntimeError):
    """An input's channel count or a parameter/buffer's size disagrees with num_features.

    torch raises a ``RuntimeError`` from deep inside (or, with neither affine
    parameters nor running buffers, silently accepts the input). bnlab always
    raises this one, deriving from both ``ValueError`` and ``RuntimeError`` so
    code written to catch either keeps working.
    """


class InputRankError(ValueError, RuntimeError):
    """An input with no channel dimension (0-d, or 1-d and not empty) given to batch norm.

    torch's functional batch norm raises a ``RuntimeError`` about running_mean's
    size for it (torch.nn's modules check the rank first, with a ``ValueError``,
    and so do bnlab's). bnlab names the shape it needs, deriving from both, as
    :class:`ChannelMismatchError` does.
    """
