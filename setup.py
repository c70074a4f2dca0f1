"""Build hook for the C++ twins of the fused ops (fastfcn.kernels.cpu._ext).

Everything else about the package lives in pyproject.toml. The extension needs
pybind11 and a C++17 compiler, never torch (tensors cross as raw addresses).
It is optional: without a compiler the install still succeeds, and
fastfcn.kernels.cpu.available() is False. OpenMP is used where the compiler
accepts -fopenmp; no -march flags, so a built wheel runs on any x86-64 (an
AVX2 clone of the hot loop measured no faster, see kernels/cpu/fcn_ops.cpp).
"""

from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; without it, build no extension
    Pybind11Extension = None

HERE = os.path.dirname(os.path.abspath(__file__))


class OptionalBuildExt(build_ext):
    """Build the extension if possible: first with OpenMP, then without, else skip with a warning."""

    def build_extension(self, ext):
        openmp = [] if sys.platform == "win32" else ["-fopenmp"]
        if openmp:
            ext.extra_compile_args = list(ext.extra_compile_args) + openmp
            ext.extra_link_args = list(ext.extra_link_args) + openmp
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                self.warn(f"building {ext.name} with OpenMP failed ({exc}); retrying single-threaded")
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in openmp]
                ext.extra_link_args = [a for a in ext.extra_link_args if a not in openmp]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self.warn(
                f"could not build {ext.name} ({exc}); fastfcn installs without its C++ CPU kernels "
                "and falls back to the plain-PyTorch reference on the CPU"
            )

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - e.g. no compiler at all
            self.warn(f"C++ extensions skipped: {exc}")


ext_modules = []
if Pybind11Extension is not None:
    sources = sorted(os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, "kernels", "cpu", "*.cpp")))
    ext_modules.append(
        Pybind11Extension(
            "fastfcn.kernels.cpu._ext",
            sources,
            include_dirs=[os.path.join("kernels", "cpu")],
            cxx_std=17,
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
