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

import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..imageio import IMAGE_SUFFIXES, check_regular_file, read_image
from .preprocess import Parsed, _as_tensor, _check_device, _check_hwc, _check_image

_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_DEPTH_DTYPES = (torch.uint16, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64)  # fmt: skip


def read_depth(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """(H, W) float32 depth of a single-channel 16-bit / 32-bit / float image file (NYUDv2's
    depth PNGs: uint16 millimetres), values as stored. InputError (starting with the path)
    for another mode, an unreadable file or one over ``max_pixels``."""
    check_regular_file(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return _depth_from_pil(im, max_pixels)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"{path}: not a readable depth image ({type(e).__name__}: {e})") from None


def _depth_from_pil(im, max_pixels: int | None) -> np.ndarray:
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(f"the depth image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if im.mode not in _DEPTH_MODES:
        raise InputError(
            f"a depth image must be one channel of 16 or 32 bits (millimetres; PIL modes "
            f"{', '.join(_DEPTH_MODES)}); got mode {im.mode!r}"
        )
    return np.asarray(im, dtype=np.float32)


def _is_pil(obj) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)


def _depth_item(obj, what: str, max_pixels: int | None) -> torch.Tensor:
    if isinstance(obj, (str, os.PathLike)):
        obj = read_depth(obj, max_pixels)
    elif _is_pil(obj):
        try:
            obj = _depth_from_pil(obj, max_pixels)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
    t = _as_tensor(obj, what)
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
    from .segmenter import _decode_one

    try:
        t = _as_tensor(_decode_one(obj, max_pixels), what)
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


def match_file(image: Path, base: Path, folder: Path, modality: str) -> Path:
    """The file of ``folder`` that holds ``image``'s second modality: the same path relative to
    the image's input folder ``base``, with any image suffix (NYUDv2: images/img_5001.png ->
    depth/img_5001.png, hha/img_5001.png). InputError when there is none or several."""
    rel = Path(os.path.relpath(image, base))
    where = folder / rel.parent
    found = []
    if where.is_dir():
        found = sorted(p for p in where.iterdir() if p.stem == rel.stem and p.is_file()
                       and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
    if len(found) != 1:
        what = f"several ({', '.join(p.name for p in found)})" if found else "none"
        raise InputError(
            f"{image}: its {modality} file must be {where / rel.stem}.<png|tif|...>, one file named as the "
            f"image; found {what}"
        )
    return found[0]


def read_second(path: Path, modality: str, max_pixels: int | None):
    """A second-modality file: depth (H, W) float32 millimetres or an HHA (H, W, 3) uint8 image."""
    return read_depth(path, max_pixels) if modality == "depth" else read_image(path, max_pixels)


__all__ = ["match_file", "parse_second", "read_depth", "read_second"]
