"""fastfcn: an inference engine for fully convolutional segmentation networks.

    seg = fastfcn.Segmenter("fcn8s.safetensors")   # device, backend, precision: auto
    labels = seg.run(frames)                        # (N, H, W) class ids

Public API: Segmenter, load, save, export_onnx, models, ops.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import models  # noqa: E402
from .errors import (  # noqa: E402
    BackendUnavailableError,
    CheckpointError,
    FastFCNError,
    InputError,
    StreamError,
)

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "FastFCNError",
    "InputError",
    "Segmenter",
    "StreamError",
    "__version__",
    "export_onnx",
    "load",
    "models",
    "save",
]


def __getattr__(name: str):
    # Heavy parts (checkpoint I/O, ONNX, the runtime) load on first use.
    if name in ("load", "save"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "Segmenter":
        from .runtime import Segmenter

        return Segmenter
    if name == "ops":
        from . import ops

        return ops
    raise AttributeError(f"module 'fastfcn' has no attribute {name!r}")
