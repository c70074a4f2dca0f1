"""Image files to ``(H, W, 3)`` uint8 RGB, safely.

What ``read_image`` guarantees, and why:

- Only regular files are opened: a FIFO or a device named ``x.png`` would block ``open()``
  forever (a FIFO) or read without end (``/dev/zero``), so they are refused from ``stat``.
- The size is checked from the header before any pixel is decoded: a 65-byte PNG may claim
  20000 x 20000 (1.2 GB as RGB). Pillow reads the header lazily in ``Image.open``, so
  ``max_pixels`` is checked there; Pillow's own decompression-bomb error (above 2 x
  ``Image.MAX_IMAGE_PIXELS``, 179 M pixels by default) becomes the same one-line InputError.
- EXIF orientation is applied, so labels line up with the image as every viewer shows it.
  Only the Orientation tag is read (``upright``): ``ImageOps.exif_transpose`` also writes the
  EXIF back, which fails (struct.error, TypeError) on a tag stored with another type than the
  standard's, e.g. an ASCII XResolution, though the pixels and the orientation read fine.
- Modes are converted by their meaning, not by Pillow's clipping: 16-bit greyscale
  ("I;16*", and "I", which Pillow uses for 16-bit PNGs) is scaled 0..65535 -> 0..255
  (``convert("RGB")`` clips instead, so a 16-bit photo came out all white); "L", "1", "P"
  (through its palette), "CMYK", "YCbCr" go through Pillow's conversions; alpha is dropped
  ("RGBA", "LA", "PA", palette transparency): the stored colours are what the camera or
  renderer produced, and compositing would invent a background colour the model never saw.
  Float ("F") images have no defined range and are refused.
- Truncated or corrupt files raise InputError naming the file (never a partial image:
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off).
"""

from __future__ import annotations

import os
import stat
import sys

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Depth maps (NYUDv2: uint16 millimetres) keep their values: one channel, 16 or 32 bits or float.
_DEPTH_MODES = (*_SIXTEEN_BIT, "F")


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise InputError unless ``path`` is a regular file (following symlinks), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")  # fmt: skip
        raise InputError(f"{path}: is {kind}; expected an image file")


def to_rgb(im) -> np.ndarray:
    """A loaded PIL image -> (H, W, 3) uint8 RGB (see the module docstring for each mode)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.int64)
        # Round to nearest: 65535 -> 255, 32896 -> 128, 0 -> 0 (v * 255 / 65535 = v / 257).
        g = ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "F":
        raise InputError("32-bit float images have no defined value range; expected 8- or 16-bit images")
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")  # through the palette (and its transparency), then drop alpha
    try:
        rgb = im.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert an image of mode {mode!r} to RGB ({e})") from None
    return np.array(rgb, dtype=np.uint8)


# EXIF Orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = 0x0112
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


def upright(im):
    """A loaded PIL image turned as its EXIF Orientation says (itself when there is none): the
    tag is only read, the rest of the EXIF is neither parsed further nor written back."""
    from PIL import Image

    orientation = im.getexif().get(_ORIENTATION)
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return im if method is None else im.transpose(Image.Transpose[method])


def from_pil(im, max_pixels: int | None = None) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB, as ``read_image`` decodes files: the size
    checked against ``max_pixels`` before decoding (an image from ``Image.open`` is still lazy),
    EXIF orientation applied, modes converted as the module docstring says."""
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(
            f"the image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(checked from its header, nothing decoded); resize it, raise max_pixels (--max-pixels) "
            "or segment it in tiles (tile=, --tile)"
        )
    im.load()
    return to_rgb(upright(im))


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image file ``path``, EXIF orientation applied.

    max_pixels: refuse (InputError, from the header, before decoding) images with more than
    this many pixels. Every failure is an InputError whose message starts with the path.
    """
    check_regular_file(path)
    return _decode(path, path, max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """``read_image`` for the bytes of an image file (read from any file system); ``name``
    (the file's path or URI) starts every error message."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source, path, max_pixels: int | None) -> np.ndarray:
    """source: a path or a binary file object; path: what the messages call it."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; max_pixels decides here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                return from_pil(im, max_pixels)
    except InputError as e:
        msg = str(e)
        raise InputError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused from its header, nothing decoded ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _is_pil(obj) -> bool:
    # PIL is imported only if the caller already has PIL images: no import cost otherwise.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(obj, pil.Image)


def _decode_object(obj, read, convert, what: str, max_pixels: int | None):
    """A path through ``read``, a PIL image through ``convert`` (errors are InputError starting
    with ``what``), anything else unchanged: the one rule for images and depth maps alike."""
    if isinstance(obj, (str, os.PathLike)):
        return read(obj, max_pixels)
    if _is_pil(obj):
        try:
            return convert(obj, max_pixels)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise InputError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    return obj


def _decode_one(obj, max_pixels: int | None):
    return _decode_object(obj, read_image, from_pil, "the PIL image", max_pixels)


def decode_inputs(batch, max_pixels: int | None = None):
    """Image paths and PIL images (alone or in a list) -> (H, W, 3) uint8 arrays, decoded as
    ``read_image`` does; other items (arrays, tensors) unchanged. What ``Segmenter.run`` accepts."""
    if isinstance(batch, (list, tuple)):
        return [_decode_one(b, max_pixels) for b in batch]
    return _decode_one(batch, max_pixels)


def read_depth(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """(H, W) float32 depth of a single-channel 16-bit / 32-bit / float image file (NYUDv2's
    depth PNGs: uint16 millimetres), values as stored. InputError (starting with the path)
    for another mode, an unreadable file or one over ``max_pixels``."""
    check_regular_file(path)
    return _decode_depth(path, path, max_pixels)


def decode_depth_bytes(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
    """``read_depth`` for the bytes of a depth file (read from any file system); ``name`` (its
    path or URI) starts every error message."""
    import io

    return _decode_depth(io.BytesIO(data), name, max_pixels)


def _decode_depth(source, path, max_pixels: int | None) -> np.ndarray:
    """source: a path or a binary file object; path: what the messages call it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            return depth_from_pil(im, max_pixels)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise InputError(f"{path}: not a readable depth image ({type(e).__name__}: {e})") from None


def read_second(path: str | os.PathLike, modality: str, max_pixels: int | None = None) -> np.ndarray:
    """A second-modality file of the NYUDv2 fusion nets: depth (H, W) float32 millimetres
    (``read_depth``) or an HHA (H, W, 3) uint8 image (``read_image``)."""
    return read_depth(path, max_pixels) if modality == "depth" else read_image(path, max_pixels)


def decode_second(data: bytes, name: str, modality: str, max_pixels: int | None = None) -> np.ndarray:
    """``read_second`` for the bytes of the file ``name`` (a path or URI, read elsewhere)."""
    if modality == "depth":
        return decode_depth_bytes(data, name, max_pixels)
    return decode_image(data, name, max_pixels)


def decode_depth(obj, what: str, max_pixels: int | None = None):
    """A depth file path or PIL depth image -> (H, W) float32 (read_depth / depth_from_pil); any
    other object unchanged. Errors are InputError starting with ``what`` (or the path)."""
    return _decode_object(obj, read_depth, depth_from_pil, what, max_pixels)


def depth_from_pil(im, max_pixels: int | None = None) -> np.ndarray:
    """A PIL depth image (one channel of 16 / 32 bits or float) -> (H, W) float32, values as stored."""
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(f"the depth image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
    if im.mode not in _DEPTH_MODES:
        raise InputError(
            f"a depth image must be one channel of 16 or 32 bits (millimetres; PIL modes "
            f"{', '.join(_DEPTH_MODES)}); got mode {im.mode!r}"
        )
    return np.asarray(im, dtype=np.float32)
