"""Training curves: the loss and validation mean IU of a run as a PNG (Pillow only)."""

from __future__ import annotations

import os


def plot_curves(history: dict, path: str | os.PathLike, title: str = "") -> None:
    """Two line charts side by side (training loss, validation mean IU vs step) as a PNG."""
    from PIL import Image, ImageDraw

    panels = [
        ("training loss", history.get("loss", []), (200, 60, 40)),
        ("validation mean IU", history.get("val_mean_iu", []), (40, 90, 200)),
    ]
    W, H, m = 420, 300, 48
    img = Image.new("RGB", (W * len(panels), H + (20 if title else 0)), "white")
    d = ImageDraw.Draw(img)
    top = 20 if title else 0
    if title:
        d.text((8, 4), title, fill="black")
    for k, (name, pts, colour) in enumerate(panels):
        x0, y0, x1, y1 = k * W + m, top + 24, k * W + W - 16, top + H - m + 8
        d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        d.text((x0, top + 6), name, fill="black")
        pts = [(float(s), float(v)) for s, v in pts if v == v]
        if not pts:
            d.text((x0 + 10, (y0 + y1) // 2), "no data", fill=(120, 120, 120))
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys)
        if ymax - ymin < 1e-9:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad

        def to_px(s, v, xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax, x0=x0, x1=x1, y0=y0, y1=y1):
            return x0 + (s - xmin) / (xmax - xmin) * (x1 - x0), y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

        for t in range(5):  # horizontal grid with value labels
            v = ymin + (ymax - ymin) * t / 4
            _, py = to_px(xmin, v)
            d.line((x0, py, x1, py), fill=(230, 230, 230))
            d.text((k * W + 4, py - 5), f"{v:.3g}", fill=(80, 80, 80))
        for t in range(3):
            s = xmin + (xmax - xmin) * t / 2
            px, _ = to_px(s, ymin)
            d.text((px - 10, y1 + 4), f"{int(s)}", fill=(80, 80, 80))
        d.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill=(80, 80, 80))
        if len(pts) == 1:
            px, py = to_px(*pts[0])
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        else:
            d.line([to_px(s, v) for s, v in pts], fill=colour, width=2)
    img.save(path)


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
    return {"loss": [[s, v] for (s, _), v in zip(loss, sm)], "val_mean_iu": history["val_mean_iu"]}
