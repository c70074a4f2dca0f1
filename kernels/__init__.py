"""fastfcn.kernels: the fused operations' sources.

``reference`` holds the plain-PyTorch definition of every op (the spec);
the Triton kernels live one op family per module and are imported lazily;
``cpu`` holds the C++ twins bound with pybind11.

Nothing here imports from the rest of fastfcn.
"""
