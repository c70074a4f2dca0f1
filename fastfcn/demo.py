"""``fastfcn demo``: segment generated scenes with the built-in model and compare backends.

The built-in model is a small FCN-8s (width 0.125) that this project trained on
SyntheticScenes (``fastfcn/assets/demo_fcn8s.safetensors``; the README has the command
that reproduces it). The demo draws scenes from the held-out synthetic split, which
training never saw, runs every Segmenter backend that can run on this machine, and
writes, per scene, the image, the prediction overlay and the ground truth side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEMO_MODEL = Path(__file__).parent / "assets" / "demo_fcn8s.safetensors"
BACKENDS = ("torch", "fused", "onnxruntime", "compile", "openvino")


def write_overlays(out: Path, images, preds, truths, palette: np.ndarray) -> list[Path]:
    """One PNG per scene: image | prediction overlay | ground truth overlay (2x enlarged)."""
    from PIL import Image

    from .runtime.commands import overlay

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
             repeats: int = 3, stream=None) -> dict:  # fmt: skip
    """Segment ``n`` held-out scenes with each backend; write overlays; return the results table.

    Returns ``{"out": Path, "rows": [{backend, status, ms_per_image, agreement, mean_iu, reason}],
    "overlays": [Path, ...]}``; agreement is the fraction of labels identical to the torch backend's.
    """
    import fastfcn

    from .data import HELDOUT_SIZE, heldout_scenes
    from .errors import FastFCNError
    from .metrics import confusion_matrix, scores

    stream = stream or sys.stdout
    checkpoint = Path(checkpoint or DEMO_MODEL)
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

    backends = list(BACKENDS) if backends is None else list(backends)
    rows, ref, ref_preds = [], None, None
    order = ["torch"] + [b for b in BACKENDS if b in backends and b != "torch"]  # torch: the reference
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
    return {"out": out, "rows": rows, "overlays": paths}


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


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    a = parser.add_argument
    a("--out", default="fastfcn-demo-out", help="folder for the overlays (default ./fastfcn-demo-out)")
    a("--n", type=int, default=16, help="number of scenes (default 16)")
    a("--backends", default=None,
      help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)")
    a("--checkpoint", default=None, help="a checkpoint other than the built-in model")
    a("--repeats", type=int, default=3, help="timed runs per backend (default 3; median reported)")


def main(args: argparse.Namespace) -> int:
    from .errors import InputError

    if args.n < 1:
        raise InputError(f"--n must be >= 1; got {args.n}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    unknown = sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; expected some of {list(BACKENDS)}")
    if args.checkpoint is None and not DEMO_MODEL.is_file():
        raise InputError(f"the built-in model {DEMO_MODEL} is missing; reinstall fastfcn")
    t = time.perf_counter()
    run_demo(args.out, args.n, backends, args.checkpoint, args.repeats)
    print(f"done in {time.perf_counter() - t:.1f} s", file=sys.stdout)
    return 0
