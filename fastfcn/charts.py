"""The one chart implementation (Pillow only, no matplotlib): a value axis, its ticks and grid.

Used by the training curves (``fastfcn.training.plots``: linear axes) and the benchmark
report (``fastfcn.bench_report``: a log-scale ms-per-image axis). Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GRID = (225, 225, 225)
TEXT = (80, 80, 80)


def font(size: int | None = None):
    """Pillow's default font at ``size`` pixels (None: its small bitmap font)."""
    from PIL import ImageFont

    if size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


@dataclass(frozen=True)
class Scale:
    """Values ``lo .. hi`` onto pixels ``p0 .. p1`` (p1 < p0 for a y axis, which grows upwards),
    linearly or on a log10 scale (``log``: lo > 0)."""

    lo: float
    hi: float
    p0: float
    p1: float
    log: bool = False

    def __post_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"a chart axis needs hi > lo; got {self.lo}, {self.hi}")
        if self.log and self.lo <= 0:
            raise ValueError(f"a log-scale chart axis needs lo > 0; got {self.lo}")

    def __call__(self, v: float) -> float:
        f = (math.log10(v / self.lo) / math.log10(self.hi / self.lo) if self.log
             else (v - self.lo) / (self.hi - self.lo))  # fmt: skip
        return self.p0 + f * (self.p1 - self.p0)

    def ticks(self, n: int = 5) -> list[float]:
        """Linear: ``n`` values from lo to hi; log: every power of ten from lo to hi."""
        if not self.log:
            return [self.lo + (self.hi - self.lo) * t / (n - 1) for t in range(n)]
        out, v = [], 10 ** math.floor(math.log10(self.lo))
        while v <= self.hi * 1.0001:
            if v >= self.lo / 1.0001:
                out.append(v)
            v *= 10
        return out

    @staticmethod
    def padded(lo: float, hi: float, p0: float, p1: float, pad: float = 0.05) -> Scale:
        """A linear scale around data ``lo .. hi`` with ``pad`` of the range added on both ends
        (a flat series gets +-0.5)."""
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        d = pad * (hi - lo)
        return Scale(lo - d, hi + d, p0, p1)

    @staticmethod
    def decades(lo: float, hi: float, p0: float, p1: float) -> Scale:
        """A log scale from the power of ten at or below ``lo`` to the one at or above ``hi``."""
        a, b = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        return Scale(a, b if b > a else a * 10, p0, p1, log=True)


def axis(draw, scale: Scale, ticks: list[float], *, vertical: bool, label_at: float, fmt,
         across: tuple[float, float] | None = None, font=None, label_offset: float = 10) -> None:
    """Tick labels along one axis, with grid lines ``across`` the plot (None: labels only).

    vertical: the values run up the y axis (labels left of the plot at x = ``label_at``, lines
    horizontal); else along x (labels below at y = ``label_at``, lines vertical). fmt: value ->
    label text.
    """
    for v in ticks:
        p = scale(v)
        if vertical:
            if across is not None:
                draw.line((across[0], p, across[1], p), fill=GRID)
            draw.text((label_at, p - label_offset / 2), fmt(v), fill=TEXT, font=font)
        else:
            if across is not None:
                draw.line((p, across[0], p, across[1]), fill=GRID)
            draw.text((p - label_offset, label_at), fmt(v), fill=TEXT, font=font)
