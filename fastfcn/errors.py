"""Exception types. Every message says what was wrong and what was expected."""


class FastFCNError(Exception):
    """Base class of fastfcn's own errors."""


class CheckpointError(FastFCNError, ValueError):
    """A checkpoint file could not be read or does not fit the requested model."""


class InputError(FastFCNError, ValueError):
    """Input data (images, tensors, sizes) is not what the call expects."""


class BackendUnavailableError(FastFCNError, RuntimeError):
    """The requested backend, device or precision cannot run on this machine."""


class StreamError(FastFCNError, RuntimeError):
    """A frame of a stream could not be read or segmented. ``index``: the frame (for a
    failed batch, its first frame; -1 when no frame is to blame); the original
    exception is the ``__cause__``."""

    def __init__(self, message: str, index: int = -1):
        super().__init__(message)
        self.index = index
