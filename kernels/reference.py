"""Plain-PyTorch definitions of every fused op: the spec the kernels are tested against.

Built only from torch's own ops (conv_transpose2d, slicing, add, argmax, softmax,
max_pool2d, max_unpool2d), so that the same code is the numerical reference for
every backend and the graph used for ONNX export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .structure import OUTPUTS as OUTPUTS  # re-exported: code outside kernels imports it from here
from .structure import check_output, check_switch_window, labels_dtype


def _groups(x: torch.Tensor, weight: torch.Tensor) -> int:
    """1 for a full (C, C, k, k) weight, C for a depthwise (C, 1, k, k) one."""
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"upsampling weight must be (C, C, k, k) or (C, 1, k, k) with C={c} "
            f"matching the input's channels; got {tuple(weight.shape)}"
        )
    if weight.shape[1] == c:
        return 1
    if weight.shape[1] == 1:
        return c
    raise ValueError(
        f"upsampling weight must be (C, C, k, k) or (C, 1, k, k) with C={c}; got {tuple(weight.shape)}"
    )


def _side(v) -> int:
    """int(v), except that a symbolic size (torch.export's SymInt) stays symbolic: int() would
    specialise it to the traced value and freeze an exported graph's height and width."""
    return v if isinstance(v, torch.SymInt) else int(v)


def upsample(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """conv_transpose2d(x, weight, stride) without bias or padding. x: (N, C, h, w)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, h, w); got shape {tuple(x.shape)}")
    return F.conv_transpose2d(x, weight.to(x.dtype), stride=int(stride), groups=_groups(x, weight))


def crop(t: torch.Tensor, offset: int, size: tuple[int, int]) -> torch.Tensor:
    """t[:, :, offset:offset+H, offset:offset+W], refusing a window that does not fit."""
    h, w = _side(size[0]), _side(size[1])
    if offset < 0 or offset + h > t.shape[-2] or offset + w > t.shape[-1]:
        raise ValueError(
            f"crop of {h}x{w} at offset {offset} does not fit a {t.shape[-2]}x{t.shape[-1]} map"
        )
    return t[:, :, offset : offset + h, offset : offset + w]


def upsample_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    skip: torch.Tensor | None = None,
    offset: int = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """conv_transpose2d(x, weight, stride) + scale * skip cropped at `offset` to its size.

    x: (N, C, h, w); weight: (C, C, k, k) or (C, 1, k, k); skip: (N, C, Hs, Ws).
    Returns (N, C, Ho, Wo) with Ho = (h - 1) * stride + k (FCN's fuse_pool4 / fuse_pool3).
    """
    y = upsample(x, weight, stride)
    if skip is None:
        return y
    if skip.dim() != 4 or skip.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"skip must be (N, C, Hs, Ws) = ({y.shape[0]}, {y.shape[1]}, ...); got {tuple(skip.shape)}"
        )
    s = crop(skip, offset, y.shape[-2:]).to(y.dtype)
    if scale != 1.0:
        s = s * scale
    return y + s


def finish(y: torch.Tensor, output: str) -> torch.Tensor:
    """Turn (N, C, H, W) logits into the requested output."""
    check_output(output)
    if output == "logits":
        return y
    if output == "labels":
        return y.argmax(1).to(labels_dtype(y.shape[1]))
    return torch.softmax(y.float(), 1).to(y.dtype)


def upsample_crop(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    offset: int,
    size: tuple[int, int],
    output: str = "logits",
) -> torch.Tensor:
    """conv_transpose2d cropped to `size` from `offset`, as logits, labels or probs.

    x: (N, C, h, w) -> logits/probs (N, C, H, W) or labels (N, H, W)
    (uint8 when C <= 256, else int32; ties go to the lowest class index).
    """
    check_output(output)
    return finish(crop(upsample(x, weight, stride), offset, size), output)


def fcn_head(
    score: torch.Tensor,
    skips: list[torch.Tensor],
    weights: list[torch.Tensor],
    strides: list[int],
    offsets: list[int],
    scales: list[float],
    size: tuple[int, int],
    output: str = "logits",
) -> torch.Tensor:
    """A whole FCN head: upsample_add once per skip, then upsample_crop.

    score: (N, C, h, w), the coarsest score map; skips[i]: (N, C, Hi, Wi).
    weights/strides/offsets have len(skips) + 1 entries (the last is the final
    stage, whose offset is the final crop); scales has len(skips) entries.
    """
    n = len(skips)
    if not (len(weights) == len(strides) == len(offsets) == n + 1 and len(scales) == n):
        raise ValueError(
            f"a head with {n} skips needs {n + 1} weights, strides and offsets and {n} scales; got "
            f"{len(weights)}, {len(strides)}, {len(offsets)} and {len(scales)}"
        )
    y = score
    for i in range(n):
        y = upsample_add(y, weights[i], strides[i], skips[i], offsets[i], scales[i])
    return upsample_crop(y, weights[n], strides[n], offsets[n], size, output)


def max_pool2d_with_switches(
    x: torch.Tensor, kernel: int = 2, stride: int = 2, ceil_mode: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling that also returns each window's switch as one byte.

    x: (N, C, H, W) -> values (N, C, h, w), switches (N, C, h, w) uint8 holding
    dy * kernel + dx, the position of the (first) maximum inside its window.
    """
    check_switch_window(kernel, stride)
    values, idx = F.max_pool2d(x, kernel, stride, ceil_mode=ceil_mode, return_indices=True)
    w = x.shape[-1]
    oy = torch.arange(values.shape[-2], device=x.device).view(-1, 1) * stride
    ox = torch.arange(values.shape[-1], device=x.device).view(1, -1) * stride
    dy = idx // w - oy
    dx = idx % w - ox
    return values, (dy * kernel + dx).to(torch.uint8)


def switches_to_indices(
    switches: torch.Tensor, input_width: int, kernel: int = 2, stride: int = 2
) -> torch.Tensor:
    """Compact uint8 switches -> PyTorch's int64 indices, flat within each (N, C) plane."""
    s = switches.long()
    oy = torch.arange(s.shape[-2], device=s.device).view(-1, 1) * stride
    ox = torch.arange(s.shape[-1], device=s.device).view(1, -1) * stride
    return (oy + s // kernel) * input_width + ox + s % kernel


def max_unpool2d(
    x: torch.Tensor,
    indices: torch.Tensor,
    output_size: tuple[int, int],
    kernel: int = 2,
    stride: int = 2,
    relu: bool = False,
) -> torch.Tensor:
    """torch.nn.functional.max_unpool2d, optionally on relu(x).

    x: (N, C, h, w); indices: (N, C, h, w), int64 flat within each plane (PyTorch's
    convention) or uint8 compact switches; output_size: (H, W). Returns (N, C, H, W).
    """
    if indices.shape != x.shape:
        raise ValueError(f"indices must have the shape of x {tuple(x.shape)}; got {tuple(indices.shape)}")
    h, w = _side(output_size[-2]), _side(output_size[-1])
    if indices.dtype == torch.uint8:
        indices = switches_to_indices(indices, w, kernel, stride)
    if relu:
        x = torch.relu(x)
    return F.max_unpool2d(x, indices, kernel, stride, output_size=(h, w))
