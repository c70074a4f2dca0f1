"""Triton: convolution as an implicit GEMM with bias + ReLU (+ 2x2 max pooling) in the epilogue.

Eager cuDNN writes a VGG conv's output, reads and writes it again for the bias and again for
the ReLU, and the pool after a block's last conv reads it once more. Here the GEMM's
accumulator gets the bias and the ReLU in registers, and with POOL each program computes the
four conv outputs of its pooled pixels' 2x2 windows (ceil rounding: positions past the map
are -inf) and keeps their maximum, so the full-size activation never reaches memory:
max(relu(a + b)) = relu(max(a) + b) for a per-channel bias b.

Layout: x channels_last (N, C, H, W) = NHWC in memory; the weight packed once as
(KH * KW * C_in, C_out) (row (ky * KW + kx) * C_in + ci); output channels_last. Rows of the
GEMM are output (or pooled) pixels, columns output channels, K runs over (ky, kx, ci tiles).
Pixel math is int32 (per-image sizes are checked); image and row bases are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _conv_tile(
    x_ptr, w_ptr, n, oy, ox, rmask, co, cmask, C, H, W, Cout, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DIL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """fp32 conv outputs at pixels (n, oy, ox) x channels co: (BLOCK_M, BLOCK_N)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ck = tl.arange(0, BLOCK_K)
    # One loop over K = taps x channel tiles, not loops per tap: the software pipeliner
    # (num_stages) overlaps the loads of the next K step with this one's dot only within one
    # loop, so per-tap loops restarted it every C / BLOCK_K steps (4 for a 64-channel conv at
    # BLOCK_K 16); a tap's pixel math is redone per step, a few vector integer ops per
    # BLOCK_M x BLOCK_N x BLOCK_K dot. Static sm_90a builds (CUDA_LAUNCH's comment) take the same
    # shared memory either way, fewer registers without the pool (largest: 160 -> 124 at TF32,
    # 181 -> 150 for fp32 products) and more with it for fp32 products (96 -> 139 on Triton
    # 3.9.0), none spilling; GPU speed unmeasured.
    # Loops, not static_range: with every tap unrolled (121 copies for FCN-AlexNet's 11x11
    # conv1) its fp32 build had not finished after 100 s (Triton 3.9.0 on the 2-core AMD EPYC
    # Zen 4).
    CT = tl.cdiv(C, BLOCK_K)
    for t in range(0, KH * KW * CT):
        tap = t // CT
        ci = (t - tap * CT) * BLOCK_K + ck
        ky = tap // KW
        iy = oy * STRIDE - pad_h + ky * DIL
        ix = ox * STRIDE - pad_w + (tap - ky * KW) * DIL
        ok = rmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        row = ((n * H + iy) * W + ix).to(tl.int64) * C  # NHWC: a pixel's channels are contiguous
        kmask = ci < C
        a = tl.load(x_ptr + row[:, None] + ci[None, :], mask=ok[:, None] & kmask[None, :], other=0.0)
        wrow = (tap * C + ci).to(tl.int64) * Cout
        b = tl.load(w_ptr + wrow[:, None] + co[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:  # fp32 input (or the interpreter): fp32 products, no TF32
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    return acc


@triton.jit
def conv_bias_relu_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, C, H, W, Cout, Ho, Wo, Hp, Wp, pad_h, pad_w,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, DIL: tl.constexpr, POOL: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = relu(conv(x) + bias), or its 2x2/2 ceil max pool when POOL.

    Grid: (cdiv(N * R, BLOCK_M), cdiv(Cout, BLOCK_N)), R = Hp * Wp pooled pixels when POOL
    else Ho * Wo. out: channels_last (N, Cout, Hp, Wp) or (N, Cout, Ho, Wo).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    R = Hp * Wp if POOL else Ho * Wo
    rmask = r < N * R
    n = r // R
    p = r - n * R
    RW = Wp if POOL else Wo
    py = p // RW
    px = p - py * RW
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = co < Cout
    if POOL:
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), dtype=tl.float32)
        # a loop, not static_range(4): four inlined copies of the conv tile took the pooled bf16
        # build (64, 64, 32, 4, 3), taps unrolled, from 3.3 s to 25.5 s of compile (Triton 3.9.0 on
        # the 2-core AMD EPYC Zen 4) and from 218 registers without spills to 255 with 132/388 B
        for q in range(4):
            oy = py * 2 + q // 2
            ox = px * 2 + q % 2
            valid = rmask & (oy < Ho) & (ox < Wo)  # ceil mode: windows may hang over the edge
            acc = _conv_tile(x_ptr, w_ptr, n, oy, ox, valid, co, cmask, C, H, W, Cout, pad_h, pad_w,
                             KH, KW, STRIDE, DIL, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            best = tl.maximum(best, tl.where(valid[:, None], acc, float("-inf")))
        acc = best
    else:
        acc = _conv_tile(x_ptr, w_ptr, n, py, px, rmask, co, cmask, C, H, W, Cout, pad_h, pad_w,
                         KH, KW, STRIDE, DIL, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    bias = tl.load(b_ptr + co, mask=cmask, other=0.0)
    acc = tl.maximum(acc + bias[None, :], 0.0)
    orow = r.to(tl.int64) * Cout  # channels_last output: row r's channels are contiguous
    tl.store(out_ptr + orow[:, None] + co[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])  # fmt: skip


# Launch configurations on CUDA by (POOL, IEEE): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# IEEE False is tensor-core MMA (bf16, fp16, TF32), IEEE True the FMA path (fp32 products).
# Registers (min-max over the 264 specialisations: every conv geometry, padding class, channel
# alignment and batch class (1, 8, 32) the fused backend launches) from the static sm_90a builds
# with Triton 3.9.0 / 3.6.0, benchmarks/results/static/sm90a-triton-3.9.0.md and -3.6.0.md
# (benchmarks/triton_sm90.py); no configuration spills on either. The first configs,
# (128, 64, 32, 4, 3) and pooled (64, 64, 32, 4, 3) for every dtype, with the first kernel (taps
# and pooled windows unrolled), spilled on 3.9.0 at 255 registers: conv1_1 (3 input channels)
# bf16 756/1368 B (stores/loads), TF32 1792/3028 B; pooled bf16 132/388 B, pooled TF32
# 1016/2584 B, pooled fp32 760/2604 B. The runtime times this kernel against cuDNN per layer
# and shape (fastfcn.runtime.cuda_fast) and uses it only where it wins: on an H200 (Triton 3.6.0,
# bf16, benchmarks/results/h200-2026-12-04-r2.json) only conv1_1 (conv3_3 at batch 8: 1.49 ms
# against cuDNN's fused conv + bias + ReLU 0.37; conv1_2 with its pool at batch 1: 0.216 against
# 0.085 ms for the conv alone).
CUDA_LAUNCH = {
    # 8 warps and a K tile of 16 (a 3-channel conv1_1 used 255 registers at 32 x 4 warps):
    # bf16 / fp16 58-124 / 62-124 registers, TF32 62-123 / 63-128
    (False, False): (128, 64, 16, 8, 3),
    # the pooled kernel holds two (BLOCK_M, BLOCK_N) fp32 tiles (window max and conv tile):
    # bf16 / fp16 75-78 / 75 registers, TF32 116 / 114
    (True, False): (64, 64, 32, 8, 3),
    # 108-150 / 106-154 registers
    (False, True): (128, 64, 16, 8, 2),
    # 96-139 / 128-140 registers; (64, 64, 16, 4, 2) spilled 24/24 B on 3.6.0 with per-tap loops
    (True, True): (32, 64, 16, 4, 2),
}


def launch_config(is_cuda: bool, pool: bool, ieee: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the POOL and IEEE constexprs."""
    if is_cuda:
        return CUDA_LAUNCH[(bool(pool), bool(ieee))]
    return 64, 64, 16, 1, 1  # interpreter: few programs; tl.dot needs every block >= 16


def ieee_dot(is_cuda: bool, dtype, ieee: bool) -> bool:
    """The IEEE constexpr: fp32 products for fp32 input unless TF32 was asked for (ieee=False).
    The interpreter's bf16 dot returned garbage (errors of 1e11 on values of 8), so it always
    multiplies in fp32 there, which is exact for bf16 / fp16 inputs."""
    import torch

    return (bool(ieee) and dtype == torch.float32) or not is_cuda


def pack_weight(weight):
    """(C_out, C_in, KH, KW) -> (KH * KW * C_in, C_out) contiguous: the kernel's B operand."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def conv_bias_relu(x, packed, bias, kernel, padding, stride=1, dilation=1, pool=False, ieee=True):
    """relu(conv2d(x, w, bias, stride, padding, dilation)), 2x2/2 ceil max-pooled when pool.

    x: (N, C_in, H, W) float32/bf16/fp16 (made channels_last); packed: pack_weight(w) in x's
    dtype; bias: (C_out,) float32; kernel, padding: (kh, kw), (ph, pw). ieee: fp32 dot products
    (no TF32) for fp32 input. Returns channels_last (N, C_out, H', W') in x's dtype.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor; got {getattr(x, 'shape', type(x))}")
    n, c, h, w = x.shape
    kh, kw = int(kernel[0]), int(kernel[1])
    if packed.dim() != 2 or packed.shape[0] != kh * kw * c or packed.dtype != x.dtype:
        raise ValueError(
            f"packed weight must be ({kh * kw * c}, C_out) in {x.dtype} (pack_weight); "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    cout = packed.shape[1]
    if bias.shape != (cout,) or bias.dtype != torch.float32:
        raise ValueError(f"bias must be float32 ({cout},); got {tuple(bias.shape)} {bias.dtype}")
    ph, pw = int(padding[0]), int(padding[1])
    ho = (h + 2 * ph - dilation * (kh - 1) - 1) // stride + 1
    wo = (w + 2 * pw - dilation * (kw - 1) - 1) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"a {h}x{w} input is too small for a {kh}x{kw} conv with padding {padding}")
    hp, wp = ((ho + 1) // 2, (wo + 1) // 2) if pool else (ho, wo)
    if max(n * hp * wp, n * h * w, n * ho * wo) >= 2**31 - 4096:  # int32 pixel indices over the batch
        raise ValueError(f"input {tuple(x.shape)} has too many pixels for one launch; split the batch")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, cout, hp, wp), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    use_ieee = ieee_dot(x.is_cuda, x.dtype, ieee)
    bm, bn, bk, warps, stages = launch_config(x.is_cuda, pool, use_ieee)
    grid = (triton.cdiv(n * hp * wp, bm), triton.cdiv(cout, bn))
    conv_bias_relu_kernel[grid](
        x, packed, bias, out, n, c, h, w, cout, ho, wo, hp, wp, ph, pw,
        KH=kh, KW=kw, STRIDE=int(stride), DIL=int(dilation), POOL=bool(pool),
        IEEE=use_ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
