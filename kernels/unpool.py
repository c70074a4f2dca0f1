"""Triton: max pooling with one-byte switches, and max-unpooling as a gather.

Unpooling with non-overlapping windows (stride >= kernel) is a gather: output pixel (Y, X)
lies in at most one window (Y // stride, X // stride), so it reads that window's value and
switch and keeps the value only where the switch points at itself. Every output element is
written exactly once: no zero fill, no scatter, no atomics, and switches can be one byte per
window (dy * kernel + dx) instead of PyTorch's int64 plane index.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .structure import check_switch_window, pool_out_size


@triton.jit
def max_pool_switches_kernel(
    x_ptr, val_ptr, sw_ptr, total, H, W, h, w,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """values[o] = max over the window of o, switches[o] = dy * KERNEL + dx of its first maximum.

    x: (N, C, H, W); values, switches: (N, C, h, w), flat index o. Grid: (cdiv(total, BLOCK),).
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    m = o < total
    ox = o % w
    t = o // w
    oy = t % h
    plane = t // h
    base = x_ptr + plane * H * W
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    sw = tl.zeros((BLOCK,), dtype=tl.int32)
    for dy in tl.static_range(KERNEL):
        for dx in tl.static_range(KERNEL):
            iy = oy * STRIDE + dy
            ix = ox * STRIDE + dx
            ok = m & (iy < H) & (ix < W)
            v = tl.load(base + iy * W + ix, mask=ok, other=float("-inf")).to(tl.float32)
            # torch's max_pool2d: replace when strictly greater or NaN, scanning rows then columns,
            # so the first of equal maxima wins and the initial switch is the window's corner
            upd = ok & ((v > best) | (v != v))
            best = tl.where(upd, v, best)
            sw = tl.where(upd, dy * KERNEL + dx, sw)
    tl.store(val_ptr + o, best.to(val_ptr.dtype.element_ty), mask=m)
    tl.store(sw_ptr + o, sw.to(tl.uint8), mask=m)


@triton.jit
def max_unpool_gather_kernel(
    x_ptr, idx_ptr, out_ptr, total, H, W, h, w,
    KERNEL: tl.constexpr, STRIDE: tl.constexpr, SWITCHES: tl.constexpr, RELU: tl.constexpr,
    INT64: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[n, c, Y, X] = x[n, c, Y // s, X // s] if that window's switch points at (Y, X) else 0.

    x, idx: (N, C, h, w), idx uint8 switches (SWITCHES) or int64 plane indices Y * W + X;
    out: (N, C, H, W), flat index o. Grid: (cdiv(total, BLOCK),). Needs STRIDE >= KERNEL.
    """
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    m = o < total
    X = o % W
    t = o // W
    Y = t % H
    plane = t // H
    oy = Y // STRIDE
    ox = X // STRIDE
    dy = Y - oy * STRIDE
    dx = X - ox * STRIDE
    inwin = m & (dy < KERNEL) & (dx < KERNEL) & (oy < h) & (ox < w)
    src = plane * h * w + oy * w + ox
    if SWITCHES:
        s = tl.load(idx_ptr + src, mask=inwin, other=255).to(tl.int32)
        hit = inwin & (s == (dy * KERNEL + dx).to(tl.int32))
    else:
        s = tl.load(idx_ptr + src, mask=inwin, other=-1)
        hit = inwin & (s == Y * W + X)
    v = tl.load(x_ptr + src, mask=hit, other=0.0)
    if RELU:
        # keeps NaN as torch.relu does. Compared in fp32 (exact for fp16/bf16 inputs): Triton's
        # interpreter compared bf16 as raw 16-bit patterns and kept every negative value.
        v = v.to(tl.float32)
        v = tl.where(v < 0, 0.0, v)
    tl.store(out_ptr + o, v.to(out_ptr.dtype.element_ty), mask=m)


# Launch configuration on CUDA: (BLOCK, num_warps), both kernels: 8 elements per thread. Static
# sm_90a builds (benchmarks/results/static/sm90a-triton-3.9.0.md and -3.6.0.md, from
# benchmarks/triton_sm90.py), Triton 3.9.0 / 3.6.0, no spills in any of the 33 specialisations
# (dtype x int32/int64 indexing x switches or int64 indices x relu): pooling 54-93 registers
# (int64 indexing the most), unpooling 32-70 / 32-64.
CUDA_LAUNCH = (1024, 4)


def launch_config(total: int, is_cuda: bool) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``total`` elements."""
    if is_cuda:
        return CUDA_LAUNCH
    # interpreter: a fixed cost per tl op, so few large programs
    return min(1 << max(0, total - 1).bit_length(), 1 << 16), 1


# Flat element indices fit int32 up to here (the last program's lanes run up to BLOCK - 1 past
# the end). Below it the kernels do their index math (three div/mods per element) in int32: the
# review of the sm_90a builds counted ~40% fewer instructions than with int64; above it, int64.
INT32_LIMIT = 2**31 - 1


def needs_int64(block: int, *numels: int) -> bool:
    """Whether flat indices over tensors of these sizes, in programs of ``block``, overflow int32."""
    return max(numels) + block - 1 > INT32_LIMIT


def max_pool2d_with_switches(x, kernel, stride, ceil_mode):
    """x: (N, C, H, W) -> values (N, C, h, w) in x.dtype, switches (N, C, h, w) uint8 = dy * kernel + dx."""
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor; got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    kernel, stride = int(kernel), int(stride)
    check_switch_window(kernel, stride)
    n, c, H, W = x.shape
    h, w = pool_out_size(H, kernel, stride, ceil_mode), pool_out_size(W, kernel, stride, ceil_mode)
    if h < 1 or w < 1:
        raise ValueError(
            f"a {H}x{W} input is too small for {kernel}x{kernel} pooling (ceil_mode={ceil_mode}): "
            f"the output would be {h}x{w}"
        )
    values = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    switches = torch.empty((n, c, h, w), dtype=torch.uint8, device=x.device)
    total = values.numel()
    if total == 0:
        return values, switches
    block, warps = launch_config(total, x.is_cuda)
    max_pool_switches_kernel[(triton.cdiv(total, block),)](
        x.contiguous(), values, switches, total, H, W, h, w,
        KERNEL=kernel, STRIDE=stride, INT64=needs_int64(block, total, x.numel()), BLOCK=block,
        num_warps=warps,
    )
    return values, switches


def max_unpool2d(x, indices, output_size, kernel, stride, relu):
    """x, indices: (N, C, h, w) -> (N, C, H, W) with output_size = (H, W).

    indices: int64 flat within each (N, C) plane (torch.nn.functional.max_pool2d's), or uint8
    switches (dy * kernel + dx). Windows must not overlap (stride >= kernel); for int64 indices
    the gather equals torch's scatter when every index lies in its own window of the output,
    which holds for indices from max_pool2d on an input of size output_size.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, h, w) tensor; got {getattr(x, 'shape', type(x))}")
    if indices.shape != x.shape:
        raise ValueError(f"indices must have the shape of x {tuple(x.shape)}; got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.uint8):
        raise ValueError(f"indices must be int64 (PyTorch) or uint8 (switches); got {indices.dtype}")
    if indices.device != x.device:
        raise ValueError(f"indices are on {indices.device} but x is on {x.device}")
    kernel, stride = int(kernel), int(stride)
    if kernel < 1 or stride < kernel:
        raise ValueError(
            f"the gather needs non-overlapping windows (stride >= kernel >= 1); got kernel={kernel}, "
            f"stride={stride}"
        )
    n, c, h, w = x.shape
    H, W = int(output_size[-2]), int(output_size[-1])
    out = torch.empty((n, c, H, W), dtype=x.dtype, device=x.device)
    total = out.numel()
    if total == 0:
        return out
    block, warps = launch_config(total, x.is_cuda)
    max_unpool_gather_kernel[(triton.cdiv(total, block),)](
        x.contiguous(), indices.contiguous(), out, total, H, W, h, w,
        KERNEL=kernel, STRIDE=stride, SWITCHES=indices.dtype == torch.uint8, RELU=bool(relu),
        INT64=needs_int64(block, total, x.numel()), BLOCK=block, num_warps=warps,
    )
    return out
