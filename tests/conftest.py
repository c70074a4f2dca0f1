"""Test session setup.

Without CUDA, Triton's interpreter runs the kernels on the CPU: TRITON_INTERPRET
must be set before Triton is first imported, so it is set here, at collection.
Tests that need a GPU carry the `gpu` marker and are skipped, with the reason,
where there is none. With FASTFCN_REQUIRE_CPP=1 (set by `make test` and CI) a missing C++
extension ends the session with an error instead of skipping the tests that need it.
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


def pytest_sessionstart(session):
    if os.environ.get("FASTFCN_REQUIRE_CPP") == "1":
        from helpers import cpu_twin_available, cpu_twin_problem

        if not cpu_twin_available():
            raise pytest.UsageError(
                f"FASTFCN_REQUIRE_CPP=1 but the C++ kernels are not available ({cpu_twin_problem()}); "
                "install a C++ compiler and reinstall (pip install -e .), or unset FASTFCN_REQUIRE_CPP"
            )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """arch -> (model, path of its dynamic fp32 ONNX export), exported on first use and shared
    by every test file (an export costs 5-30 s on 2 cores: torch.export on symbolic shapes).
    The model is helpers.export_model(arch); tests must not modify it or the file."""
    from helpers import export_model

    from fastfcn.export import export_onnx

    cache: dict = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(arch):
        if arch not in cache:
            m = export_model(arch)
            cache[arch] = (m, export_onnx(m, root / f"{arch}.onnx"))
        return cache[arch]

    return get
