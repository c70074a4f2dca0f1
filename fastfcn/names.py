"""The names the CLI offers as choices, without importing torch.

``fastfcn --help`` and every subcommand's ``--help`` build their ``choices`` from these
tuples, so asking for help costs no torch import (1.35 s before). The backends and precisions
come from the backend registry (torch-free); ARCHS mirrors a registry that needs torch:
tests/test_everyday.py checks that they agree, so adding an architecture without adding its
name here fails there.
"""

from __future__ import annotations

import argparse
import re

from .runtime import registry

# The built-in backends (register_backend adds more at run time, for the library, not the CLI).
BACKENDS = registry.builtin_backends()
PRECISIONS = registry.PRECISIONS
# fastfcn.models.available()
ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce", "fcn-alexnet", "deconvnet",
         "dilated-frontend", "dilated-context", "fcn-googlenet",
         "siftflow-fcn32s", "siftflow-fcn16s", "siftflow-fcn8s",
         "pascalcontext-fcn32s", "pascalcontext-fcn16s", "pascalcontext-fcn8s",
         "nyud-fcn32s-color", "nyud-fcn32s-hha", "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha")

# The largest H * W a Segmenter accepts per image (per tile when tiling) unless told otherwise.
DEFAULT_MAX_PIXELS = 4096 * 4096

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_arg(value: str) -> str:
    """argparse ``type`` of ``--device``: a malformed device is refused while parsing (whether it
    exists on this machine is checked when the model loads)."""
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; expected auto, cpu, cuda or cuda:N")
    return value
