"""Test session setup.

Without CUDA, Triton's interpreter runs the kernels on the CPU: TRITON_INTERPRET
must be set before Triton is first imported, so it is set here, at collection.
Tests that need a GPU carry the `gpu` marker and are skipped, with the reason,
where there is none.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The fused CPU backend's convolution choices are measured per run here, never read from or
# written to the user's cache (fastfcn.runtime.cpu_fast).
os.environ["FASTFCN_PLAN_CACHE"] = "off"
# precision="auto" is bf16 on CPUs with native bf16; the tests compare "auto" runs with the fp32
# reference at fp32 tolerances, so they pin it to fp32 (bf16 is tested with precision="bf16").
os.environ["FASTFCN_CPU_PRECISION"] = "fp32"

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
