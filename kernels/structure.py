"""The small rules every implementation of the fused ops shares, each defined once here
(kernels import nothing of fastfcn, so this module is the lowest layer that needs them):
pooled sizes, the labels dtype, the weight-kind and output codes shared with the C++ twins
(``kernels/cpu/fcn_ops.h``) and the Triton kernels, and the structure of upsampling weights,
detected once per weight tensor.

The reference nets initialise every Deconvolution bilinear on the diagonal
(class c only feeds class c) and keep it fixed: 4 taps per output pixel and
class instead of C * (k/s)^2 (FCN-8s upscore8 at 500x500: 27 vs 553 MMAC).
A learned but still diagonal weight is depthwise; anything else is dense.
"""

from __future__ import annotations

import torch

KINDS = ("bilinear", "depthwise", "dense")
OUTPUTS = ("logits", "labels", "probs")

# Codes passed to the kernels. They must equal ``enum Kind`` and ``enum Output`` in
# kernels/cpu/fcn_ops.h and the KIND / OUTPUT constexprs of kernels/upsample.py.
KIND_CODES = {"bilinear": 0, "depthwise": 1, "dense": 2}
OUT_LOGITS, OUT_LABELS_U8, OUT_LABELS_I32, OUT_PROBS = 0, 1, 2, 3


def labels_dtype(num_classes: int) -> torch.dtype:
    """The dtype of class-id maps: uint8 when C <= 256 (ids 0..255), else int32."""
    return torch.uint8 if num_classes <= 256 else torch.int32


def check_output(output: str) -> None:
    """Raise ValueError unless ``output`` is one of OUTPUTS."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")


def output_code(output: str, num_classes: int) -> int:
    """The kernels' code for ``output`` ("logits", "labels" or "probs") at C classes; labels
    carry their width (OUT_LABELS_U8 or OUT_LABELS_I32, see labels_dtype)."""
    if output == "logits":
        return OUT_LOGITS
    if output == "labels":
        return OUT_LABELS_U8 if labels_dtype(num_classes) == torch.uint8 else OUT_LABELS_I32
    if output == "probs":
        return OUT_PROBS
    raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")


def check_switch_window(kernel: int, stride: int) -> None:
    """Raise ValueError unless kernel, stride >= 1 and a switch (dy * kernel + dx, the window
    position of the maximum) fits the one byte max_pool2d_with_switches stores per window."""
    if kernel < 1 or stride < 1 or kernel * kernel > 256:
        raise ValueError(
            f"need kernel >= 1, stride >= 1 and kernel*kernel <= 256 (one byte per switch); "
            f"got kernel={kernel}, stride={stride}"
        )


def pool_out_size(size: int, kernel: int, stride: int, ceil_mode: bool = True) -> int:
    """Max pooling's output size along one dimension, padding 0, dilation 1: torch's
    pooling_output_shape. ceil_mode=True is Caffe's rounding, except that a last window
    starting past the input is dropped (as torch does). May be < 1: callers decide."""
    out = (size - kernel + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size:
        out -= 1
    return out


def bilinear_1d(k: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The 1-D bilinear filter of size k (Caffe/FCN's upsample_filt): (k,)."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    i = torch.arange(k, dtype=torch.float64, device=device)
    return (1 - (i - center).abs() / factor).to(dtype)


def bilinear_kernel(k: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """filt[i, j] = (1 - |i - center| / factor) * (1 - |j - center| / factor): (k, k)."""
    f = bilinear_1d(k, torch.float64, device)
    return torch.outer(f, f).to(dtype)


def bilinear_weight(channels: int, k: int, depthwise: bool = False, dtype=torch.float32) -> torch.Tensor:
    """The reference nets' upsampling weight: bilinear on the diagonal, zero elsewhere.

    Returns (C, C, k, k), or (C, 1, k, k) when depthwise.
    """
    filt = bilinear_kernel(k, dtype)
    if depthwise:
        return filt.expand(channels, 1, k, k).clone()
    w = torch.zeros(channels, channels, k, k, dtype=dtype)
    idx = torch.arange(channels)
    w[idx, idx] = filt
    return w


def diagonal(weight: torch.Tensor) -> torch.Tensor:
    """The per-class filters of a (C, C, k, k) or (C, 1, k, k) weight: (C, k, k)."""
    if weight.shape[1] == 1:
        return weight[:, 0]
    idx = torch.arange(weight.shape[0], device=weight.device)
    return weight[idx, idx]


def weight_kind(weight: torch.Tensor) -> str:
    """'bilinear', 'depthwise' or 'dense' for a (C, C, k, k) or (C, 1, k, k) weight.

    'bilinear' means: zero off the diagonal and every diagonal filter equal to
    bilinear_kernel(k) within float32 rounding (rtol 1e-6), so kernels may use
    the formula's taps. 'depthwise' means zero off the diagonal.
    """
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[1] not in (1, weight.shape[0]):
        raise ValueError(f"upsampling weight must be (C, C, k, k) or (C, 1, k, k); got {tuple(weight.shape)}")
    w = weight.detach().float()
    c, k = w.shape[0], w.shape[2]
    if w.shape[1] == c and c > 1:
        off = w.clone()
        idx = torch.arange(c, device=w.device)
        off[idx, idx] = 0
        if bool(off.any()):
            return "dense"
    d = diagonal(w)
    ref = bilinear_kernel(k, torch.float32, w.device).expand_as(d)
    if torch.allclose(d, ref, rtol=1e-6, atol=1e-7):
        return "bilinear"
    return "depthwise"
