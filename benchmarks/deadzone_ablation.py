"""Ablation: FCN-8s with the image-independent positions skipped vs computed, on the CPU.

    .venv/bin/python benchmarks/deadzone_ablation.py [--size 500 500] [--rounds 7] [--threads 2]

Runs the whole model (logits, fp32, batch 1, torch's own convolutions, reference head) with the
backbone through ``fastfcn.runtime.deadzone.DeadZoneForward`` (skip on) and through the plain
steps (skip off), interleaved round by round so that load from other processes hits both alike;
prints medians, the spread and the MACs each computes. Takes 2-3 minutes at 500x500 on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastfcn
from fastfcn.flops import count_macs
from fastfcn.heads import run_head
from fastfcn.models.common import ops_impl
from fastfcn.runtime.deadzone import DeadZoneForward


def logits(model, fwd, x):
    feats: dict = {}
    h = fwd(x, feats)
    score = model.score_fr(model._fc(h))
    return run_head(model.head, model, score, feats, tuple(x.shape[-2:]), "logits", ops_impl(model.impl))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=(500, 500))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = fastfcn.models.build("fcn8s", width=args.width).eval()
    x = torch.randn(1, 3, *args.size) * 50
    on, off = DeadZoneForward(model, enabled=True), DeadZoneForward(model, enabled=False)
    runs = {"skip on": on, "skip off": off}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        t = time.perf_counter()
        ref = logits(model, runs["skip on"], x)  # fills the cache
        build_s = time.perf_counter() - t
        print(f"cache build + first call: {build_s:.2f} s; cache {on.cache.nbytes / 2**20:.1f} MiB")
        err = (ref - logits(model, runs["skip off"], x)).abs().max().item()
        print(f"max |logits(on) - logits(off)| = {err:.3g} (max |logits| {ref.abs().max().item():.3g})")
        for _ in range(args.rounds):
            for name, fwd in runs.items():
                t = time.perf_counter()
                logits(model, fwd, x)
                times[name].append(time.perf_counter() - t)
    c = count_macs(model, (1, 3, *args.size))
    print(f"FCN-8s width {args.width} {args.size[0]}x{args.size[1]} fp32 batch 1, {args.threads} threads, "
          f"torch {torch.__version__}, loadavg {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print(f"MACs: nominal {c.gmac:.1f} G, computed with the skip {c.computed_gmac:.1f} G")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        med = statistics.median(ts)
        print(f"{name:>9}: median {med:.3f} s (q1 {q[0]:.3f}, q3 {q[2]:.3f}, min {min(ts):.3f})")
    t_on, t_off = statistics.median(times["skip on"]), statistics.median(times["skip off"])
    best = min(times["skip on"]) / min(times["skip off"])
    print(f"skip on / off: {t_on / t_off:.3f} (medians), {best:.3f} (minima)")


if __name__ == "__main__":
    main()
