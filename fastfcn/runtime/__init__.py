"""The runtime: Segmenter, preprocessing and backends (torch, fused, compile, onnxruntime).

The names below load on first use: ``import fastfcn.runtime`` costs no torch import until
one of them is used.
"""

from __future__ import annotations

import importlib

__all__ = ["Backend", "Segmenter", "available_backends", "register_backend"]

_WHERE = {"Backend": ".backends", "available_backends": ".backends", "register_backend": ".backends",
          "Segmenter": ".segmenter"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'fastfcn.runtime' has no attribute {name!r}")
