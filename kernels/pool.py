"""Triton: max pooling without switches over channels_last (or any strided) maps.

The fused CUDA backbone pools after a block's last conv. On the H200 (benchmarks/results/
h200-2026-12-04.json, FCN-8s 500x500 bf16) torch's ``max_pool_forward_nhwc`` took 0.90 ms for
the five pools of a batch of 8 (0.15 ms at batch 1): 671 MB read and written, 0.16 ms at the
4.25 TB/s copy rate measured there, so it ran at ~18% of the memory bandwidth. Here a program
takes a tile of output pixels x channels; with channels contiguous (stride 1, which Triton
specialises) each pixel's channels load as wide vectors, and the window's positions are a
static loop. The input may be a strided view (a window of a larger map): no copy first.

Semantics are torch's ``max_pool2d(x, kernel, stride, ceil_mode=True)`` with no padding: a
window clipped at the border reads only the positions inside, a NaN in the window wins (the
replace rule of torch's kernels: strictly greater, or NaN), -inf stays -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .structure import pool_out_size
from .unpool import INT32_LIMIT


@triton.jit
def max_pool_kernel(
    x_ptr, out_ptr, P, C, H, W, h, w,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[n, c, oy, ox] = max over x[n, c, oy*S + dy, ox*S + dx] inside the map.

    P = N * h * w output pixels, flat p = (n * h + oy) * w + ox. Grid: (cdiv(P, BLOCK_P),
    cdiv(C, BLOCK_C)). Strides in elements for x (N, C, H, W) and out (N, C, h, w)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        p = p.to(tl.int64)
        c = c.to(tl.int64)
    pm = p < P
    cm = c < C
    ox = p % w
    t = p // w
    oy = t % h
    n = t // h
    xrow = n * sxn
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for dy in tl.static_range(KERNEL):
        for dx in tl.static_range(KERNEL):
            iy = oy * STRIDE + dy
            ix = ox * STRIDE + dx
            ok = pm & (iy < H) & (ix < W)
            src = x_ptr + (xrow + iy * sxh + ix * sxw)[:, None] + (c * sxc)[None, :]
            v = tl.load(src, mask=ok[:, None] & cm[None, :], other=float("-inf")).to(tl.float32)
            # torch's rule: replace when strictly greater or NaN (a NaN, once in, stays)
            best = tl.where((v > best) | (v != v), v, best)
    dst = out_ptr + (n * son + oy * soh + ox * sow)[:, None] + (c * soc)[None, :]
    tl.store(dst, best.to(out_ptr.dtype.element_ty), mask=pm[:, None] & cm[None, :])


# Elements of a CUDA program's tile (BLOCK_P x BLOCK_C) and its warps: 8 per thread, the same
# as the switch-keeping pool (unpool.CUDA_LAUNCH). BLOCK_C is C up to 128 (a pixel's channels
# in one row of 256 bytes at bf16), so a 64-channel map wastes no lanes.
CUDA_TILE = 1024
CUDA_WARPS = 4

def _extent(t) -> int:
    """One past the largest element offset t's strides reach."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def launch_config(p: int, c: int, is_cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for p output pixels of c channels."""
    block_c = min(triton.next_power_of_2(max(c, 1)), 128)
    if is_cuda:
        return max(CUDA_TILE // block_c, 1), block_c, CUDA_WARPS
    # the interpreter: a fixed cost per tl op, so few large programs
    return min(triton.next_power_of_2(max(p, 1)), max((1 << 16) // block_c, 1)), block_c, 1


def max_pool2d(x, kernel: int, stride: int):
    """torch.nn.functional.max_pool2d(x, kernel, stride, ceil_mode=True) for float32, float16 and
    bfloat16 maps (N, C, H, W) of any strides; the output keeps x's memory format (channels_last
    when x is channels_last, else contiguous)."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor; got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    kernel, stride = int(kernel), int(stride)
    if kernel < 1 or stride < 1:
        raise ValueError(f"kernel and stride must be >= 1; got kernel={kernel}, stride={stride}")
    n, c, H, W = x.shape
    h = pool_out_size(H, kernel, stride) if H > 0 else 0
    w = pool_out_size(W, kernel, stride) if W > 0 else 0
    if h < 1 or w < 1:
        raise ValueError(f"a {H}x{W} input is too small for {kernel}x{kernel} pooling with stride {stride}")
    channels_last = x.stride(1) == 1 and c > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    p = n * h * w
    if p == 0 or c == 0:
        return out
    bp, bc, warps = launch_config(p, c, x.is_cuda)
    # Offsets in int32 up to unpool.INT32_LIMIT: the last window's positions past the map are
    # masked but their offsets are still formed, and a tile's lanes reach one tile past the end.
    reach = _extent(x) + kernel * (abs(x.stride(2)) + abs(x.stride(3)))
    int64 = max(reach, _extent(out), p + bp, c + bc) > INT32_LIMIT
    max_pool_kernel[(triton.cdiv(p, bp), triton.cdiv(c, bc))](
        x, out, p, c, H, W, h, w, *x.stride(), *out.stride(),
        KERNEL=kernel, STRIDE=stride, INT64=int64, BLOCK_P=bp, BLOCK_C=bc, num_warps=warps,
    )  # fmt: skip
    return out
