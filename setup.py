"""Build hook for the C++ twins of the fused ops (fastfcn.kernels.cpu._ext).

Everything else about the package lives in pyproject.toml.
"""

from setuptools import setup

setup()
