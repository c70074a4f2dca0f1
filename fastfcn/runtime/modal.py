"""The second input of the two-modality nets (NYUDv2 early and late fusion): parsing and files.

``Segmenter.run(images, depth=depth_maps)`` (nyud-fcn32s-color-d) and
``Segmenter.run(images, hha=hha_images)`` (nyud-fcn32s-color-hha) take the second modality in
the form of the images: one item for one image, a batch for a batch, a list as long as a list,
each of the same H x W as its image.

- depth: (H, W) or (H, W, 1) millimetres, (N, H, W) for a batch: uint16 (the NYUDv2 depth
  PNGs), int16/int32/int64 or float; a file path or a PIL image of a 16-bit / 32-bit / float
  greyscale PNG (modes I;16, I, F). 8-bit depth (uint8, mode L) is refused: it holds no
  millimetres, and its log would be off the trained mean (7.844 = log 2550 mm) silently.
- hha: (H, W, 3) uint8 HHA images (N, H, W, 3 for a batch), or files / PIL images, decoded as
  images are (fastfcn.imageio), channels kept in the file's order.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..imageio import decode_depth, decode_inputs
from .preprocess import Parsed, _as_tensor, _check_device, _check_hwc, _check_image

_DEPTH_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64)  # fmt: skip


def _depth_item(obj, what: str, max_pixels: int | None) -> torch.Tensor:
    t = _as_tensor(decode_depth(obj, what, max_pixels), what)
    _check_device(t, what)
    if t.dtype not in _DEPTH_DTYPES:
        raise InputError(
            f"{what} has dtype {t.dtype}; depth must be millimetres as uint16 (the NYUDv2 PNGs), "
            "int16/int32/int64 or float (8-bit depth holds no millimetres)"
        )
    # torch's uint16 is a storage type with few kernels (no CUDA conversions in every build):
    # widen it here, exactly, before it moves to the device.
    return t.to(torch.int32) if t.dtype == torch.uint16 else t


def _hha_item(obj, what: str, max_pixels: int | None) -> torch.Tensor:
    try:
        t = _as_tensor(decode_inputs(obj, max_pixels), what)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    _check_device(t, what)
    return t


def _depth_shape(t: torch.Tensor, batched: bool, what: str) -> torch.Tensor:
    """(H, W) / (H, W, 1) -> (1, H, W); (N, H, W) / (N, H, W, 1) -> (N, H, W) when batched."""
    dims = 3 if batched else 2
    if t.dim() == dims + 1 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.dim() != dims:
        want = "(N, H, W)" if batched else "(H, W)"
        raise InputError(f"{what} has shape {tuple(t.shape)}; expected one depth map {want} per image")
    return t if batched else t.unsqueeze(0)


def parse_second(value, modality: str, p: Parsed, max_pixels: int | None) -> list[torch.Tensor]:
    """The second modality ``value`` as tensors aligned with ``p.tensors`` (same N, H, W):
    depth (n, H, W) numbers, hha (n, H, W, 3) uint8. Raises InputError when its form or sizes do
    not match the images'."""
    what = f"the {modality} input"
    if p.form == "list":
        if not isinstance(value, (list, tuple)) or len(value) != len(p.tensors):
            got = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
            raise InputError(
                f"the images are a list of {len(p.tensors)}; {what} must be a list as long, got {got}"
            )
        items = [(v, f"item {i} of {what}", False) for i, v in enumerate(value)]
    else:
        if isinstance(value, (list, tuple)):
            raise InputError(f"{what} is a list but the images are one {p.form}; pass it in the same form")
        items = [(value, what, p.form == "batch")]
    out = []
    for (v, name, batched), img in zip(items, p.tensors):
        if modality == "depth":
            t = _depth_shape(_depth_item(v, name, max_pixels), batched, name)
        else:
            t = _hha_item(v, name, max_pixels)
            if batched:
                if t.dim() != 4:
                    raise InputError(f"{name} has shape {tuple(t.shape)}; expected (N, H, W, 3) uint8")
                _check_hwc(t, name)
            else:
                _check_image(t, name)
                t = t.unsqueeze(0)
        want = tuple(img.shape[:3])
        if tuple(t.shape[:3]) != want:
            raise InputError(
                f"{name} is {tuple(t.shape[:3])} (N, H, W) but its images are {want}; every {modality} "
                "map must have the size of its image"
            )
        out.append(t)
    return out


__all__ = ["parse_second"]
