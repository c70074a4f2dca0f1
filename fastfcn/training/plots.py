"""Training curves: the loss and validation mean IU of a run as a PNG (``fastfcn.charts``)."""

from __future__ import annotations

import os

from ..charts import TEXT, Scale, axis


def plot_curves(history: dict, path: str | os.PathLike, title: str = "") -> None:
    """Two line charts side by side (training loss, validation mean IU vs step) as a PNG; for a net
    with several heads (``history["heads"]``) the mean IU panel holds one line per head, in
    ``HEAD_COLOURS`` order (its title names them)."""
    from PIL import Image, ImageDraw

    heads = history.get("heads") or {}
    if heads:
        val = [(h.get("val_mean_iu", []), c) for h, c in zip(heads.values(), HEAD_COLOURS)]
        named = ", ".join(f"{n} {c}" for n, c in zip(heads, HEAD_COLOUR_NAMES))
        val_panel = (f"validation mean IU ({named})", val)
    else:
        val_panel = ("validation mean IU", [(history.get("val_mean_iu", []), HEAD_COLOURS[0])])
    panels = [("training loss", [(history.get("loss", []), (200, 60, 40))]), val_panel]
    top = 20 if title else 0
    img = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + top), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((8, 4), title, fill="black")
    for k, (name, series) in enumerate(panels):
        clean = [([(float(s), float(v)) for s, v in pts if v == v], colour) for pts, colour in series]
        _panel(d, k * PANEL_W, top, name, clean)
    img.save(path)


PANEL_W, PANEL_H, MARGIN = 420, 300, 48
HEAD_COLOURS = ((40, 90, 200), (40, 160, 70), (150, 60, 170))
HEAD_COLOUR_NAMES = ("blue", "green", "purple")


def _panel(d, left: int, top: int, name: str, series: list) -> None:
    """Line charts (value vs step) on shared axes in the panel whose top-left corner is (left, top);
    series: [([(step, value), ...], colour), ...]."""
    x0, y0, x1, y1 = left + MARGIN, top + 24, left + PANEL_W - 16, top + PANEL_H - MARGIN + 8
    d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    d.text((x0, top + 6), name, fill="black")
    every = [p for pts, _ in series for p in pts]
    if not every:
        d.text((x0 + 10, (y0 + y1) // 2), "no data", fill=(120, 120, 120))
        return
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    sx = Scale(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, x0, x1)
    sy = Scale.padded(min(ys), max(ys), y1, y0)
    axis(d, sy, sy.ticks(5), vertical=True, label_at=left + 4, fmt=lambda v: f"{v:.3g}", across=(x0, x1))
    axis(d, sx, sx.ticks(3), vertical=False, label_at=y1 + 4, fmt=lambda s: f"{int(s)}")
    d.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill=TEXT)
    for pts, colour in series:
        if len(pts) == 1:
            px, py = sx(pts[0][0]), sy(pts[0][1])
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        elif pts:
            d.line([(sx(s), sy(v)) for s, v in pts], fill=colour, width=2)


def smooth(values: list[float], k: int) -> list[float]:
    """Running mean over the last k values (the logged loss is noisy per batch)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def for_plot(history: dict) -> dict:
    """The history as plotted: the loss smoothed over about a fiftieth of the run."""
    loss = history["loss"]
    k = max(1, len(loss) // 50)
    sm = smooth([v for _, v in loss], k)
    out = {"loss": [[s, v] for (s, _), v in zip(loss, sm)], "val_mean_iu": history["val_mean_iu"]}
    if history.get("heads"):
        out["heads"] = history["heads"]
    return out
