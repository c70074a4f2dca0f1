"""Triton: the FCN skip path. Transposed-conv upsampling fused with crop, scaled skip add,
and the final argmax / softmax over classes.

Without padding, output row oy of conv_transpose2d(x, w, stride=s) receives input rows
iy = oy // s - t with kernel row ky = oy % s + t * s for t = 0 .. ceil(k/s) - 1 (valid when
ky < k and 0 <= iy < h), so every output pixel gathers ceil(k/s)^2 input positions: 4 for
the reference nets' k = 2s. Each program owns BLOCK_P output pixels (only the cropped ones)
of one image and a BLOCK_C tile of classes; labels and probs loop over all class tiles so
the (N, C, H, W) logits never reach memory.

Weight kinds (kernels.structure.weight_kind): "bilinear" computes the taps from the formula
and reads no weight; "depthwise" reads the (C, k, k) diagonal; "dense" reads the full
(C_in, C_out, k, k) weight and loops over input channels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .structure import KIND_CODES, KINDS, check_output, labels_dtype, output_code


@triton.jit
def _stage_tile(
    x_ptr, w_ptr, skip_ptr, n, c0, C, h, w, oy, ox, sy, sx, Hs, Ws, scale, pmask,
    K: tl.constexpr, S: tl.constexpr, T: tl.constexpr, KIND: tl.constexpr, HAS_SKIP: tl.constexpr,
    CENTER: tl.constexpr, FACTOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 logits of classes c0 .. c0 + BLOCK_C at transposed-conv pixels (oy, ox): (BLOCK_P, BLOCK_C)."""
    co = c0 + tl.arange(0, BLOCK_C)
    cmask = co < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # pixel math is int32 (per-plane sizes < 2**31, checked by the launcher); plane bases are int64
    iy0 = oy // S
    ky0 = oy - iy0 * S
    ix0 = ox // S
    kx0 = ox - ix0 * S
    hw = h * w
    x_n = x_ptr + n * C * hw  # n is int64
    for ty in tl.static_range(T):
        iy = iy0 - ty
        ky = ky0 + ty * S
        vy = pmask & (ky < K) & (iy >= 0) & (iy < h)
        for tx in tl.static_range(T):
            ix = ix0 - tx
            kx = kx0 + tx * S
            v = vy & (kx < K) & (ix >= 0) & (ix < w)
            sp = iy * w + ix
            tap = ky * K + kx
            if KIND == 2:
                m2 = v[:, None] & cmask[None, :]
                for ci in range(0, C):
                    xv = tl.load(x_n + ci * hw + sp, mask=v, other=0.0).to(tl.float32)
                    wv = tl.load(w_ptr + (ci * C + co[None, :]) * (K * K) + tap[:, None], mask=m2, other=0.0)
                    acc += xv[:, None] * wv.to(tl.float32)
            else:
                m2 = v[:, None] & cmask[None, :]
                xv = tl.load(x_n + co[None, :] * hw + sp[:, None], mask=m2, other=0.0).to(tl.float32)
                if KIND == 0:
                    fy = 1.0 - tl.abs(ky.to(tl.float32) - CENTER) / FACTOR
                    fx = 1.0 - tl.abs(kx.to(tl.float32) - CENTER) / FACTOR
                    acc += xv * (fy * fx)[:, None]
                else:
                    wv = tl.load(w_ptr + co[None, :] * (K * K) + tap[:, None], mask=m2, other=0.0)
                    acc += xv * wv.to(tl.float32)
    if HAS_SKIP:
        m2 = pmask[:, None] & cmask[None, :]
        s_plane = (n * C + co.to(tl.int64)) * (Hs * Ws)
        s_off = s_plane[None, :] + (sy * Ws + sx)[:, None]
        acc += scale * tl.load(skip_ptr + s_off, mask=m2, other=0.0).to(tl.float32)
    return acc


@triton.jit
def upsample_kernel(
    x_ptr, w_ptr, skip_ptr, out_ptr,
    C, h, w, Ho, Wo, off, soff, Hs, Ws, scale,
    K: tl.constexpr, S: tl.constexpr, T: tl.constexpr, KIND: tl.constexpr, OUTPUT: tl.constexpr,
    HAS_SKIP: tl.constexpr, CENTER: tl.constexpr, FACTOR: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c, py, px] = convT(x)[n, c, off + py, off + px] + scale * skip[n, c, soff + py, soff + px].

    Grid: (cdiv(Ho * Wo, BLOCK_P), N, cdiv(C, BLOCK_C) for logits else 1).
    OUTPUT (structure.output_code) 0 writes (N, C, Ho, Wo) logits, 1 or 2 (N, Ho, Wo) argmax labels
    (uint8 or int32: the store converts to out_ptr's type), 3 (N, C, Ho, Wo) softmax.
    """
    # Pixel indices stay int32 (64-bit div/mod per pixel is several times the instructions);
    # the launcher checks Ho * Wo + BLOCK_P < 2**31. Image and class plane bases are int64:
    # C * Ho * Wo exceeds 2**31 for 256 classes at 4096 x 4096.
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    HWo = Ho * Wo
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HWo
    py = p // Wo
    px = p - py * Wo
    oy = py + off
    ox = px + off
    sy = py + soff
    sx = px + soff
    out_n = out_ptr + n * C * HWo  # int64: n is
    if OUTPUT == 0:
        c0 = pid_c * BLOCK_C
        acc = _stage_tile(x_ptr, w_ptr, skip_ptr, n, c0, C, h, w, oy, ox, sy, sx, Hs, Ws, scale, pmask,
                          K, S, T, KIND, HAS_SKIP, CENTER, FACTOR, BLOCK_P, BLOCK_C)
        co = c0 + tl.arange(0, BLOCK_C)
        m2 = pmask[:, None] & (co < C)[None, :]
        o_off = (co.to(tl.int64) * HWo)[None, :] + p[:, None]
        tl.store(out_n + o_off, acc.to(out_ptr.dtype.element_ty), mask=m2)
    elif OUTPUT <= 2:
        best = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
        arg = tl.zeros((BLOCK_P,), dtype=tl.int32)
        nan_arg = tl.full((BLOCK_P,), C, dtype=tl.int32)  # first NaN class, C while none
        for c0 in range(0, C, BLOCK_C):
            acc = _stage_tile(x_ptr, w_ptr, skip_ptr, n, c0, C, h, w, oy, ox, sy, sx, Hs, Ws, scale, pmask,
                              K, S, T, KIND, HAS_SKIP, CENTER, FACTOR, BLOCK_P, BLOCK_C)
            co = c0 + tl.arange(0, BLOCK_C)
            acc = tl.where((co < C)[None, :], acc, float("-inf"))
            cmax = tl.max(acc, axis=1)
            # lowest class index among the tile's maxima, as torch.argmax on ties
            cidx = tl.min(tl.where(acc == cmax[:, None], co[None, :], C), axis=1).to(tl.int32)
            # strict >: an equal maximum in a later tile keeps the earlier (lower) index
            upd = cmax > best
            best = tl.where(upd, cmax, best)
            arg = tl.where(upd, cidx, arg)
            # a NaN wins its pixel, the first NaN class kept, as torch.argmax (the comparisons
            # above never pick one)
            nan_arg = tl.minimum(nan_arg, tl.min(tl.where(acc != acc, co[None, :], C), axis=1).to(tl.int32))
        arg = tl.where(nan_arg < C, nan_arg, arg)
        tl.store(out_ptr + n * HWo + p, arg.to(out_ptr.dtype.element_ty), mask=pmask)
    else:
        m = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
        ssum = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            acc = _stage_tile(x_ptr, w_ptr, skip_ptr, n, c0, C, h, w, oy, ox, sy, sx, Hs, Ws, scale, pmask,
                              K, S, T, KIND, HAS_SKIP, CENTER, FACTOR, BLOCK_P, BLOCK_C)
            co = c0 + tl.arange(0, BLOCK_C)
            acc = tl.where((co < C)[None, :], acc, float("-inf"))
            m_new = tl.maximum(m, tl.max(acc, axis=1))
            ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
            m = m_new
        # second pass recomputes the logits: cheaper than writing and re-reading them
        # for the 4-tap kinds, and keeps one launch
        for c0 in range(0, C, BLOCK_C):
            acc = _stage_tile(x_ptr, w_ptr, skip_ptr, n, c0, C, h, w, oy, ox, sy, sx, Hs, Ws, scale, pmask,
                              K, S, T, KIND, HAS_SKIP, CENTER, FACTOR, BLOCK_P, BLOCK_C)
            co = c0 + tl.arange(0, BLOCK_C)
            m2 = pmask[:, None] & (co < C)[None, :]
            prob = tl.exp(acc - m[:, None]) / ssum[:, None]
            o_off = (co.to(tl.int64) * HWo)[None, :] + p[:, None]
            tl.store(out_n + o_off, prob.to(out_ptr.dtype.element_ty), mask=m2)


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# Launch configurations on CUDA: (BLOCK_P, BLOCK_C, num_warps). BLOCK_C = 1 makes every tile a
# vector of pixels and the kernel loops over classes (labels/probs inside one program, logits one
# class per program), so there is no class axis for the compiler to lay out: robust across
# Triton versions, and each class plane is read and written along contiguous pixels.
# Measured before (sm_90a builds, static review of the compiled kernels): the 256-pixel x
# 32-class tile spilled 3.4-5 KB per thread (depthwise labels) and 11-12 KB (probs), bilinear
# used 255 registers with spills; a 128 x 8 tile compiled without spills on Triton 3.6 but on
# Triton 3.9 the same code laid classes on lanes and spilled 20 KB. The configs below, in the
# static sm_90a builds of all 198 upsample specialisations (every kind x output x dtype x head
# geometry; benchmarks/results/static/sm90a-triton-3.9.0.md and -3.6.0.md, from
# benchmarks/triton_sm90.py), use no shared memory and never spill on Triton 3.9.0 or 3.6.0;
# registers per kind below (3.9.0 / 3.6.0 where they differ). Measured on an H200 (Triton 3.6.0,
# final stage to labels, batch 8, 1080x1920, 21 classes; benchmarks/results/h200-2026-12-04-r2.json):
# bilinear 0.660 ms, depthwise 0.793, dense 14.1 (the old 256 x 32 tiles: 1.33, 3.47, 17.7; the
# best alternatives measured: 128 x 1 at 0.61 / 0.75, and for dense 128 x 8 at 9.9 ms, not
# taken: a class axis is what spilled on Triton 3.9 above, and 9.9 ms is still eager's 9.4).
CUDA_LAUNCH = {
    # logits 30-32, add stages 30-32, labels 56, probs 48 registers
    "bilinear": (256, 1, 4),
    # logits 32, add stages 32, labels 64, probs 56 / 64
    "depthwise": (256, 1, 4),
    # dense loops over input channels per class: half the pixels keep more programs in flight;
    # 32-40 registers for every output
    "dense": (128, 1, 4),
}


def launch_config(is_cuda: bool, kind: str, output: str, c: int, hw: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for one stage of C classes and hw output pixels."""
    if is_cuda:
        return CUDA_LAUNCH[kind]
    # interpreter: each tl op costs a fixed overhead, so few large programs with wide class tiles
    block_c = min(_pow2(c), 64)
    return min(_pow2(hw), (1 << 18) // block_c), block_c, 1


def stage_constexprs(k: int, s: int, kind: str, output: str, c: int, has_skip: bool) -> dict:
    """upsample_kernel's constexprs (all but the block sizes) for one stage: a k x k, stride s
    upsampling of ``kind`` to ``output`` ("logits" for an add stage) over c classes."""
    factor = (k + 1) // 2
    center = factor - 1.0 if k % 2 == 1 else factor - 0.5
    return dict(
        K=k, S=s, T=triton.cdiv(k, s), KIND=KIND_CODES[kind], OUTPUT=output_code(output, c),
        HAS_SKIP=bool(has_skip), CENTER=float(center), FACTOR=float(factor),
    )


# Per-plane sizes above this need 64-bit pixel math, which the kernel does not carry (a 46341 x
# 46341 map; the Segmenter's max_pixels default is 4096 x 4096).
PLANE_LIMIT = 2**31 - 1 - 4096


def _check(x, weight, stride, kind):
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, h, w) tensor; got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x must be float32, float16 or bfloat16; got {x.dtype}")
    c = x.shape[1]
    if (
        weight.dim() != 4
        or weight.shape[0] != c
        or weight.shape[1] not in (1, c)
        or weight.shape[2] != weight.shape[3]
    ):
        raise ValueError(
            f"weight must be (C, C, k, k) or (C, 1, k, k) with C={c}; got {tuple(weight.shape)}"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if kind == "dense" and weight.shape[1] != c:
        raise ValueError(f"a dense weight must be (C, C, k, k) with C={c}; got {tuple(weight.shape)}")
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1; got {stride}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if x.shape[1] * x.shape[2] * x.shape[3] > PLANE_LIMIT:
        raise ValueError(f"x of shape {tuple(x.shape)} has over 2**31 elements per image; split it")


def _check_plane(ho: int, wo: int, skip) -> None:
    if ho * wo > PLANE_LIMIT:
        raise ValueError(f"an output plane of {ho}x{wo} has over 2**31 pixels; tile the image")
    if skip is not None and skip.shape[1] * skip.shape[2] * skip.shape[3] > PLANE_LIMIT:
        raise ValueError(f"skip of shape {tuple(skip.shape)} has over 2**31 elements per image; split it")


def _launch(x, weight, stride, kind, skip, soff, scale, off, size, output, out_dtype):
    """Run one stage. x: (N, C, h, w) -> (N, C, H, W) logits/probs or (N, H, W) labels."""
    import torch

    n, c, h, w = x.shape
    k = int(weight.shape[-1])
    s = int(stride)
    ho, wo = int(size[0]), int(size[1])
    _check_plane(ho, wo, skip)
    if output == "labels":
        out = torch.empty((n, ho, wo), dtype=labels_dtype(c), device=x.device)
    else:
        out = torch.empty((n, c, ho, wo), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    if kind == "bilinear":
        wk = x  # never read: the taps come from the formula
    elif kind == "depthwise":
        if weight.shape[1] == 1:
            wk = weight[:, 0]
        else:
            wk = torch.diagonal(weight, dim1=0, dim2=1).permute(2, 0, 1)
        wk = wk.float().contiguous()
    else:
        wk = weight.float().contiguous()
    if skip is not None:
        skip = skip.contiguous()
        hs, ws = skip.shape[-2:]
    else:
        skip, hs, ws = x, 0, 0
    hw = ho * wo
    block_p, block_c, num_warps = launch_config(x.is_cuda, kind, output, c, hw)
    grid = (triton.cdiv(hw, block_p), n, triton.cdiv(c, block_c) if output == "logits" else 1)
    upsample_kernel[grid](
        x, wk, skip, out,
        c, h, w, ho, wo, int(off), int(soff), hs, ws, float(scale),
        **stage_constexprs(k, s, kind, output, c, skip is not x),
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def upsample_add(x, weight, stride, skip, offset, scale, kind, out_dtype=None):
    """conv_transpose2d(x, weight, stride) + scale * skip[:, :, offset:offset+Ho, offset:offset+Wo].

    x: (N, C, h, w); weight: (C, C, k, k) or (C, 1, k, k); skip: (N, C, Hs, Ws) or None.
    Returns (N, C, Ho, Wo), Ho = (h - 1) * stride + k, in out_dtype (default x.dtype).
    """
    _check(x, weight, stride, kind)
    n, c, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = (h - 1) * int(stride) + k, (w - 1) * int(stride) + k
    if skip is not None:
        if skip.dim() != 4 or tuple(skip.shape[:2]) != (n, c):
            raise ValueError(f"skip must be (N, C, Hs, Ws) = ({n}, {c}, ...); got {tuple(skip.shape)}")
        if offset < 0 or offset + ho > skip.shape[2] or offset + wo > skip.shape[3]:
            raise ValueError(
                f"skip of {skip.shape[2]}x{skip.shape[3]} is too small for a {ho}x{wo} crop "
                f"at offset {offset}"
            )
        if skip.device != x.device:
            raise ValueError(f"skip is on {skip.device} but x is on {x.device}")
    return _launch(x, weight, stride, kind, skip, offset, scale, 0, (ho, wo), "logits", out_dtype or x.dtype)


def upsample_crop(x, weight, stride, offset, size, output, kind, out_dtype=None):
    """conv_transpose2d(x, weight, stride)[:, :, offset:offset+H, offset:offset+W] as logits/labels/probs.

    x: (N, C, h, w) -> (N, C, H, W) logits or probs in out_dtype (default x.dtype), or (N, H, W)
    labels (uint8 when C <= 256 else int32; ties to the lowest index). Only kept pixels are computed.
    """
    _check(x, weight, stride, kind)
    check_output(output)
    h, w = x.shape[-2:]
    k = weight.shape[-1]
    ho, wo = (h - 1) * int(stride) + k, (w - 1) * int(stride) + k
    H, W = int(size[0]), int(size[1])
    if offset < 0 or H < 0 or W < 0 or offset + H > ho or offset + W > wo:
        raise ValueError(f"crop of {H}x{W} at offset {offset} does not fit the {ho}x{wo} upsampled map")
    return _launch(x, weight, stride, kind, None, 0, 1.0, offset, (H, W), output, out_dtype or x.dtype)


def fcn_head(score, skips, weights, strides, offsets, scales, size, output, kinds):
    """A whole FCN head: one launch per skip stage, then one fused upsample+crop(+argmax/softmax).

    score: (N, C, h, w); skips[i]: (N, C, Hi, Wi); weights/strides/offsets/kinds: len(skips) + 1;
    scales: len(skips). Intermediate stages stay in fp32 (they are 1/s^2 of the output's size).
    """
    n = len(skips)
    if not (len(weights) == len(strides) == len(offsets) == len(kinds) == n + 1 and len(scales) == n):
        raise ValueError(
            f"a head with {n} skips needs {n + 1} weights, strides, offsets and kinds and {n} scales; got "
            f"{len(weights)}, {len(strides)}, {len(offsets)}, {len(kinds)} and {len(scales)}"
        )
    import torch

    y = score
    for i in range(n):
        y = upsample_add(y, weights[i], strides[i], skips[i], offsets[i], scales[i], kinds[i], torch.float32)
    return upsample_crop(y, weights[n], strides[n], offsets[n], size, output, kinds[n], score.dtype)
