"""NYUDv2 nets on the CPU: the fused backend with the dead-zone skip on and off, per arch.

    .venv/bin/python benchmarks/nyud_fusion.py [--arch nyud-fcn32s-color-hha] [--size 425 560]
                                               [--width 0.5] [--rounds 3] [--threads 2]

Runs ``Segmenter(model, backend="fused", precision="fp32", skip_dead_zone=on/off).run(images,
"logits", depth= / hha=)`` (batch 1, random weights: the time does not depend on them), the two
interleaved round by round so that load from other processes hits both alike, after one warm-up
call each (the convolution planner's timing and the dead-zone cache fill). Prints medians, the
agreement of the two and the MACs each computes (fastfcn.flops.count_macs). 425 x 560 is the
NYUDv2 images' size in the reference data layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import fastfcn
from fastfcn.flops import count_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="nyud-fcn32s-color-hha", choices=[a for a in fastfcn.models.available()
                                                                          if a.startswith("nyud")])
    ap.add_argument("--size", type=int, nargs=2, default=(425, 560))
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = fastfcn.models.build(args.arch, width=args.width).eval()
    rng = np.random.default_rng(0)
    h, w = args.size
    color = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    second = {"depth": {"depth": rng.integers(500, 10000, (1, h, w), dtype=np.uint16)},
              "hha": {"hha": rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)}}  # fmt: skip
    extra = second.get(model.config["inputs"][-1], {}) if len(model.config["inputs"]) > 1 else {}
    segs = {name: fastfcn.Segmenter(model, backend="fused", device="cpu", precision="fp32", skip_dead_zone=on)
            for name, on in (("skip on", True), ("skip off", False))}  # fmt: skip
    outs = {}
    for name, seg in segs.items():
        t = time.perf_counter()
        outs[name] = seg.run(color, "logits", **extra)
        print(f"{name}: first call (planner + cache) {time.perf_counter() - t:.2f} s")
    ref = outs["skip off"]
    err = float((outs["skip on"] - ref).abs().max() / (ref.max() - ref.min()))
    times: dict[str, list[float]] = {k: [] for k in segs}
    for _ in range(args.rounds):
        for name, seg in segs.items():
            t = time.perf_counter()
            seg.run(color, "logits", **extra)
            times[name].append(time.perf_counter() - t)
    c = count_macs(model, (1, model.in_channels, h, w))
    print(f"{args.arch} width {args.width} {h}x{w} fp32 batch 1, {args.threads} threads, "
          f"torch {torch.__version__}, loadavg {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print(f"MACs: nominal {c.gmac:.1f} G, computed with the skip {c.computed_gmac:.1f} G; "
          f"max |on - off| / range {err:.2e}")
    for name, ts in times.items():
        print(f"{name:>9}: median {statistics.median(ts):.3f} s (min {min(ts):.3f}, max {max(ts):.3f})")
    on, off = times["skip on"], times["skip off"]
    print(f"skip on / off: {statistics.median(on) / statistics.median(off):.3f} (medians), "
          f"{min(on) / min(off):.3f} (minima)")


if __name__ == "__main__":
    main()
