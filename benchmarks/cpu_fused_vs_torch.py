"""Fused vs torch on the CPU, per family and precision (a script, not a pytest benchmark).

    OMP_NUM_THREADS=2 python benchmarks/cpu_fused_vs_torch.py fcn8s 500 500 1 [--rounds 3]

Random weights (width 1), uint8 input, labels out. Medians of interleaved rounds (every
backend once per round, so load changes on a shared machine hit all of them alike), after
one warm-up call per backend (the fused backend plans its convolutions there; the plan cache
is a fresh temporary directory unless FASTFCN_CACHE_DIR is set). Prints one line per backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import fastfcn
import fastfcn.models as models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("arch")
    ap.add_argument("h", type=int)
    ap.add_argument("w", type=int)
    ap.add_argument("batch", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default="torch:fp32,fused:fp32,torch:bf16,fused:bf16")
    # "process": CPU seconds of this process (all its threads), steadier than wall time when
    # other jobs share the machine; compare it at --threads 1.
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = ap.parse_args()
    os.environ.setdefault("FASTFCN_CACHE_DIR", tempfile.mkdtemp(prefix="fastfcn-plan-"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build(args.arch, num_classes=21, width=1.0).eval()
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch, args.h, args.w, 3), dtype=torch.uint8, generator=gen)
    segs, times, labels = {}, {}, {}
    for cfg in args.configs.split(","):
        backend, precision = cfg.split(":")
        t0 = time.perf_counter()
        segs[cfg] = fastfcn.Segmenter(model, device="cpu", backend=backend, precision=precision)
        labels[cfg] = segs[cfg].run(batch)
        print(f"{cfg:<12} build + first call {time.perf_counter() - t0:6.2f} s", flush=True)
        times[cfg] = []
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.rounds):
        for cfg, seg in segs.items():
            t0 = clock()
            seg.run(batch)
            times[cfg].append(clock() - t0)
    ref = labels.get("torch:fp32")
    print(f"{args.arch} {args.h}x{args.w} batch {args.batch}, {args.threads} threads, {args.rounds} rounds, "
          f"{args.clock} seconds")  # fmt: skip
    for cfg, ts in times.items():
        same = None if ref is None else float((labels[cfg] == ref).float().mean())
        agree = "" if same is None else f"  labels = torch:fp32 {same:.4f}"
        spread = f"(min {min(ts):.3f}, max {max(ts):.3f})"
        print(f"{cfg:<12} median {statistics.median(ts):7.3f} s  {spread}{agree}")


if __name__ == "__main__":
    main()
