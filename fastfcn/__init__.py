"""fastfcn: an inference engine for fully convolutional segmentation networks.

    seg = fastfcn.Segmenter("fcn8s.safetensors")   # device, backend, precision: auto
    labels = seg.run(frames)                        # (N, H, W) class ids

Public API: Segmenter, Ensemble, load, save, init_from_classifier, export_onnx, models, ops.
"""

from __future__ import annotations

__version__ = "0.1.0"

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
    "Ensemble",
    "FastFCNError",
    "InputError",
    "Segmenter",
    "StreamError",
    "__version__",
    "export_onnx",
    "init_from_classifier",
    "load",
    "models",
    "save",
]


def __getattr__(name: str):
    # Heavy parts (the models, checkpoint I/O, ONNX, the runtime) load on first use, so that
    # `import fastfcn` and `fastfcn --help` do not import torch.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    if name in ("load", "save", "init_from_classifier"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "Segmenter":
        from .runtime import Segmenter

        return Segmenter
    if name == "Ensemble":
        from .ensemble import Ensemble

        return Ensemble
    if name == "ops":
        # import_module, not "from . import ops": that form asks this __getattr__ again.
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module 'fastfcn' has no attribute {name!r}")
