"""The fused backend's CPU convolutions, chosen on the machine where they run.

Every Conv step of a model (``SegmentationModel.conv_steps()``: the backbone's, fc6/fc7,
DeconvNet's decoder, the context module, the score layers) gets a ``PlannedConv``: on the first
call for an input shape and dtype it times its candidates (as cuDNN's benchmark mode does) and
keeps the fastest for that shape:

- ``onednn``: the weight reordered once into oneDNN's blocked layout
  (``mkldnn._reorder_convolution_weight``) and run by ``mkldnn._convolution_pointwise`` on
  channels_last activations with the ReLU as a post-op: the kernels inductor's freezing pass
  emits, without a compile step. At bf16 the same with a bf16 weight (native on CPUs with
  AVX512-BF16 or AMX, accumulating in fp32 inside oneDNN).
- ``nnpack``: NNPACK's Winograd F(6x6, 3x3) (bundled with PyTorch), fp32, 3x3 stride 1 only, one
  image at a time (its batched path measured 4.3x slower: 256->256 at 128x128, batch 2, 2 threads,
  0.74 s vs 2 x 0.086 s). Fewer multiplies than any direct conv, but NCHW in and out, so the
  candidate pays two layout changes, included in its time. Error per layer ~2e-5 of the output's
  magnitude (vs ~1e-7 direct).
- ``torch``: torch's own conv2d (+ ReLU) at the compute dtype.
- ``fft``: stride-1 layers with both kernel sides >= 5 (fc6) as products of Fourier spectra,
  dilation by space-to-batch (``FftConv``): 7x fewer multiplies for 7x7, at the price of keeping
  the weight's spectra (4.6x the fp32 weight; 1.9 GB for the dilated net's fc6), freed when it
  loses. The dilated net's fc6 (512 -> 4096, 7x7, dilation 4, on 56x56), 2 threads, AMD EPYC Zen
  4: 463 ms against oneDNN's 976 ms at fp32, 260 against 476 ms at bf16.
- at fp16, and at bf16 on CPUs without native bf16, also ``onednn-fp32-<dtype>`` and
  ``nnpack-<dtype>`` (``Fp32MathConv``): the fp32 kernels on weights rounded to the dtype, the
  result rounded back, for CPUs without that arithmetic.

Which one wins depends on the CPU, the thread count and the layer's shape: on this project's
2-core Zen 4, 1 thread, NNPACK beat oneDNN for 3x3 layers of >= 64 in / >= 128 out channels at
500x500 FCN-8s shapes (128->128 at 349x349 0.33 vs 0.58 s) and lost for 64->64 at 698x698 and
for fc6; the rule that encoded this is gone, the measurement decides.

Timing is cheap: each candidate runs twice (the first warms caches and lazily packs weights, the
second is timed; a candidate whose warm-up already takes CLEAR_LOSS times the best so far is not
run again); the winner's output is the call's result, so planning costs at most
(2 x candidates - 1) forwards, once per shape (FCN-AlexNet 500x500 fp32, 2 threads, shared
machine: first call 14.5 s, then 2.3 s; with the choices persisted, no re-planning). A candidate
that raises is dropped. Decisions persist per CPU model, torch version and thread count in
``$FASTFCN_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fastfcn``, i.e. ``~/.cache/fastfcn``);
``FASTFCN_PLAN_CACHE=off`` turns that off.
``ConvPlanner.plan()`` describes the choices: per layer and input shape, implementation and times.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import cpu
from ..models import SegmentationModel
from ..models.backbone import Conv, conv_weight
from ..paths import atomic_path

# timer(candidate name, fn, best) -> (seconds, fn's result); best: the fastest time so far for this
# layer and shape (None for the first candidate), which lets a timer cut a clear loser short.
Timer = Callable[[str, Callable[[], torch.Tensor], "float | None"], tuple[float, torch.Tensor]]
CL = torch.channels_last
# A candidate whose warm-up run already takes this many times the best time so far is not timed
# again: it loses even if its warm-up paid a one-off cost (candidates run oneDNN first, whose
# warm-up includes packing the weight, so the others' warm-ups carry no packing).
CLEAR_LOSS = 3.0


def wall_timer(name: str, fn: Callable[[], torch.Tensor], best: float | None = None):
    t0 = time.perf_counter()
    y = fn()  # warm: lazy weight packing, first-touch allocations, oneDNN primitive creation
    warm = time.perf_counter() - t0
    if best is not None and warm > CLEAR_LOSS * best:
        return warm, y
    del y
    t0 = time.perf_counter()
    y = fn()
    return time.perf_counter() - t0, y


def mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def nnpack_available() -> bool:
    """Whether this torch build has NNPACK; the call also initialises it (required before use)."""
    return hasattr(torch, "_nnpack_available") and torch._nnpack_available()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). Called when a backend is
    built, never at import; reads /proc/cpuinfo (Linux), else asks torch's CPU capability."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
    except OSError:
        return "AMX" in torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown-cpu"


# ------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class _Geom:
    weight: torch.Tensor  # (C_out, C_in / groups, kh, kw) fp32, the convolution the step computes
    bias: torch.Tensor  # (C_out,) fp32
    stride: list
    dilation: list
    groups: int
    relu: bool


def _geometry(model: SegmentationModel, step: Conv) -> _Geom:
    conv = getattr(model, step.name)
    if step.bn is not None and type(getattr(model, step.bn)).__name__ != "Identity":
        raise ValueError(f"conv step {step.name!r} has an unfolded BatchNorm {step.bn!r}; fold it first")
    w = conv_weight(conv).detach().float().contiguous()
    b = conv.bias.detach().float() if conv.bias is not None else torch.zeros(w.shape[0])
    return _Geom(w, b.clone(), list(conv.stride), list(conv.dilation), conv.groups, step.relu)


class OneDnnConv:
    """Prepacked oneDNN conv (+ fused ReLU) at ``dtype``: (x, padding) -> channels_last output.
    The weight is packed once per padding (the pack depends on the geometry)."""

    def __init__(self, g: _Geom, dtype: torch.dtype, weight: torch.Tensor | None = None):
        self.g, self.dtype = g, dtype
        self.weight = g.weight.to(dtype) if weight is None else weight
        self.bias = g.bias if dtype == torch.bfloat16 else g.bias.to(dtype)  # oneDNN takes fp32 bias at bf16
        self.packed: dict = {}

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        pad = [int(p) for p in padding]
        key = tuple(pad)
        w = self.packed.get(key)
        g = self.g
        if w is None:
            w = torch.ops.mkldnn._reorder_convolution_weight(self.weight, pad, g.stride, g.dilation, g.groups)
            self.packed[key] = w
        x = x.to(self.dtype).contiguous(memory_format=CL)
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, self.bias, pad, g.stride, g.dilation, g.groups, "relu" if g.relu else "none", [], ""
        )


class NNPackConv:
    """NNPACK Winograd, fp32, 3x3 stride 1: one image at a time, NCHW inside, channels_last out."""

    def __init__(self, g: _Geom):
        self.g = g

    @staticmethod
    def applies(g: _Geom) -> bool:
        square3 = tuple(g.weight.shape[2:]) == (3, 3)
        return square3 and g.stride == [1, 1] and g.dilation == [1, 1] and g.groups == 1

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        x = x.float().contiguous()
        pad = [int(p) for p in padding]
        ys = [torch._nnpack_spatial_convolution(x[i : i + 1], self.g.weight, self.g.bias, pad, [1, 1])
              for i in range(x.shape[0])]  # fmt: skip
        y = (ys[0] if len(ys) == 1 else torch.cat(ys)).contiguous(memory_format=CL)
        return y.relu_() if self.g.relu else y


class TorchConv:
    """torch's own conv2d (+ ReLU) at ``dtype`` on channels_last input."""

    def __init__(self, g: _Geom, dtype: torch.dtype, weight: torch.Tensor | None = None):
        self.g, self.dtype = g, dtype
        w = g.weight.to(dtype) if weight is None else weight  # fp32: the model's own tensor
        # At bf16 the weight is a copy anyway: keep it channels_last, else conv2d copies it into
        # that layout on every call (a 512x512x3x3 weight, 4.7 MB, per call).
        self.weight = w if dtype == torch.float32 else w.contiguous(memory_format=CL)
        self.bias = g.bias.to(dtype)

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        g = self.g
        x = x.to(self.dtype).contiguous(memory_format=CL)
        y = F.conv2d(x, self.weight, self.bias, g.stride, [int(p) for p in padding], g.dilation, g.groups)
        return y.relu_() if g.relu else y


class GemmConv:
    """A convolution whose kernel covers its whole unpadded input (one output position, as
    DeconvNet's fc6: 7x7 over pool5's 7x7) is one matrix product, y = x.flatten(1) @ W.T + b:
    reading fc6's 411 MB of weights once per batch. DeconvNet 224x224, batch 2, fp32, 2 threads
    (AMD EPYC Zen 4): oneDNN's direct conv 150 ms, torch's 239 ms for that layer. The planner
    offers it only the inputs it ``accepts``; called on any other, it raises."""

    def __init__(self, g: _Geom, dtype: torch.dtype, weight: torch.Tensor | None = None):
        self.g, self.dtype = g, dtype
        w = g.weight.to(dtype) if weight is None else weight
        self.w2 = w.reshape(w.shape[0], -1)  # (C_out, C_in * kh * kw): the NCHW flatten order
        self.bias = g.bias.to(dtype)

    @staticmethod
    def applies(g: _Geom) -> bool:
        return g.groups == 1 and g.dilation == [1, 1]

    def accepts(self, x: torch.Tensor, padding) -> bool:
        """Whether this input is one the kernel covers whole (the planner skips it otherwise)."""
        return not any(int(p) for p in padding) and tuple(x.shape[-2:]) == tuple(self.g.weight.shape[2:])

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        kh, kw = self.g.weight.shape[2:]
        if not self.accepts(x, padding):
            raise ValueError(f"gemm needs the {kh}x{kw} kernel to cover the whole unpadded input; "
                             f"got input {tuple(x.shape[-2:])} with padding {tuple(padding)}")  # fmt: skip
        y = torch.addmm(self.bias, x.to(self.dtype).contiguous().flatten(1), self.w2.t())
        if self.g.relu:
            y.relu_()
        n, c = y.shape
        # (N, C, 1, 1) with channels_last strides: the same memory, but the next layers read the
        # layout from the strides (NCHW strides here made oneDNN hand NCHW maps to DeconvNet's
        # decoder, one reorder more per unpooling).
        return y.as_strided((n, c, 1, 1), (c, 1, c, c))


class Gemm1x1Conv:
    """A 1x1 stride-1 convolution on a channels_last map is a matrix product over the pixels:
    (N*H*W, C_in) @ (C_in, C_out) + b, read and written in place with no layout change. The
    dilated net's fc7 (4096 -> 4096 at 32x32, bf16, 2 threads, AMD EPYC Zen 4): 84 ms as addmm,
    101 ms as oneDNN's conv. Offered only the inputs it ``accepts`` (no padding, channels_last)."""

    def __init__(self, g: _Geom, dtype: torch.dtype, weight: torch.Tensor | None = None):
        self.g, self.dtype = g, dtype
        w = g.weight.to(dtype) if weight is None else weight
        self.wt = w.reshape(w.shape[0], w.shape[1]).t()  # (C_in, C_out)
        self.bias = g.bias.to(dtype)

    @staticmethod
    def applies(g: _Geom) -> bool:
        return tuple(g.weight.shape[2:]) == (1, 1) and g.stride == [1, 1] and g.groups == 1

    def accepts(self, x: torch.Tensor, padding) -> bool:
        return not any(int(p) for p in padding) and x.is_contiguous(memory_format=CL)

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        if not self.accepts(x, padding):
            raise ValueError(f"gemm1x1 needs an unpadded channels_last input; got padding {tuple(padding)}")
        n, c, h, w = x.shape
        rows = x.to(self.dtype).permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels_last
        y = torch.addmm(self.bias, rows, self.wt)
        if self.g.relu:
            y.relu_()
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, C, H, W) with channels_last strides


# FftConv's bound on the frequency-domain products held at once (see FftConv.__call__)
FFT_CHUNK_BYTES = 512 << 20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _taps_inside(size: int, pad: int, k: int, dilation: int, out: int) -> int:
    """(output, tap) pairs along one axis whose input position lies inside the unpadded input."""
    return sum(max(0, min(k, (size - 1 + pad - i) // dilation + 1) - max(0, _ceil_div(pad - i, dilation)))
               for i in range(out))  # fmt: skip


def _mem_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class FftConv:
    """A large-kernel stride-1 convolution (both kernel sides >= 5) as products of Fourier
    spectra: the dilated net's fc6 (7x7, dilation 4, 512 -> 4096) and FCN's and FCN-AlexNet's
    fc6 (7x7, 6x6).

    A dilation d splits the padded input into d x d phases (rows i = a mod d, columns j = b mod
    d), each an undilated convolution with the same kernel (space-to-batch). Each phase is cut
    into overlapping tiles of 2k x 2k (k the kernel side) whose valid (k + 1) x (k + 1) outputs
    cover it; a tile's cross-correlation with the kernel is irfft2(rfft2(tile) x conj(rfft2(w))),
    so per frequency of the 2k x (k + 1) half-spectrum one matrix product (tiles x C_in) @
    (C_in x C_out) does the work of (k + 1)^2 output positions: for 7x7, 112 complex (448 real)
    multiplies per input/output channel pair against 64 x 49 = 3136 direct, 7x fewer.

    The price is memory: the weight's spectra, made on the first call and kept, take C_out x
    C_in x 2k x (k + 1) complex numbers, 4.6x the fp32 weight for 7x7 (fc6: 1.9 GB against
    411 MB; at bf16 the real and imaginary parts in bf16, 0.94 GB). Offered only where they take
    at most a quarter of the memory available when first asked (``accepts``), and freed again when
    the planner picks another candidate for every shape it has seen (``release``).

    Arithmetic: fp32 computes in complex64 (error ~5e-7 of the output's magnitude on fc6, like a
    direct fp32 conv's order of sums). At bf16 on a CPU with native bf16 the products run in bf16
    on the stacked real and imaginary parts, ([X_re; X_im] @ [W_re | W_im], accumulating in fp32,
    rounded to bf16, then combined): the transforms are unitary up to scale, so rounding the
    spectra costs what rounding the image and weight costs a direct bf16 conv (see
    tests/test_fft_conv.py for the bound it is held to). At fp16, and at bf16 without native
    bf16, the weight is rounded to the dtype and the spectra products run in complex64.
    """

    def __init__(self, g: _Geom, dtype: torch.dtype, weight: torch.Tensor | None = None):
        self.g, self.dtype = g, dtype
        w = g.weight if weight is None else weight
        self.weight = w.to(dtype).float() if dtype != torch.float32 else g.weight  # dtype-rounded values
        kh, kw = g.weight.shape[2:]
        self.tile = (2 * kh, 2 * kw)
        self.bf16_products = dtype == torch.bfloat16 and native_bf16()
        self.spectra: torch.Tensor | None = None
        self.prepare_seconds: float | None = None  # the last build of the spectra
        self._worth: dict = {}  # (input shape, padding) -> fewer multiplies than direct
        self._lock = threading.Lock()

    @staticmethod
    def applies(g: _Geom) -> bool:
        kh, kw = g.weight.shape[2:]
        return g.groups == 1 and g.stride == [1, 1] and kh >= 5 and kw >= 5

    def spectra_bytes(self) -> int:
        o, i = self.g.weight.shape[:2]
        th, tw = self.tile
        return o * i * th * (tw // 2 + 1) * (4 if self.bf16_products else 8)

    def _out_size(self, h: int, w: int, ph: int, pw: int) -> tuple[int, int]:
        kh, kw = self.g.weight.shape[2:]
        dh, dw = self.g.dilation
        return h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)

    def runnable(self, x: torch.Tensor, padding) -> bool:
        """A 4-D input whose output is not empty, and spectra already made or fitting in a quarter
        of the available memory."""
        if x.dim() != 4 or len(padding) != 2:
            return False
        ho, wo = self._out_size(x.shape[2], x.shape[3], int(padding[0]), int(padding[1]))
        if ho <= 0 or wo <= 0:
            return False
        return self.spectra is not None or self.spectra_bytes() <= _mem_available() // 4

    def accepts(self, x: torch.Tensor, padding) -> bool:
        """What the planner offers it: ``runnable`` inputs on which it does fewer multiplies than
        a direct convolution does, counting only the taps that fall on the input (oneDNN skips
        the padding). DeconvNet's fc6 (one output of 7x7) and its 7x7 deconvolution of a 1x1 map
        do 9-19x more here; measuring them anyway cost ~1.5 s and 1.9 GB each at planning."""
        if not self.runnable(x, padding):
            return False
        key = (tuple(x.shape), tuple(int(p) for p in padding))
        ok = self._worth.get(key)
        if ok is None:
            h, w = x.shape[2:]
            kh, kw = self.g.weight.shape[2:]
            dh, dw = self.g.dilation
            th, tw = self.tile
            ph, pw = key[1]
            ho, wo = self._out_size(h, w, ph, pw)
            direct = _taps_inside(h, ph, kh, dh, ho) * _taps_inside(w, pw, kw, dw, wo)
            rows = dh * _ceil_div(_ceil_div(ho, dh), th - kh + 1)
            tiles = rows * dw * _ceil_div(_ceil_div(wo, dw), tw - kw + 1)
            # per image and channel pair: 4 real multiplies per frequency of each tile
            ok = self._worth[key] = tiles * th * (tw // 2 + 1) * 4 < direct
        return ok

    def prepare(self) -> torch.Tensor:
        """Make the weight's spectra if they are not made (the planner calls this before timing:
        a one-off 1.3-1.6 s for fc6 that is not the layer's speed)."""
        with self._lock:
            if self.spectra is None:
                t0 = time.perf_counter()
                self.spectra = self._make_spectra()
                self.prepare_seconds = time.perf_counter() - t0
            return self.spectra

    @property
    def prepared(self) -> bool:
        return self.spectra is not None

    def release(self) -> None:
        """Free the spectra (made again if called later)."""
        with self._lock:
            self.spectra = None

    def _make_spectra(self) -> torch.Tensor:
        """conj(rfft2(w zero-padded to the tile)) per frequency f = (u, v) of the 2k_h x (k_w + 1)
        half-spectrum: (F, C_in, C_out) complex64, or at bf16 products (F, 2 C_out, C_in) bf16
        ([W_re; W_im], read transposed). Made as real matrix products of the weight with the
        (2F, k_h k_w) table of cos/sin, in chunks of ~16 M weights so the scratch stays bounded;
        fc6 of the dilated net, 2 threads, AMD EPYC Zen 4 (torch.fft.rfft2 on the padded
        weight and a permute to this layout: 10.7 s; this, 1.3-1.6 s)."""
        w = self.weight
        o, i, kh, kw = w.shape
        th, tw = self.tile
        nv = tw // 2 + 1
        f = th * nv
        u = torch.arange(th, dtype=torch.float64).view(th, 1, 1, 1)
        v = torch.arange(nv, dtype=torch.float64).view(1, nv, 1, 1)
        p = torch.arange(kh, dtype=torch.float64).view(1, 1, kh, 1)
        q = torch.arange(kw, dtype=torch.float64).view(1, 1, 1, kw)
        ang = 2 * math.pi * (u * p / th + v * q / tw)  # conj: e^{+i ang}
        table = torch.stack([ang.cos(), ang.sin()], 2).reshape(2 * f, kh * kw).float()  # rows (f, re|im)
        chunk = max(1, (1 << 24) // (kh * kw))
        if self.bf16_products:
            out = torch.empty(2 * f, o * i, dtype=torch.bfloat16)  # rows (f, re|im), columns (o, i)
            flat = w.reshape(o * i, kh * kw)
            for c0 in range(0, o * i, chunk):
                out[:, c0 : c0 + chunk] = table @ flat[c0 : c0 + chunk].t()
            return out.view(f, 2 * o, i)
        # fp32: blocks of 64 x 64 channel pairs, written straight into the complex layout (one
        # product and a transposing copy per block, 1.5 s for fc6; whole-row chunks 4-6 s)
        out = torch.empty(f, i, o, dtype=torch.complex64)
        parts = torch.view_as_real(out)  # (f, i, o, 2)
        for o0 in range(0, o, 64):
            for i0 in range(0, i, 64):
                blk = w[o0 : o0 + 64, i0 : i0 + 64]
                res = (table @ blk.reshape(-1, kh * kw).t()).view(f, 2, blk.shape[0], blk.shape[1])
                parts[:, i0 : i0 + 64, o0 : o0 + 64] = res.permute(0, 3, 2, 1)
        return out

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        if not self.runnable(x, padding):
            raise ValueError(f"fft: input {tuple(x.shape)} with padding {tuple(padding)} gives no output, "
                             f"or the weight's spectra ({self.spectra_bytes() / 2**30:.2f} GiB) do not fit "
                             "in a quarter of the available memory")  # fmt: skip
        spectra = self.spectra
        if spectra is None:
            spectra = self.prepare()
        g = self.g
        n, c, h, w = x.shape
        o, _, kh, kw = g.weight.shape
        dh, dw = g.dilation
        ph, pw = (int(p) for p in padding)
        th, tw = self.tile
        oh, ow = th - kh + 1, tw - kw + 1  # valid outputs per tile
        ho, wo = self._out_size(h, w, ph, pw)
        nth, ntw = _ceil_div(_ceil_div(ho, dh), oh), _ceil_div(_ceil_div(wo, dw), ow)  # tiles per phase
        hs, ws = nth * oh + kh - 1, ntw * ow + kw - 1  # phase input covering them
        xp = x.new_zeros((n, c, dh * hs, dw * ws), dtype=torch.float32)
        xp[:, :, ph : ph + h, pw : pw + w] = x
        xs = xp.view(n, c, hs, dh, ws, dw).permute(0, 3, 5, 1, 2, 4)  # (n, dh, dw, c, hs, ws)
        tiles = xs.unfold(4, th, oh).unfold(5, tw, ow)  # (n, dh, dw, c, nth, ntw, th, tw)
        b = n * dh * dw * nth * ntw
        tiles = tiles.permute(0, 1, 2, 4, 5, 3, 6, 7).reshape(b, c, th, tw)
        spec = torch.fft.rfft2(tiles)  # (b, c, th, nv)
        nv = tw // 2 + 1
        xf = spec.permute(2, 3, 0, 1).reshape(th * nv, b, c)
        del spec
        # The products' spectra take F x tiles x C_out complex numbers, 7.4x the direct output
        # (fc6 of the dilated net at 500x500: 528 MB an image): tiles go in chunks of at most
        # FFT_CHUNK_BYTES of them, each chunk reading the weight's spectra again (fc6's 1.9 GB:
        # ~0.27 s at the ~7 GB/s this 2-core Zen 4 copies; a chunk holds 139 of its tiles).
        step = max(1, FFT_CHUNK_BYTES // (th * nv * o * 8))
        y = torch.empty(b, o, oh, ow)
        for b0 in range(0, b, step):
            part = xf[:, b0 : b0 + step]
            k = part.shape[1]
            if self.bf16_products:
                a = torch.cat([part.real, part.imag], 1).to(torch.bfloat16)  # (F, 2k, c)
                pr = torch.bmm(a, spectra.transpose(1, 2)).float()  # (F, 2k, 2o): [re; im] x [W_re | W_im]
                yf = torch.complex(pr[:, :k, :o] - pr[:, k:, o:], pr[:, :k, o:] + pr[:, k:, :o])
                del a, pr
            else:
                yf = torch.bmm(part, spectra)  # (F, k, o)
            tiles_out = torch.fft.irfft2(yf.view(th, nv, k, o).permute(2, 3, 0, 1), s=(th, tw))
            y[b0 : b0 + k] = tiles_out[..., :oh, :ow]
            del yf, tiles_out
        # tile (phase a, b; tile ti, tj) output (r, s) lands at row (ti * oh + r) * dh + a
        y = y.reshape(n, dh, dw, nth, ntw, o, oh, ow).permute(0, 3, 6, 1, 4, 7, 2, 5)
        y = y.reshape(n, nth * oh * dh, ntw * ow * dw, o)[:, :ho, :wo]
        y = torch.add(y, g.bias)  # (n, ho, wo, o) contiguous: channels_last once permuted
        if g.relu:
            y.relu_()
        return y.to(self.dtype).permute(0, 3, 1, 2)


class Fp32MathConv:
    """An fp16 (or bf16) layer computed by an fp32 kernel: the weight and bias rounded to the
    layer's dtype (the values its kernel reads), the input widened, the fp32 result rounded back.
    That is what an fp16 / bf16 kernel accumulating in fp32 computes, to the order of its sums.
    oneDNN's own fp16 path needs AVX512-FP16 or AVX-NE-CONVERT, and torch's fp16 fallback is its
    slow direct conv: FCN-32s width 0.25 at 250x250, 2 threads, AMD EPYC Zen 4, fused fp16 took
    200 ms with torch's fp16 conv against 33 ms at fp32. See ``fp32_math_offered`` for when."""

    def __init__(self, g: _Geom, dtype: torch.dtype, kind: str):
        rounded = _Geom(g.weight.to(dtype).float(), g.bias.to(dtype).float(), g.stride, g.dilation, g.groups,
                        g.relu)  # fmt: skip
        self.dtype = dtype
        self.inner = OneDnnConv(rounded, torch.float32) if kind == "onednn" else NNPackConv(rounded)

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        return self.inner(x, padding).to(self.dtype)  # keeps the channels_last strides


def fp32_math_offered(dtype: torch.dtype) -> bool:
    """Whether layers at ``dtype`` also get the ``Fp32MathConv`` candidates: at fp16 always (on a
    CPU with native fp16 the planner times it against oneDNN's fp16 path); at bf16 where the CPU
    has no native bf16 arithmetic. With it, a bf16 dot product does twice the multiplies of an
    fp32 FMA per instruction, and fp32 math cannot win: FCN-32s width 0.5 at 250x250, 2 threads,
    AMD EPYC Zen 4, fused bf16 217 ms against 836-940 ms at fp32. Without it (oneDNN held to
    AVX512_CORE by ONEDNN_MAX_CPU_ISA) the same bf16 took 1451 ms, fp32 836 ms."""
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not native_bf16())


def candidates(g: _Geom, dtype: torch.dtype, fp32_math: bool | None = None) -> dict:
    """name -> ConvImpl for one layer at compute dtype ``dtype``. ``fp32_math``: offer the
    ``Fp32MathConv`` candidates (None: ``fp32_math_offered(dtype)``)."""
    out = {}
    suffix = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    w = g.weight.to(dtype)  # one copy shared by the candidates (none at fp32)
    if mkldnn_available():
        out["onednn" + suffix] = OneDnnConv(g, dtype, w)
    # At bf16 only as an Fp32MathConv, where the CPU lacks native bf16: on one with it, fp32
    # Winograd lost to oneDNN's bf16 direct conv on every 3x3 shape of the dilated net
    # (benchmarks/bf16_alternatives.py, 2 threads, AMD EPYC Zen 4: 416 vs 81 ms for 64->64 at
    # 620x620, 70 vs 53 ms for 512->512 at 71x71).
    if dtype == torch.float32 and NNPackConv.applies(g) and nnpack_available():
        out["nnpack"] = NNPackConv(g)
    out["torch" + suffix] = TorchConv(g, dtype, w)
    if fp32_math is None:
        fp32_math = fp32_math_offered(dtype)
    if fp32_math:
        if mkldnn_available():
            out["onednn-fp32" + suffix] = Fp32MathConv(g, dtype, "onednn")
        if NNPackConv.applies(g) and nnpack_available():
            out["nnpack" + suffix] = Fp32MathConv(g, dtype, "nnpack")
    if GemmConv.applies(g) and g.weight.shape[2] * g.weight.shape[3] > 1:  # a 1x1 conv: gemm1x1
        out["gemm" + suffix] = GemmConv(g, dtype, w)
    if Gemm1x1Conv.applies(g):
        out["gemm1x1" + suffix] = Gemm1x1Conv(g, dtype, w)
    if FftConv.applies(g):
        out["fft" + suffix] = FftConv(g, dtype, w)
    return out


class TorchPool:
    """torch's max_pool2d, Caffe's ceil rounding: (x, (kernel, stride)) -> pooled map. torch's CPU
    kernel also computes int64 indices it then drops."""

    def __call__(self, x: torch.Tensor, window) -> torch.Tensor:
        return F.max_pool2d(x, window[0], window[1], ceil_mode=True)


class CppPool:
    """The C++ channels_last max pool without indices (fastfcn.kernels.cpu.max_pool2d_nhwc), fp32
    or bf16. 64 x 624 x 624 bf16 (the dilated net's pool1), 2 threads, AMD EPYC Zen 4 under load
    from other processes: 57-68 ms vs torch's 124-200 ms."""

    def accepts(self, x: torch.Tensor, window) -> bool:
        return (cpu.available() and x.dtype in (torch.float32, torch.bfloat16)
                and x.is_contiguous(memory_format=CL))  # fmt: skip

    def __call__(self, x: torch.Tensor, window) -> torch.Tensor:
        return cpu.max_pool2d_nhwc(x, window[0], window[1], ceil_mode=True)


# ------------------------------------------------------------------ persistence


def _cache_file() -> Path | None:
    if os.environ.get("FASTFCN_PLAN_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get("FASTFCN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastfcn"
    )
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-")[:80]
    torch_v = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    return Path(root) / f"conv-plan-{cpu}-torch{torch_v}-{torch.get_num_threads()}t.json"


class _Store:
    """Winners by layer signature, in a JSON file shared by every planner of this process."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}  # a damaged cache is re-measured, not an error
            self.data = data if isinstance(data, dict) else {}

    def get(self, key: str):
        """The stored value (a winner's name, or a deferral record), None if absent."""
        return self.data.get(key)

    def put(self, key: str, winner) -> None:
        self.data[key] = winner
        if self.path is None:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
        except OSError:
            pass  # a read-only cache directory only costs re-measuring next time


# ------------------------------------------------------------------ planner


DEFERRAL = " deferral"  # cache key suffix: how a winner with a one-off set-up is deferred


class Deferred:
    """A winner with a one-off set-up (FftConv's spectra: 1.3-1.6 s for fc6 alone, 1-5 s recorded
    inside the benchmark suite's process, which holds every backend's model) taken from the plan
    cache, in a process that has not paid that set-up: the runner-up runs until it has lost as
    much time as the set-up costs (``calls`` = set-up / saving per call, both measured when the
    choice was made), then the winner. That is the ski-rental rule: whatever the number of calls,
    at most twice the time of the better choice in hindsight. FCN-8s 500x500 bf16, 2 threads, AMD
    EPYC Zen 4, plan cached: a one-image process took 3.9 s with fc6's spectra built at once
    against 1.5 s without them; the cache's record (set-up 2.05 s, 54 ms saved a call) defers
    them by 39 calls."""

    def __init__(self, winner, runner, calls: int):
        self.winner, self.runner, self.left = winner, runner, calls
        self.uses = (winner, runner)

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        if self.left > 0:
            self.left -= 1  # unlocked: a race only moves the switch by a call
            return self.runner(x, padding)
        return self.winner(x, padding)


class PlannedConv:
    """A ConvImpl that picks one of its candidates per (input shape, input dtype, padding)."""

    def __init__(self, planner: ConvPlanner, name: str, g: _Geom, dtype: torch.dtype, cands: dict):
        self.planner, self.name, self.dtype, self.cands = planner, name, dtype, cands
        w = g.weight.shape
        self.signature = (
            f"{w[0]}x{w[1]}x{w[2]}x{w[3]} s{g.stride} d{g.dilation} g{g.groups} relu{int(g.relu)} "
            f"{str(dtype).removeprefix('torch.')}"
        )  # fmt: skip
        self.chosen: dict = {}

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, tuple(int(p) for p in padding))
        impl = self.chosen.get(key)
        if impl is not None:
            return impl(x, padding)
        return self.planner._decide(self, key, x, padding)


class PlannedPool:
    """The backbone's max pooling without switches (``SegmentationModel.pool_impl``): picks torch's
    or the C++ kernel per (input shape, dtype, kernel, stride), timed like the convolutions."""

    def __init__(self, planner: ConvPlanner, dtype: torch.dtype):
        self.planner, self.name, self.dtype = planner, "maxpool", dtype
        self.cands = {"cpp": CppPool(), "torch": TorchPool()}
        self.signature = "maxpool ceil"
        self.chosen: dict = {}

    def __call__(self, x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        window = (int(kernel), int(stride))
        key = (tuple(x.shape), x.dtype, window)
        impl = self.chosen.get(key)
        if impl is not None:
            return impl(x, window)
        return self.planner._decide(self, key, x, window)


class ConvPlanner:
    """Installs a PlannedConv on every conv step of ``model`` (BatchNorm folded, fp32 weights).

    dtype: the compute dtype of the steps (bf16: bf16 channels_last activations); the head's score
    layers (``model.head_convs``) always run in fp32, so the head accumulates in fp32.
    timer: see ``Timer`` (tests pass a fake one to make the choice deterministic).
    persist: keep decisions in the user cache file (also off with FASTFCN_PLAN_CACHE=off).
    only: restrict every layer to these candidate names (those that apply), e.g. ("nnpack",).
    """

    def __init__(self, model: SegmentationModel, dtype: torch.dtype = torch.float32,
                 timer: Timer | None = None, persist: bool = True, only: tuple | None = None):  # fmt: skip
        if not isinstance(model, SegmentationModel):
            raise TypeError(f"expected a model from fastfcn.models; got {type(model).__name__}")
        self.timer = timer or wall_timer
        self.store = _Store(_cache_file() if persist else None)
        self._lock = threading.Lock()
        self._entries: list[dict] = []
        self.convs: dict[str, PlannedConv] = {}
        widen = {torch.float32: False, dtype: fp32_math_offered(dtype)}  # reads the CPU flags once
        for step in model.conv_steps():
            g = _geometry(model, step)
            d = torch.float32 if step.name in model.head_convs else dtype
            cands = candidates(g, d, widen[d])
            if only is not None:
                cands = {k: v for k, v in cands.items() if k in only} or cands
            pc = PlannedConv(self, step.name, g, d, cands)
            self.convs[step.name] = pc
            model.set_conv_impl(step.name, pc)
        self.pool = PlannedPool(self, dtype)
        model.pool_impl = self.pool

    def _decide(self, pc: PlannedConv, key, x: torch.Tensor, padding) -> torch.Tensor:
        with self._lock:
            if key in pc.chosen:
                return pc.chosen[key](x, padding)
            # The candidates are part of the key: a choice made before a candidate existed (fft is
            # newer than the cache files of earlier versions) is measured again, not kept for good.
            skey = (f"{pc.signature} in{list(key[0])} {str(key[1]).removeprefix('torch.')} pad{list(key[2])} "
                    f"of[{' '.join(sorted(pc.cands))}]")  # fmt: skip
            cached = self.store.get(skey)
            cached = cached if isinstance(cached, str) else None  # a damaged entry is measured again
            # The file is shared by every install with this CPU, torch version and thread count:
            # one without the C++ kernels (cpp) reads the choices of one with them, and the key
            # has no memory format (gemm1x1 and cpp take channels_last only). A cached choice
            # that refuses this input is measured again like an uncached one.
            accepts = getattr(pc.cands.get(cached), "accepts", None)
            if cached in pc.cands and (accepts is None or accepts(x, padding)):
                impl = self._deferred(pc, skey, pc.cands[cached], x, padding) or pc.cands[cached]
                pc.chosen[key] = impl
                entry = self._entry(pc, key, cached, {}, {}, "cache")
                if isinstance(impl, Deferred):
                    entry["deferred_calls"] = impl.left
                self._entries.append(entry)
                return impl(x, padding)
            times, errors, best, best_y = {}, {}, None, None
            for name, impl in pc.cands.items():
                accepts = getattr(impl, "accepts", None)
                if accepts is not None and not accepts(x, padding):
                    continue  # a candidate for other shapes (not an error worth listing)
                try:
                    if hasattr(impl, "prepare"):  # one-off set-up (FftConv's spectra) is not speed
                        impl.prepare()
                    secs, y = self.timer(name, lambda impl=impl: impl(x, padding), times.get(best))
                except Exception as e:  # an implementation that cannot run this shape is dropped
                    errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                    continue
                times[name] = secs
                if best is None or secs < times[best]:
                    best, best_y = name, y
                del y
            if best is None:
                raise RuntimeError(
                    f"no implementation could run layer {pc.name} on input {list(key[0])} "
                    f"({key[1]}): {errors}"
                )
            pc.chosen[key] = pc.cands[best]
            self._release_losers(pc)
            self.store.put(skey, best)
            setup = getattr(pc.cands[best], "prepare_seconds", None)
            plain = [n for n in times if not hasattr(pc.cands[n], "prepare")]
            if setup is not None and plain:
                runner = min(plain, key=times.get)
                saving = round(times[runner] - times[best], 6)
                record = {"runner": runner, "setup_s": round(setup, 4), "saving_s": saving}
                self.store.put(skey + DEFERRAL, record)
            self._entries.append(self._entry(pc, key, best, times, errors, "measured"))
            return best_y

    def _deferred(self, pc: PlannedConv, skey: str, impl, x: torch.Tensor, padding) -> Deferred | None:
        """A Deferred for a cached winner whose set-up this process has not paid, from the cache's
        record of its runner-up, set-up time and saving; None where there is nothing to defer or
        the record is not usable (damaged, or a runner-up that is gone or refuses the input)."""
        if getattr(impl, "prepared", True):
            return None
        rec = self.store.get(skey + DEFERRAL)
        if not isinstance(rec, dict):
            return None
        runner = pc.cands.get(rec.get("runner")) if isinstance(rec.get("runner"), str) else None
        setup, saving = rec.get("setup_s"), rec.get("saving_s")
        if runner is None or runner is impl or hasattr(runner, "prepare"):
            return None
        numbers = (setup, saving)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6 for v in numbers):
            return None
        accepts = getattr(runner, "accepts", None)
        if accepts is not None and not accepts(x, padding):
            return None
        return Deferred(impl, runner, min(10**6, math.ceil(setup / saving)))

    @staticmethod
    def _release_losers(pc: PlannedConv) -> None:
        """Free what a candidate chosen for none of the layer's shapes holds (FftConv's spectra:
        1.9 GB for the dilated net's fc6)."""
        chosen = {id(u) for impl in pc.chosen.values() for u in getattr(impl, "uses", (impl,))}
        for impl in pc.cands.values():
            if id(impl) not in chosen and hasattr(impl, "release"):
                impl.release()

    @staticmethod
    def _entry(pc, key, chosen, times, errors, source) -> dict:
        e = {
            "layer": pc.name, "input": list(key[0]), "input_dtype": str(key[1]).removeprefix("torch."),
            "compute_dtype": str(pc.dtype).removeprefix("torch."), "chosen": chosen, "source": source,
            "times_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
        }  # fmt: skip
        if errors:
            e["errors"] = errors
        return e

    def plan(self) -> list[dict]:
        """One dict per (layer, input shape) decided so far, in decision order: layer, input,
        input_dtype, compute_dtype, chosen, source ("measured" or "cache"), times_ms per candidate
        (empty when taken from the cache), errors of candidates that raised, deferred_calls (a
        ``Deferred`` cached winner: calls of the runner-up first)."""
        with self._lock:
            return [dict(e) for e in self._entries]


def format_plan(plan: list[dict]) -> str:
    """The plan as text, one line per layer and input shape."""
    if not plan:
        return "(no convolution planned yet: the plan is made at the first run of each input shape)"
    lines = []
    for e in plan:
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(e["times_ms"].items(), key=lambda kv: kv[1]))
        shape = "x".join(map(str, e["input"]))
        detail = times or e["source"]
        if e.get("deferred_calls"):
            detail += f", after {e['deferred_calls']} calls of the runner-up"
        lines.append(f"{e['layer']:<12} {shape:<18} {e['compute_dtype']:<8} -> {e['chosen']:<12} ({detail})")
    return "\n".join(lines)


def plan_model(model: SegmentationModel, dtype: torch.dtype = torch.float32, **kw) -> ConvPlanner:
    """Plan ``model``'s convolutions (in place: its conv steps get PlannedConvs). The model must be
    in eval mode with BatchNorm folded and fp32 weights; activations should be channels_last."""
    dtype_now = next(model.parameters()).dtype
    if dtype_now != torch.float32:
        raise ValueError(f"plan_model needs the model's fp32 weights (it casts per layer); got {dtype_now}")
    return ConvPlanner(model, dtype, **kw)


__all__ = [
    "ConvPlanner", "CppPool", "Deferred", "FftConv", "Fp32MathConv", "Gemm1x1Conv", "NNPackConv",
    "OneDnnConv", "PlannedConv", "PlannedPool", "TorchConv", "TorchPool", "candidates", "format_plan",
    "fp32_math_offered", "mkldnn_available", "native_bf16", "nnpack_available", "plan_model", "wall_timer",
]  # fmt: skip
