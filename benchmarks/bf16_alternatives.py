"""Why the fused backend runs the VGG 3x3 convolutions at bf16 as oneDNN's direct convolution: the
two ways of doing fewer multiplies, measured on this machine against it.

    OMP_NUM_THREADS=2 python benchmarks/bf16_alternatives.py [--json PATH]

1. NNPACK's fp32 Winograd (the fused backend's fp32 candidate ``nnpack``, layout changes
   included) against ``onednn-bf16`` on the dilated net's 3x3 layer shapes at 250x250 input
   (reflect-padded to 622x622).
2. Winograd with the products in bf16: F(2x2, 3x3) and F(4x4, 3x3) (Lavin and Gray's
   matrices), transforms in fp32, the transformed input and weight rounded to bf16 for the
   batched matrix product. Error relative to the float64 convolution (mean absolute error over
   mean absolute output, ReLU'd Gaussian input, He-initialised weights) beside direct bf16's, and
   the time of the batched product alone (a lower bound: no transforms) beside the direct conv.

Prints one line per case and the CPU model; ``--json`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info  # noqa: E402

from fastfcn.runtime.cpu_fast import NNPackConv, OneDnnConv, _Geom, native_bf16, nnpack_available  # noqa: E402

# (C_in, C_out, input side): the dilated front end's 3x3 layers, 250x250 image reflect-padded to 622
DILATED_3X3 = [(64, 64, 620), (64, 128, 309), (128, 128, 307), (128, 256, 152), (256, 256, 150),
               (256, 512, 73), (512, 512, 71)]  # fmt: skip

# Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): B^T, G, A^T
WINOGRAD = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}  # fmt: skip


def best_of(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def winograd(x: torch.Tensor, w: torch.Tensor, m: int, gemm_dtype: torch.dtype) -> torch.Tensor:
    """Valid 3x3 convolution by Winograd F(m x m, 3x3); products at ``gemm_dtype``."""
    bt, g, at = (torch.tensor(a, dtype=torch.float32) for a in WINOGRAD[m])
    n, c, h, wd = x.shape
    a = m + 2
    ho, wo = h - 2, wd - 2
    th, tw = math.ceil(ho / m), math.ceil(wo / m)
    tiles = F.pad(x, (0, tw * m + 2 - wd, 0, th * m + 2 - h)).unfold(2, a, m).unfold(3, a, m)
    v = torch.einsum("ij,ncpqjk,lk->ilnpqc", bt, tiles, bt).reshape(a * a, n * th * tw, c)
    u = torch.einsum("ij,kcjl,ml->imck", g, w, g).reshape(a * a, c, w.shape[0])
    prod = torch.bmm(v.to(gemm_dtype), u.to(gemm_dtype)).float().reshape(a, a, n, th, tw, -1)
    y = torch.einsum("ij,jlnpqk,ml->nkpiqm", at, prod, at).reshape(n, -1, th * m, tw * m)
    return y[:, :, :ho, :wo]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    info = device_info("cpu")
    print(f"CPU: {info.get('cpu')}  threads: {torch.get_num_threads()}  native bf16: {native_bf16()}")
    result = {"device": info, "nnpack_vs_onednn_bf16": [], "winograd_bf16": []}
    if not native_bf16():
        print("this CPU has no native bf16: nothing to compare")
        return 0
    if nnpack_available():
        for cin, cout, side in DILATED_3X3:
            geom = _Geom(torch.randn(cout, cin, 3, 3) * 0.05, torch.zeros(cout), [1, 1], [1, 1], 1, True)
            x = torch.randn(1, cin, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
            onednn, nnpack = OneDnnConv(geom, torch.bfloat16), NNPackConv(geom)
            t1 = best_of(lambda f=onednn, x=x: f(x, [0, 0]))
            t2 = best_of(lambda f=nnpack, x=x: f(x, [0, 0]).to(torch.bfloat16))
            result["nnpack_vs_onednn_bf16"].append(
                {"c_in": cin, "c_out": cout, "side": side,
                 "onednn_bf16_ms": t1 * 1e3, "nnpack_fp32_ms": t2 * 1e3}
            )
            print(f"{cin:>4} -> {cout:<4} at {side:>3}: onednn-bf16 {t1 * 1e3:7.1f} ms   "
                  f"nnpack (fp32) {t2 * 1e3:7.1f} ms")
    torch.manual_seed(0)
    for cin, cout, side in [(128, 128, 100), (256, 256, 60), (512, 512, 40)]:
        x = torch.randn(1, cin, side, side).relu()
        w = torch.randn(cout, cin, 3, 3) * math.sqrt(2 / (cin * 9))
        ref = F.conv2d(x.double(), w.double())
        scale = ref.abs().mean()

        def err(y, ref=ref, scale=scale):
            return ((y.double() - ref).abs().mean() / scale).item()

        row = {"c_in": cin, "c_out": cout, "side": side,
               "direct_bf16": err(F.conv2d(x.bfloat16(), w.bfloat16())),
               "f2_bf16": err(winograd(x, w, 2, torch.bfloat16)),
               "f4_bf16": err(winograd(x, w, 4, torch.bfloat16)),
               "f4_fp32": err(winograd(x, w, 4, torch.float32))}  # fmt: skip
        result["winograd_bf16"].append(row)
        print(f"{cin:>4} -> {cout:<4} at {side:>3}: relative error direct bf16 {row['direct_bf16']:.2e}, "
              f"F(2x2) bf16 {row['f2_bf16']:.2e}, F(4x4) bf16 {row['f4_bf16']:.2e}, "
              f"F(4x4) fp32 {row['f4_fp32']:.2e}")
    c, side = 256, 150  # conv3_2's shape: the products alone against the whole direct conv
    geom = _Geom(torch.randn(c, c, 3, 3) * 0.05, torch.zeros(c), [1, 1], [1, 1], 1, False)
    x = torch.randn(1, c, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    onednn = OneDnnConv(geom, torch.bfloat16)
    direct = best_of(lambda: onednn(x, [0, 0]))
    gemm = {}
    for m in (2, 4):
        tiles = math.ceil((side - 2) / m) ** 2
        v = torch.randn((m + 2) ** 2, tiles, c).bfloat16()
        u = torch.randn((m + 2) ** 2, c, c).bfloat16()
        gemm[m] = best_of(lambda v=v, u=u: torch.bmm(v, u))
    result["products_vs_direct_256x256_at_150"] = {"direct_ms": direct * 1e3, "f2_bmm_ms": gemm[2] * 1e3,
                                                   "f4_bmm_ms": gemm[4] * 1e3}  # fmt: skip
    print(f" 256 -> 256  at 150: direct bf16 {direct * 1e3:.1f} ms; Winograd products alone: "
          f"F(2x2) {gemm[2] * 1e3:.1f} ms, F(4x4) {gemm[4] * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
