"""Exception types. Every message says what was wrong and what was expected."""


class FastFCNError(Exception):
    """Base class of fastfcn's own errors."""


class CheckpointError(FastFCNError, ValueError):
    """A checkpoint file could not be read or does not fit the requested model."""


class InputError(FastFCNError, ValueError):
    """Input data (images, tensors, sizes) is not what the call expects."""


class BackendUnavailableError(FastFCNError, RuntimeError):
    """The requested backend, device or precision cannot run on this machine."""
