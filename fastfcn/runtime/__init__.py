"""The runtime: Segmenter, preprocessing and backends (torch, fused, compile, onnxruntime)."""

from .backends import Backend, available_backends, register_backend
from .segmenter import Segmenter

__all__ = ["Backend", "Segmenter", "available_backends", "register_backend"]
