"""Pictures of label maps: class colours, overlays, side by side, palette PNGs.

Every function takes numpy arrays: images ``(H, W, 3)`` uint8 RGB, labels ``(H, W)``
integer class ids 0..65535 (``class_ids``), and a palette of ``(R, G, B)`` rows (the
checkpoint's ``palette``); classes beyond the palette take the PASCAL VOC colour map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def palette_bytes(palette, n: int = 256) -> list[int]:
    """A flat ``3 * n`` list (768 entries for PIL): the palette's colours, then the VOC colour map."""
    from .models import voc_palette

    cols = [tuple(int(v) for v in c) for c in (palette if palette is not None else [])][:n]
    cols += voc_palette(n)[len(cols):]
    return [v for c in cols for v in c]


def colour_table(palette, n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8: row k is the colour of class k."""
    return np.asarray(palette_bytes(palette, n), dtype=np.uint8).reshape(-1, 3)


MAX_CLASS_ID = 65535  # the largest id a label PNG holds (16-bit greyscale above 255)


def class_ids(labels) -> np.ndarray:
    """``labels`` as a numpy array of class ids 0..MAX_CLASS_ID (a bool mask as 0 / 1), else
    ValueError. Unchecked, a negative id (an ignore index such as -1) took the colour of the
    table's last row and was saved as 255, an id past 16 bits was saved wrapped (70000 as 4464),
    and a bool or float map stopped with numpy's IndexError."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > MAX_CLASS_ID):
        raise ValueError(f"labels must be class ids 0..{MAX_CLASS_ID}; got values from {labels.min()} to "
                         f"{labels.max()}")  # fmt: skip
    return labels


def colourize(labels: np.ndarray, palette) -> np.ndarray:
    """labels: (H, W) class ids -> (H, W, 3) uint8 class colours."""
    labels = class_ids(labels)
    return colour_table(palette, max(256, int(labels.max(initial=0)) + 1))[labels]


def overlay(
    image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5, skip_background: bool = False
) -> np.ndarray:
    """(H, W, 3) uint8 blend: (1 - alpha) * image + alpha * colour(labels).

    image: (H, W, 3) uint8; labels: (H, W) class ids; palette: (R, G, B) rows, the VOC colour
    map beyond them. skip_background leaves class-0 pixels as they are, so objects stand out.
    """
    labels = class_ids(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(
            f"image {image.shape[:2]} and labels {labels.shape} must have the same height and width"
        )
    n = max(256, int(labels.max(initial=0)) + 1)
    colours = colour_table(palette, n).astype(np.float32)
    a = np.where(labels[..., None] > 0, alpha, 0.0) if skip_background else alpha
    blend = (1 - a) * image.astype(np.float32) + a * colours[labels]
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def side_by_side(image: np.ndarray, labels: np.ndarray, palette, gap: int = 0) -> np.ndarray:
    """(H, 2 * W + gap, 3) uint8: the image, then its class colours (a white gap between)."""
    parts = [image, colourize(labels, palette)]
    if gap:
        parts.insert(1, np.full((image.shape[0], gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def save_labels(labels: np.ndarray, palette, path: str | Path) -> None:
    """labels: (H, W) class ids -> a palette ("P") PNG whose pixel values are the ids; more than
    256 classes do not fit a palette PNG and are written as 16-bit greyscale."""
    from PIL import Image

    labels = class_ids(labels)
    if labels.max(initial=0) > 255:
        Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")
        return
    im = Image.fromarray(labels.astype(np.uint8))
    # putpalette turns the "L" image into "P" keeping its values (convert("P") would requantise).
    im.putpalette(palette_bytes(palette))
    im.save(path, format="PNG", optimize=False)
