"""The one exception the data package raises."""


class DataError(RuntimeError):
    """CIFAR-10 is missing, corrupt, unsafe to load, or could not be downloaded.

    The message always names the file or folder involved and, where the data
    is absent, how to provide it; the CLI prints it as is.
    """
