"""The runtime: Segmenter, preprocessing, the backend registry and the backends (torch, fused,
compile, onnxruntime, openvino).

The names below load on first use: ``import fastfcn.runtime`` costs no torch import until
one of them is used.
"""

from __future__ import annotations

import importlib

__all__ = ["Backend", "BackendSpec", "ExecutionPlan", "Segmenter", "Tolerance", "available_backends",
           "backend_spec", "can_run", "register_backend"]

_WHERE = {"Backend": ".backends", "BackendSpec": ".registry", "ExecutionPlan": ".execution",
          "Segmenter": ".segmenter", "Tolerance": ".registry", "available_backends": ".registry",
          "backend_spec": ".registry", "can_run": ".registry", "register_backend": ".registry"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'fastfcn.runtime' has no attribute {name!r}")
