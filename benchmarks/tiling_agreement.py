"""Agreement of tiled with untiled inference, per model family.

    python benchmarks/tiling_agreement.py [--size 448] [--tile 224] [--overlaps 0 32 64 128] [--n 4]

For each family (seeded random weights at width 0.125, and the shipped trained demo model)
it segments ``--n`` held-out synthetic scenes of ``--size`` x ``--size`` pixels once whole and
once in tiles of ``--tile`` x ``--tile`` with each overlap (backend "torch", fp32, CPU), and
prints the share of pixels whose label is the same, and the mean absolute logit difference
relative to the untiled logits' spatial standard deviation (per class over the image, averaged
over classes), next to the share of the most frequent class in the untiled result. The
README's table comes from this script.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fastfcn
from fastfcn.data import heldout_scenes
from fastfcn.models import build

FAMILIES = ("fcn8s", "fcn-alexnet", "deconvnet", "dilated-frontend", "dilated-context")


def models(width: float, num_classes: int):
    for arch in FAMILIES:
        torch.manual_seed(0)
        yield f"{arch} (random, width {width})", build(arch, num_classes=num_classes, width=width).eval()
    yield "demo (fcn8s, trained)", "demo"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--overlaps", type=int, nargs="+", default=[0, 32, 64, 128])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args()
    scenes = heldout_scenes(args.n, args.size, num_classes=5)
    images = np.stack([np.asarray(scenes[i][0]) for i in range(args.n)])
    print(f"{args.n} scenes {args.size}x{args.size}, tiles {args.tile}x{args.tile}, backend {args.backend}, "
          f"torch threads {torch.get_num_threads()}")
    print("label agreement % / mean |logit difference| relative to the logits' spatial std")
    print("| model | largest class (untiled) | " + " | ".join(f"overlap {o}" for o in args.overlaps) + " |")
    print("|---|---|" + "---|" * len(args.overlaps))
    for name, m in models(args.width, 6):
        seg = fastfcn.Segmenter(m, backend=args.backend, device="cpu", precision="fp32")
        t0 = time.perf_counter()
        whole = seg.run(images, "logits")
        labels = whole.argmax(1)
        # A share near 100% means the net predicts one class almost everywhere (untrained nets
        # often do): label agreement then says little, the logit difference still does.
        cells = [f"{100 * torch.bincount(labels.flatten()).max().item() / labels.numel():.1f}%"]
        # How much each class's logit varies over the image (untrained nets: little; their
        # per-class offsets dwarf it, so the overall std would hide tiling errors).
        spatial = whole.std(dim=(2, 3)).mean()
        for o in args.overlaps:
            tiled = seg.run(images, "logits", tile=(args.tile, args.tile), overlap=o)
            agree = (tiled.argmax(1) == labels).float().mean().item()
            rel = ((tiled - whole).abs().mean() / spatial).item()
            cells.append(f"{100 * agree:.2f}% / {rel:.3f}")
        print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
