"""Tiled inference: one large image segmented as overlapping tiles of equal size.

    seg.run(image, tile=(1024, 1024), overlap=128)   # any size; memory bounded by the tile

Tiles of ``(th, tw)`` pixels (clamped to the image) start every ``th - overlap`` rows and
``tw - overlap`` columns, the last row and column moved back so that they end at the image's
edge; all tiles therefore have one size and run in batches through the Segmenter's normal
path (``max_pixels`` applies per tile).

Blending: centre crop, not averaging. Each output pixel takes its result from the one tile in
which it lies farthest from a tile edge: neighbouring tiles split their overlap in the middle.
Why: an FCN's prediction is worst at a tile's edge, where its receptive field (hundreds of
pixels for VGG16) is cut off and replaced by padding; averaging (a linear ramp) mixes that
bad prediction into every overlap pixel, while the centre crop uses only predictions with at
least ``overlap / 2`` pixels of real context on each cut side. It also needs no accumulator:
labels are written straight into the preallocated ``(H, W)`` result from each tile's own
labels (the backend's fused argmax), so memory is one batch of tiles (C x tile area x batch
for the logits inside the backend) plus the uint8 output, never the full C x H x W logits
(8.4 GB in float32 for 21 classes at 10,000 x 10,000). For output "logits" / "probs" the
result itself is (C, H, W): the caller asked for it.

Agreement with untiled inference is measured per family by benchmarks/tiling_agreement.py
(results in the README).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InputError

# Tiles per backend call. Bounds memory (C x tile area x TILE_BATCH floats inside the backend)
# while amortising per-call overhead.
TILE_BATCH = 4


@dataclass(frozen=True)
class Tile:
    """One tile: it reads rows ``y:y+h`` and columns ``x:x+w`` of the image and owns (writes)
    rows ``y0:y1`` and columns ``x0:x1`` of the result (absolute coordinates)."""

    y: int
    x: int
    h: int
    w: int
    y0: int
    y1: int
    x0: int
    x1: int


# The overlap when none is given: 64 pixels (32 of real context on each cut side), at most half
# the tile's smaller side. See the README's table for what it buys per family.
DEFAULT_OVERLAP = 64


def check_tiling(tile, overlap=None) -> tuple[tuple[int, int], int]:
    """Validate ``tile`` ((h, w) or one int for a square) and ``overlap`` (None: DEFAULT_OVERLAP,
    at most half the tile's smaller side); returns ((h, w), overlap)."""
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile, tile)
    if (not isinstance(tile, (tuple, list)) or len(tile) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tile)):
        raise InputError(f"tile must be (height, width), two ints >= 1; got {tile!r}")
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, min(tile) // 2)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InputError(f"overlap must be an int >= 0 (pixels); got {overlap!r}")
    if overlap >= min(tile):
        raise InputError(
            f"overlap {overlap} must be smaller than the tile's sides {tuple(tile)}; "
            "tiles would not advance"
        )
    return (int(tile[0]), int(tile[1])), int(overlap)


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Along one axis of ``size`` pixels: ``[(start, own_lo, own_hi)]`` for tiles of
    ``min(tile, size)`` pixels. Starts advance by ``tile - overlap``; the last one is moved back
    to end at the edge. Each tile owns from the middle of its overlap with the previous tile to
    the middle of its overlap with the next, so the owned ranges partition ``0..size``."""
    t = min(tile, size)
    if t == size:
        return [(0, 0, size)]
    stride = tile - overlap
    starts = list(range(0, size - t, stride)) + [size - t]
    bounds = [0] + [(starts[i + 1] + starts[i] + t) // 2 for i in range(len(starts) - 1)] + [size]
    return [(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


def plan(h: int, w: int, tile: tuple[int, int], overlap: int) -> list[Tile]:
    """The tiles covering an ``h`` x ``w`` image, row by row."""
    rows, cols = spans(h, tile[0], overlap), spans(w, tile[1], overlap)
    th, tw = min(tile[0], h), min(tile[1], w)
    return [Tile(y, x, th, tw, y0, y1, x0, x1) for y, y0, y1 in rows for x, x0, x1 in cols]


def run_tiled(
    run: Callable[[torch.Tensor, str, str], torch.Tensor],
    image: torch.Tensor,
    kind: str,
    output: str,
    tile: tuple[int, int],
    overlap: int,
) -> torch.Tensor:
    """Segment one image in tiles.

    run(tiles, kind, output): the Segmenter's batch path; tiles uint8 (B, th, tw, 3) (kind "u8")
    or float (B, 3, th, tw) (kind "float") -> labels (B, th, tw) or (B, C, th, tw).
    image: uint8 (1, H, W, 3) or float (1, 3, H, W).
    Returns labels (H, W) or logits / probs (C, H, W), on the device ``run`` returns.
    """
    u8 = kind == "u8"
    h, w = (image.shape[1], image.shape[2]) if u8 else (image.shape[2], image.shape[3])
    tiles = plan(h, w, tile, overlap)
    result = None
    for i in range(0, len(tiles), TILE_BATCH):
        group = tiles[i:i + TILE_BATCH]
        if u8:
            x = torch.cat([image[:, t.y:t.y + t.h, t.x:t.x + t.w] for t in group])
        else:
            x = torch.cat([image[:, :, t.y:t.y + t.h, t.x:t.x + t.w] for t in group])
        out = run(x, kind, output)
        if result is None:
            shape = (h, w) if out.dim() == 3 else (out.shape[1], h, w)
            result = torch.empty(shape, dtype=out.dtype, device=out.device)
        for t, o in zip(group, out):
            src = o[..., t.y0 - t.y:t.y1 - t.y, t.x0 - t.x:t.x1 - t.x]
            result[..., t.y0:t.y1, t.x0:t.x1] = src
    return result
