"""fastfcn against its peers in interleaved rounds: every backend runs once per round, in a
rotating order, so that load from other processes on a shared machine falls on all of them
alike (the pytest suite times one backend after the other).

    python benchmarks/peers_interleaved.py --arch fcn8s --size 500 500 --batch 1 --rounds 5 \\
        --runs fused:fp32 fused:bf16 onnxruntime:fp32 openvino:fp32 openvino:bf16

``fused-noskip:PRECISION`` is the fused backend computing every position (the dead-zone
ablation, ``Segmenter(skip_dead_zone=False)``), ``fused-nofft:PRECISION`` the fused backend
without its Fourier-domain convolution candidates (``cpu_fast.FftConv``); neither is counted as a
peer.

Same seeded model (width 1) and seeded uint8 images as benchmarks/test_end_to_end.py; the
ONNX peers share one fp32 export (``onnxruntime:fp16`` runs an fp16 export of the same model).
Prints, per run, the median and IQR in ms, and fused
against the fastest peer at each precision; ``--json PATH`` writes the same as JSON with the
CPU model, flags, versions and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info, native_bf16_cpu  # noqa: E402

import fastfcn  # noqa: E402
from fastfcn.bench_report import peer_ratios  # noqa: E402
from fastfcn.runtime.registry import onnx_backends  # noqa: E402

DEFAULT_RUNS = ["fused:fp32", "fused:bf16", "onnxruntime:fp32", "openvino:fp32", "openvino:bf16",
                "compile:fp32"]


def build(args, folder: str) -> dict:
    torch.manual_seed(0)
    model = fastfcn.models.build(args.arch, 21, args.width).eval()
    exports = {}  # graph precision -> .onnx path
    segs = {}
    for run in args.runs:
        backend, precision = run.split(":")
        options = {}
        if backend == "fused-noskip":  # the dead-zone ablation: fused computing every position
            backend, options = "fused", {"skip_dead_zone": False}
        nofft = backend == "fused-nofft"
        if nofft:
            backend = "fused"
        if precision == "bf16" and not native_bf16_cpu()[0]:
            print(f"skipped {run}: {native_bf16_cpu()[1]}")
            continue
        source = model
        if backend in onnx_backends():
            graph = "fp16" if precision == "fp16" else "fp32"  # ONNX Runtime runs fp16 from an fp16 graph
            if graph not in exports:
                path = Path(folder) / f"model-{graph}.onnx"
                exports[graph] = fastfcn.export_onnx(model, path, precision=graph)
            source = str(exports[graph])
        try:
            segs[run] = fastfcn.Segmenter(source, backend=backend, device="cpu", precision=precision,
                                          **options)
        except fastfcn.BackendUnavailableError as e:
            print(f"skipped {run}: {e}")
            continue
        if nofft:  # the ablation: the planner never offered the FftConv candidates
            for conv in segs[run]._backend.planner.convs.values():
                conv.cands = {k: v for k, v in conv.cands.items() if not k.startswith("fft")}
    return segs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fcn8s")
    p.add_argument("--size", type=int, nargs=2, default=(500, 500), metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1 = the paper's net)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="backend:precision ...")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, h, w, 3), generator=g, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="fastfcn-peers-") as folder:
        segs = build(args, folder)
        expect = {run: seg.run(images) for run, seg in segs.items()}  # warm-up (compiles)
        for seg in segs.values():
            seg.run(images)  # second warm-up
        times: dict = {run: [] for run in segs}
        order = list(segs)
        for r in range(args.rounds):
            for run in order[r % len(order):] + order[: r % len(order)]:
                t = time.perf_counter()
                out = segs[run].run(images)
                times[run].append(time.perf_counter() - t)
                agree = float((out == expect[run]).float().mean())
                assert agree >= 0.99, f"{run}: labels changed between runs ({agree:.4f})"
    rows = []
    for run, ts in times.items():
        backend, precision = run.split(":")
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows.append({"case_key": f"{args.arch}-{w}x{h}-b{args.batch}", "backend": backend,
                     "precision": precision, "median_ms": statistics.median(ts) * 1e3,
                     "iqr_ms": (q[2] - q[0]) * 1e3, "rounds": len(ts)})  # fmt: skip
        print(f"{run:<18} median {rows[-1]['median_ms']:9.1f} ms  IQR {rows[-1]['iqr_ms']:7.1f} ms")
    ratios = peer_ratios(rows)
    for e in ratios:
        if e["ratio"] is not None:
            print(f"fused {e['precision']}: {e['ratio']:.2f}x the fastest peer ({e['peer']})")
    if args.json:
        info = device_info("cpu")
        doc = {"command": " ".join(sys.argv), "device": info, "threads": torch.get_num_threads(),
               "loadavg": os.getloadavg(), "rows": rows, "peer_ratios": ratios}  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
