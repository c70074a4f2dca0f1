"""C++ twins of the fused ops, bound with pybind11 (``fastfcn.kernels.cpu._ext``).

Same arguments and results as ``fastfcn.kernels.reference``, plus ``kind``, the
weight structure from ``fastfcn.kernels.structure.weight_kind`` (detected once
per weight by the caller): "bilinear" uses the formula's separable taps
(ceil(k/s) per dimension, the weight's values are not read), "depthwise" the
diagonal filters (C, k, k), "dense" the full (C, C, k, k) weight. A wrong
``kind`` gives wrong numbers, so callers pass what ``weight_kind`` returned.

Dtypes: fp32, fp16 and bf16 tensors on the CPU. Computation is always fp32:
fp16/bf16 inputs are converted to contiguous fp32 here (weights and skips are
first rounded to the input's dtype, as the reference does), and logits/probs
are converted back to the input's dtype at the end. Intermediate maps of
``fcn_head`` stay fp32 (the reference rounds them to the input dtype per stage),
so at low precision the two differ by the dtype's rounding, not more.

Threads: the kernels use OpenMP with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import torch

from ..structure import (
    KIND_CODES,
    KINDS,
    OUT_LABELS_I32,
    OUT_LABELS_U8,
    OUT_LOGITS,
    bilinear_1d,
    check_switch_window,
    diagonal,
    output_code,
    pool_out_size,
)

try:
    from . import _ext
except ImportError:  # built without a compiler: the ops dispatcher falls back to the reference
    _ext = None

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """True when the C++ extension was built and imports."""
    return _ext is not None


def _need_ext():
    if _ext is None:
        raise RuntimeError(
            "fastfcn's C++ CPU kernels are not built (no C++ compiler at install time?); "
            "reinstall with a compiler, or use impl='reference'"
        )


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check_map(t, name: str, dtypes=_FLOATS) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be (N, C, H, W); got shape {tuple(t.shape)}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the C++ kernels take CPU tensors (use impl='triton')")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {[str(d) for d in dtypes]}; got {t.dtype}")


CL = torch.channels_last


def _channels_last(t: torch.Tensor) -> bool:
    """Stored (N, H, W, C): the pooling/unpooling twins then keep that layout, so the
    channels_last convolutions around them need no layout copy. DeconvNet width 1, 224x224,
    batch 2, fused fp32, 1 thread, median CPU-seconds of 5 interleaved runs on a shared 2-core
    Zen 4: 1.39 s with the NHWC twins vs 1.50 s converting to and from NCHW around them."""
    # hasattr: an extension built before the NHWC twins existed keeps working through NCHW.
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous() and hasattr(_ext, "max_unpool2d_nhwc")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _int(v, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {v!r}")
    return int(v)


def _size(size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (H, W); got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive; got {size!r}")
    return h, w


def _weight(weight, c: int, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, int, int]:
    """(fp32 contiguous weight as the kernel reads it, k, kind code)."""
    if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
        raise ValueError("weight must be a CPU torch.Tensor")
    if (
        weight.dim() != 4
        or weight.shape[0] != c
        or weight.shape[2] != weight.shape[3]
        or weight.shape[1] not in (1, c)
    ):
        raise ValueError(
            f"upsampling weight must be (C, C, k, k) or (C, 1, k, k) with C={c} matching the input's "
            f"channels; got {tuple(weight.shape)}"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (see kernels.structure.weight_kind); got {kind!r}")
    k = int(weight.shape[2])
    if k < 1:
        raise ValueError("upsampling kernel size must be >= 1")
    if kind == "dense" and weight.shape[1] == 1 and c > 1:
        kind = "depthwise"  # a (C, 1, k, k) weight is grouped: only its diagonal exists
    if kind == "bilinear":
        w = bilinear_1d(k, torch.float32)
    elif kind == "depthwise":
        w = diagonal(weight.detach()).to(dtype).float().contiguous()
    else:
        w = weight.detach().to(dtype).float().contiguous()
    return w, k, KIND_CODES[kind]


def _alloc(code: int, n: int, c: int, h: int, w: int) -> torch.Tensor:
    if code == OUT_LABELS_U8:
        return torch.empty((n, h, w), dtype=torch.uint8)
    if code == OUT_LABELS_I32:
        return torch.empty((n, h, w), dtype=torch.int32)
    return torch.empty((n, c, h, w), dtype=torch.float32)


def _finish(out: torch.Tensor, code: int, dtype: torch.dtype) -> torch.Tensor:
    return out if code in (OUT_LABELS_U8, OUT_LABELS_I32) else out.to(dtype)


def _skip(skip, n: int, c: int, ho: int, wo: int, offset, dtype) -> tuple[torch.Tensor | None, int]:
    offset = _int(offset, "offset", 0)
    if skip is None:
        return None, offset
    _check_map(skip, "skip")
    if tuple(skip.shape[:2]) != (n, c):
        raise ValueError(f"skip must be (N, C, Hs, Ws) = ({n}, {c}, ...); got {tuple(skip.shape)}")
    if offset + ho > skip.shape[2] or offset + wo > skip.shape[3]:
        raise ValueError(
            f"crop of {ho}x{wo} at offset {offset} does not fit the {skip.shape[2]}x{skip.shape[3]} skip"
        )
    return skip.to(dtype).float().contiguous(), offset


def upsample_add(x, weight, stride, skip=None, offset=0, scale=1.0, kind="dense") -> torch.Tensor:
    """conv_transpose2d(x, weight, stride) + scale * skip cropped at `offset`.

    x: (N, C, h, w); weight: (C, C, k, k) or (C, 1, k, k); skip: (N, C, Hs, Ws) or None.
    Returns (N, C, Ho, Wo), Ho = (h - 1) * stride + k, in x's dtype.
    """
    _need_ext()
    _check_map(x, "x")
    n, c, h, w = x.shape
    stride = _int(stride, "stride", 1)
    wt, k, kc = _weight(weight, c, kind, x.dtype)
    ho, wo = (h - 1) * stride + k, (w - 1) * stride + k
    sk, offset = _skip(skip, n, c, ho, wo, offset, x.dtype)
    xf = _f32(x)
    out = torch.empty((n, c, ho, wo), dtype=torch.float32)
    _ext.upsample_region(
        xf.data_ptr(), n, c, h, w, kc, wt.data_ptr(), k, stride,
        0 if sk is None else sk.data_ptr(), 0 if sk is None else sk.shape[2],
        0 if sk is None else sk.shape[3], offset, float(scale),
        0, 0, ho, wo, OUT_LOGITS, out.data_ptr(), _threads(),
    )  # fmt: skip
    return out.to(x.dtype)


def upsample_crop(x, weight, stride, offset, size, output="logits", kind="dense") -> torch.Tensor:
    """conv_transpose2d cropped to `size` from `offset`; only the kept pixels are computed.

    x: (N, C, h, w) -> logits/probs (N, C, H, W) in x's dtype, or labels (N, H, W)
    uint8 when C <= 256 else int32 (ties to the lowest class, as torch.argmax).
    """
    _need_ext()
    _check_map(x, "x")
    n, c, h, w = x.shape
    stride = _int(stride, "stride", 1)
    offset = _int(offset, "offset", 0)
    oh, ow = _size(size)
    code = output_code(output, c)
    wt, k, kc = _weight(weight, c, kind, x.dtype)
    ho, wo = (h - 1) * stride + k, (w - 1) * stride + k
    if offset + oh > ho or offset + ow > wo:
        raise ValueError(f"crop of {oh}x{ow} at offset {offset} does not fit a {ho}x{wo} map")
    xf = _f32(x)
    out = _alloc(code, n, c, oh, ow)
    _ext.upsample_region(
        xf.data_ptr(), n, c, h, w, kc, wt.data_ptr(), k, stride, 0, 0, 0, 0, 0.0,
        offset, offset, oh, ow, code, out.data_ptr(), _threads(),
    )  # fmt: skip
    return _finish(out, code, x.dtype)


def fcn_head(score, skips, weights, strides, offsets, scales, size, output="logits", kinds=None):
    """A whole FCN head in one call: upsample+add per skip, then upsample+crop as `output`.

    score: (N, C, h, w); skips[i]: (N, C, Hi, Wi); weights/strides/offsets/kinds have
    len(skips) + 1 entries (the last is the final stage, its offset the final crop),
    scales len(skips). Intermediate maps stay fp32 inside the extension; the final
    stage computes only the kept pixels and, for labels, writes no float map.
    """
    _need_ext()
    _check_map(score, "score")
    skips, weights, strides = list(skips), list(weights), list(strides)
    offsets, scales = list(offsets), list(scales)
    ns = len(skips)
    kinds = ["dense"] * (ns + 1) if kinds is None else list(kinds)
    if not (len(weights) == len(strides) == len(offsets) == len(kinds) == ns + 1 and len(scales) == ns):
        raise ValueError(
            f"a head with {ns} skips needs {ns + 1} weights, strides, offsets and kinds and {ns} scales; got "
            f"{len(weights)}, {len(strides)}, {len(offsets)}, {len(kinds)} and {len(scales)}"
        )
    n, c, h, w = score.shape
    oh, ow = _size(size)
    code = output_code(output, c)
    dtype = score.dtype
    keep = []  # tensors whose addresses the extension reads
    wptr, ks, kcs, sptr, sh, sw, strd, offs = [], [], [], [], [], [], [], []
    ch, cw = h, w
    for i in range(ns + 1):
        s = _int(strides[i], f"strides[{i}]", 1)
        wt, k, kc = _weight(weights[i], c, kinds[i], dtype)
        keep.append(wt)
        ho, wo = (ch - 1) * s + k, (cw - 1) * s + k
        if i < ns:
            sk, off = _skip(skips[i], n, c, ho, wo, offsets[i], dtype)
            if sk is None:
                raise ValueError(f"skips[{i}] is None; a head stage needs its skip map")
            keep.append(sk)
            sptr.append(sk.data_ptr())
            sh.append(sk.shape[2])
            sw.append(sk.shape[3])
        else:
            off = _int(offsets[i], f"offsets[{i}]", 0)
            if off + oh > ho or off + ow > wo:
                raise ValueError(f"final crop of {oh}x{ow} at offset {off} does not fit a {ho}x{wo} map")
        wptr.append(wt.data_ptr())
        ks.append(k)
        kcs.append(kc)
        strd.append(s)
        offs.append(off)
        ch, cw = ho, wo
    xf = _f32(score)
    out = _alloc(code, n, c, oh, ow)
    _ext.fcn_head(
        xf.data_ptr(), n, c, h, w, sptr, sh, sw, wptr, kcs, ks, strd, offs, [float(a) for a in scales],
        oh, ow, code, out.data_ptr(), _threads(),
    )  # fmt: skip
    return _finish(out, code, dtype)


def max_pool2d_with_switches(x, kernel=2, stride=2, ceil_mode=True) -> tuple[torch.Tensor, torch.Tensor]:
    """Max pooling with one-byte switches dy * kernel + dx (the first maximum; NaN propagates).

    x: (N, C, H, W) -> values (N, C, h, w) in x's dtype, switches (N, C, h, w) uint8.
    """
    _need_ext()
    _check_map(x, "x")
    kernel = _int(kernel, "kernel", 1)
    stride = _int(stride, "stride", 1)
    check_switch_window(kernel, stride)
    n, c, H, W = x.shape
    h, w = (pool_out_size(v, kernel, stride, bool(ceil_mode)) for v in (H, W))
    if h < 1 or w < 1:
        raise ValueError(f"a {H}x{W} input is smaller than the {kernel}x{kernel} pooling window")
    if _channels_last(x):
        xf = x.to(torch.float32).contiguous(memory_format=CL)
        values = torch.empty((n, c, h, w), dtype=torch.float32, memory_format=CL)
        switches = torch.empty((n, c, h, w), dtype=torch.uint8, memory_format=CL)
        _ext.max_pool2d_switches_nhwc(
            xf.data_ptr(), n, c, H, W, kernel, stride, h, w, values.data_ptr(), switches.data_ptr(),
            _threads(),
        )  # fmt: skip
        return values.to(x.dtype), switches
    xf = _f32(x)
    values = torch.empty((n, c, h, w), dtype=torch.float32)
    switches = torch.empty((n, c, h, w), dtype=torch.uint8)
    _ext.max_pool2d_switches(
        xf.data_ptr(), n * c, H, W, kernel, stride, h, w, values.data_ptr(), switches.data_ptr(), _threads()
    )
    return values.to(x.dtype), switches


def max_pool2d_nhwc(x, kernel=2, stride=2, ceil_mode=True) -> torch.Tensor:
    """max_pool2d without indices (no padding, torch's window rules; NaN propagates), for a
    channels_last fp32 or bf16 map: x (N, C, H, W) stored (N, H, W, C) -> (N, C, h, w), same
    dtype and layout. Exact: the maximum element itself is copied."""
    _need_ext()
    _check_map(x, "x", (torch.float32, torch.bfloat16))
    if not x.is_contiguous(memory_format=CL):
        raise ValueError("x must be channels_last (x.contiguous(memory_format=torch.channels_last))")
    kernel = _int(kernel, "kernel", 1)
    stride = _int(stride, "stride", 1)
    n, c, H, W = x.shape
    h, w = (pool_out_size(v, kernel, stride, bool(ceil_mode)) for v in (H, W))
    if h < 1 or w < 1:
        raise ValueError(f"a {H}x{W} input is smaller than the {kernel}x{kernel} pooling window")
    out = torch.empty((n, c, h, w), dtype=x.dtype, memory_format=CL)
    _ext.max_pool2d_nhwc(
        x.data_ptr(), x.dtype == torch.bfloat16, n, c, H, W, kernel, stride, h, w, out.data_ptr(), _threads()
    )
    return out


def max_unpool2d(x, indices, output_size, kernel=2, stride=2, relu=False) -> torch.Tensor:
    """torch.nn.functional.max_unpool2d as a gather, optionally on relu(x).

    x: (N, C, h, w); indices: (N, C, h, w) int64 flat within each plane (from
    max_pool2d(return_indices=True) with the same kernel/stride, stride >= kernel)
    or uint8 switches (dy * kernel + dx); output_size: (H, W) or (N, C, H, W).
    Returns (N, C, H, W) in x's dtype. An index outside its own window raises.
    """
    _need_ext()
    _check_map(x, "x")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.uint8):
        raise ValueError("indices must be an int64 (PyTorch) or uint8 (compact switches) tensor")
    if indices.shape != x.shape:
        raise ValueError(f"indices must have the shape of x {tuple(x.shape)}; got {tuple(indices.shape)}")
    if indices.device.type != "cpu":
        raise ValueError(f"indices are on {indices.device}; the C++ kernels take CPU tensors")
    kernel = _int(kernel, "kernel", 1)
    stride = _int(stride, "stride", 1)
    if stride < kernel:
        raise ValueError(
            "the gather needs non-overlapping windows (stride >= kernel); "
            f"got kernel={kernel}, stride={stride}"
        )
    try:
        H, W = int(output_size[-2]), int(output_size[-1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"output_size must be (H, W); got {output_size!r}") from None
    n, c, h, w = x.shape
    for name, big, small in (("height", H, h), ("width", W, w)):
        default = (small - 1) * stride + kernel
        # torch accepts default - stride < size < default + stride; below (small - 1) * stride + 1
        # a window would start outside the output, which real indices never allow.
        lo = max(default - stride, (small - 1) * stride)
        if not lo < big < default + stride:
            raise ValueError(
                f"output {name} {big} does not match a {small}-window input with kernel {kernel}, stride "
                f"{stride}: expected {lo + 1}..{default + stride - 1}"
            )
    if _channels_last(x) and indices.dtype == torch.uint8:
        xf = x.to(torch.float32).contiguous(memory_format=CL)
        idx = indices.contiguous(memory_format=CL)
        out = torch.empty((n, c, H, W), dtype=torch.float32, memory_format=CL)
        bad = _ext.max_unpool2d_nhwc(
            xf.data_ptr(), idx.data_ptr(), n, c, h, w, H, W, kernel, stride, bool(relu), out.data_ptr(),
            _threads(),
        )  # fmt: skip
    else:
        xf = _f32(x)
        idx = indices.contiguous()
        out = torch.empty((n, c, H, W), dtype=torch.float32)
        bad = _ext.max_unpool2d(
            xf.data_ptr(), idx.data_ptr(), idx.dtype == torch.uint8, n * c, h, w, H, W, kernel, stride,
            bool(relu), out.data_ptr(), _threads(),
        )  # fmt: skip
    if bad:
        raise ValueError(
            f"{bad} indices do not point inside their own {kernel}x{kernel} window of the {H}x{W} output; "
            "the gather needs indices from max_pool2d with this kernel and stride on a map of output_size"
        )
    return out.to(x.dtype)


__all__ = [
    "available",
    "fcn_head",
    "max_pool2d_nhwc",
    "max_pool2d_with_switches",
    "max_unpool2d",
    "upsample_add",
    "upsample_crop",
]
