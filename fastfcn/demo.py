"""``fastfcn demo``: segment generated scenes with the built-in model and compare backends.

The built-in model is a small FCN-8s (width 0.125) that this project trained on
SyntheticScenes (``fastfcn/assets/demo_fcn8s.safetensors``; the README has the command
that reproduces it). The demo draws scenes from the held-out synthetic split, which
training never saw, runs every Segmenter backend that can run on this machine, and
writes, per scene, the image, the prediction overlay and the ground truth side by side.
It then segments a few seconds of video (objects that move and rotate) through the
streaming path: ``stream_input.mkv`` in, ``stream_overlay.mp4`` out, next to the PNGs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .runtime.registry import available_backends

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_fcn8s.safetensors"


def write_overlays(out: Path, images, preds, truths, palette: np.ndarray) -> list[Path]:
    """One PNG per scene: image | prediction overlay | ground truth overlay (2x enlarged)."""
    from PIL import Image

    from .viz import overlay

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (im, pr, gt) in enumerate(zip(images, preds, truths)):
        gap = np.full((im.shape[0], 4, 3), 255, np.uint8)
        row = np.concatenate([im, gap, overlay(im, pr, palette, 0.55, True), gap,
                              overlay(im, gt, palette, 0.55, True)], 1)
        pic = Image.fromarray(row)
        pic = pic.resize((pic.width * 2, pic.height * 2), Image.NEAREST)
        p = out / f"scene_{i:03d}.png"
        pic.save(p)
        paths.append(p)
    return paths


def write_stream(out: Path, checkpoint, num_classes: int, seconds: float, fps: int = 25) -> dict:
    """A few seconds of moving, rotating synthetic objects (``MovingScenes``), written as a
    lossless ``stream_input.mkv`` and segmented by ``segment_video`` into the overlay video
    ``stream_overlay.mp4``. Returns segment_video's summary plus ``input``."""
    import fastfcn

    from .data import MovingScenes
    from .video import segment_video, write_video

    clip = MovingScenes(max(1, int(round(seconds * fps))), num_classes=num_classes)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "stream_input.mkv"
    write_video(src, (clip[k][0] for k in range(len(clip))), fps, lossless=True)
    seg = fastfcn.Segmenter(checkpoint, device="auto")
    summary = segment_video(src, out / "stream_overlay.mp4", seg, alpha=0.55, progress=False)
    summary["input"] = str(src)
    return summary


def _time_backend(seg, batch: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """Labels ``(N, H, W)`` and the median ms per image over ``repeats`` timed runs (after one warm-up)."""
    labels = seg.run(batch, output="labels")  # warm-up: compilation, graph capture, allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        labels = seg.run(batch, output="labels")
        if hasattr(labels, "cpu"):
            labels = labels.cpu()
        times.append(time.perf_counter() - t)
    labels = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
    return labels, 1000 * float(np.median(times)) / len(batch)


def run_demo(out: str | Path = "fastfcn-demo-out", n: int = 16, backends=None, checkpoint=None,
             repeats: int = 3, stream=None, video_seconds: float = 3.0) -> dict:  # fmt: skip
    """Segment ``n`` held-out scenes with each backend; write overlays; return the results table.
    Then, with PyAV installed and ``video_seconds`` > 0, segment a clip of moving scenes
    (``write_stream``).

    Returns ``{"out": Path, "rows": [{backend, status, ms_per_image, agreement, mean_iu, reason}],
    "overlays": [Path, ...], "video": summary or None}``; agreement is the fraction of labels
    identical to the torch backend's.
    """
    import fastfcn

    from .data import HELDOUT_SIZE, heldout_scenes
    from .errors import FastFCNError
    from .metrics import confusion_matrix, scores
    from .zoo import resolve

    stream = stream or sys.stdout
    checkpoint = Path(resolve(checkpoint or "demo"))
    model = fastfcn.load(checkpoint)
    cfg = model.config
    num_classes = int(cfg["num_classes"])
    names = list(cfg.get("class_names") or range(num_classes))
    palette = np.array(cfg.get("palette") or [[0, 0, 0]] * num_classes, np.uint8).reshape(-1, 3)
    scenes = heldout_scenes(n, HELDOUT_SIZE, num_classes)
    images = np.stack([scenes[i][0] for i in range(n)])
    truths = np.stack([scenes[i][1] for i in range(n)])
    print(f"fastfcn demo: {checkpoint.name} ({cfg['arch']}, width {cfg['width']}, classes: "
          f"{', '.join(map(str, names))})", file=stream)  # fmt: skip
    print(f"segmenting {n} held-out synthetic scenes of {HELDOUT_SIZE}x{HELDOUT_SIZE} with each backend",
          file=stream)  # fmt: skip

    registered = available_backends()
    backends = registered if backends is None else list(backends)
    rows, ref, ref_preds = [], None, None
    order = ["torch"] + [b for b in registered if b in backends and b != "torch"]  # torch: the reference
    for b in order:
        row = {"backend": b}
        try:
            seg = fastfcn.Segmenter(checkpoint, backend=b, device="auto", precision="fp32")
            preds, ms = _time_backend(seg, images, repeats)
        except (FastFCNError, ImportError, RuntimeError, NotImplementedError) as e:
            row.update(status="skipped", reason=str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
            rows.append(row)
            continue
        if b == "torch":
            ref, ref_preds = preds, preds
        row.update(
            status="ok",
            device=str(getattr(seg, "device", "?")),
            ms_per_image=ms,
            agreement=float((preds == ref).mean()) if ref is not None else float("nan"),
            mean_iu=scores(confusion_matrix(truths, preds, num_classes))["mean_iu"],
        )
        rows.append(row)

    out = Path(out).resolve()
    paths = write_overlays(out, images, ref_preds if ref_preds is not None else truths, truths, palette)
    print(_table(rows), file=stream)
    print(f"\noverlays (image | prediction | ground truth): {out}/scene_000.png ... ({len(paths)} files)",
          file=stream)  # fmt: skip
    video = _demo_video(out, checkpoint, num_classes, video_seconds, stream)
    return {"out": out, "rows": rows, "overlays": paths, "video": video}


def _demo_video(out: Path, checkpoint, num_classes: int, seconds: float, stream) -> dict | None:
    if seconds <= 0:
        return None
    try:
        import av  # noqa: F401
    except ImportError:
        print("video: skipped (PyAV is not installed: pip install 'fastfcn[video]')", file=stream)
        return None
    s = write_stream(out, checkpoint, num_classes, seconds)
    print(f"video: {s['frames_out']} frames of moving scenes at {s['fps']:.1f} frames/s end to end "
          f"(decode, segment, overlay, encode) -> {s['destination']}", file=stream)  # fmt: skip
    return s


def _table(rows: list[dict]) -> str:
    lines = [f"\n{'backend':<12} {'device':<8} {'ms/image':>9} {'agree vs torch':>15} {'mean IU':>8}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<12} skipped: {r['reason']}")
            continue
        lines.append(
            f"{r['backend']:<12} {r['device']:<8} {r['ms_per_image']:>9.2f} {100 * r['agreement']:>14.3f}% "
            f"{100 * r['mean_iu']:>7.2f}"
        )
    return "\n".join(lines)
