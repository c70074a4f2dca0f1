"""The fused backend's CUDA backbone: convolutions with their epilogue fused, fc6 as a GEMM
where that pays, each chosen by measurement on the GPU at hand (docs/design.md, idea 8).

Eager cuDNN runs a VGG conv step as three passes: the convolution, the bias add and the
ReLU. The static review of FCN-8s 500x500 bf16 batch 1 on an H200 put the two extra passes
at ~0.26 ms of a predicted ~1.2 ms per image, which is what torch.compile (inductor fuses
them) would win by. Two remedies, both per layer and both measured before use:

- ``cudnn_relu``: cuDNN's fused convolution-bias-activation (``torch.cudnn_convolution_relu``),
  one kernel for conv + bias + ReLU;
- ``triton``: fastfcn's implicit-GEMM convolution (kernels/conv_epilogue.py) with bias + ReLU in
  the epilogue, and for the last conv of a block (``conv_pool``) the 2x2 max pool too, so the
  block's full-size activation is never written (conv1_2 at 500x500: 698 x 698 x 64 bf16,
  62 MB written and read back per image by the separate pool). run_steps hands a conv the pool
  after it on whole maps, the dead-zone skip (runtime/deadzone.py, on by default for FCN-VGG,
  FCN-AlexNet and DeconvNet's encoder) on windows: its plan grows the block's last conv to
  exactly the pool's input window, aligned to the pool's stride (at most 2 more rows and
  columns of outputs). Only 2x2/2 pools without switches take part: FCN-AlexNet's 3x3/2 and
  DeconvNet's pools with switches run as separate steps under the skip;
- ``gemm`` (fc6 at small batch): fc6 is a 7x7 conv, 512 -> 4096, over 22x22 at 500x500, i.e.
  a GEMM of M = 256 N output positions, N = 4096, K = 25088. At batch 1 an implicit-GEMM
  convolution has few output tiles for 132 SMs; im2col + cuBLAS matmul lets cuBLAS split K
  across SMs where its heuristics do, and ``gemm_splitk4`` / ``gemm_splitk8`` split K
  explicitly (one batched GEMM over the K slices, partials summed in fp32).

``eager`` (torch's conv2d, then bias and ReLU as torch does them) is always a candidate and
the fallback: when cuDNN's fused op is missing from this torch build or refuses a call (a
dtype, a layout), the step runs eager. Which candidate wins is measured once per layer and
input shape, on the first call (the Segmenter's warm-up before a CUDA-graph capture), never
during a capture. On an H200 (FCN-8s 500x500 bf16, benchmarks/results/h200-2026-12-04-r2.json)
``cudnn_relu`` won every 3x3 conv (conv3_3 at batch 8: 0.37 ms against 1.49 ms for the Triton
conv), the Triton conv only conv1_1 (3 input channels), eager cuDNN fc6 (0.17 ms at batch 1,
the GEMM paths 0.17-0.21 ms), and ``triton_maxpool`` every pool (0.084 ms against torch's 0.359
for a 8 x 64 x 506^2 map).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import SegmentationModel
from ..models.backbone import step_convs
from ..ops import tensor_version
from .cuda_graphs import is_oom

# im2col for the GEMM path costs rows x K elements (fc6: K = 25088): at most 2048 rows
# (batch 8 at 500x500, 103 MB in bf16), beyond which the conv's own tiles fill the GPU anyway.
GEMM_MAX_ROWS = 2048

# explicit split-K factors tried for fc6 (K = 512 * 49 = 25088 divides by each)
SPLITS = (4, 8)

Timer = Callable[[Callable[[], object], bool], float]


# GPU cycles of the spin kernel queued before each timed call (~0.5 ms at an H200's 1.98 GHz,
# ~0.1 s per input shape over FCN-8s's candidates): while the GPU spins, the host enqueues the
# candidate's kernels, so the events time the GPU's work alone. Without it a candidate of
# several small kernels (im2col + GEMM + sum + bias for fc6, ~5 launches of ~10-20 us of Python
# each, against ~0.1 ms of GEMM at batch 1) is timed host-bound, while the CUDA graph it is
# chosen for replays it without any host cost.
SPIN_CYCLES = 1_000_000


# The spin before each timed whole backbone (the dead-zone skip against whole maps): the skip's
# host side (plans, cache lookups, ~110 launches) took longer than SPIN_CYCLES at batch 1 on the
# H200, so its eager timing (1.92 ms) was host-bound against 0.67 ms for the whole maps, while
# the CUDA graph replays both without host cost (0.960 against 0.932 ms per call in the
# headline; benchmarks/results/h200-2026-12-04-r3.json). ~10 ms at 1.98 GHz covers the host.
BACKBONE_SPIN_CYCLES = 20_000_000


def backbone_timer(fn: Callable[[], object], cuda: bool) -> float:
    """device_timer with BACKBONE_SPIN_CYCLES: device time of a whole backbone pass."""
    return device_timer(fn, cuda, spin=BACKBONE_SPIN_CYCLES)


def device_timer(fn: Callable[[], object], cuda: bool, reps: int = 3, spin: int | None = None) -> float:
    """Seconds per call of fn (median of reps after one warm-up); CUDA events when cuda, each
    timed call queued behind a spin kernel (``spin`` cycles, default SPIN_CYCLES) so that
    launches do not count."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(SPIN_CYCLES if spin is None else spin)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# How far a candidate's output may stray from the reference's (the last candidate: torch's own
# op) before the candidate is dropped for that input: max |out - ref| over max |ref|. A guard
# against a kernel that compiled wrong (indices, layout, a miscompiled tile: errors of the order
# of the values themselves), not a precision test: the fused candidates round once where eager
# rounds the conv output and again after its bias add (bf16: 2^-8 = 0.4% of the largest value
# per rounding), sum in another order, and at fp32 cuDNN may use TF32 (2^-11 per product) unless
# the Segmenter forbids it. Measured against eager on the CPU (2-core AMD EPYC Zen 4, kaiming
# weights, ReLU'd normal input): fc6 (512 -> 4096, 7x7, K = 25088) as GEMM and split-K 4 / 8,
# 3.4e-3 at bf16 and 5e-7 at fp32; a 3x3 64 -> 64 conv through the Triton kernel
# (interpreter), with and without its pool, 7.0e-3 at bf16 and 3e-7 at fp32. The bf16 bound is
# 4x the larger; a one-pixel shift of the output is ~1x the values
# (tests/test_gpu_readiness.py::test_chooser_admits_the_real_candidates_and_catches_a_shift).
AGREE_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def disagreement(out, ref) -> str | None:
    """Why ``out`` is not an acceptable stand-in for ``ref`` (None when it is): another shape, a
    non-finite value where the reference has a finite one (or the other way round), or an error
    above AGREE_TOL of the reference's largest magnitude."""
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return f"output {tuple(getattr(out, 'shape', ()))} where the reference gives {tuple(ref.shape)}"
    o, r = out.float(), ref.float()
    finite = torch.isfinite(r)
    if not torch.equal(torch.isfinite(o), finite):
        return "non-finite values where the reference has finite ones (or the other way round)"
    scale = float(torch.where(finite, r, 0).abs().max()) if r.numel() else 0.0
    err = float(torch.where(finite, o - r, 0).abs().max()) if r.numel() else 0.0
    tol = AGREE_TOL.get(ref.dtype, AGREE_TOL[torch.float32])
    if err > tol * max(scale, 1e-30):
        return f"disagrees with the reference: max |error| {err:.3g} > {tol:g} x max |reference| {scale:.3g}"
    return None


class Chooser:
    """Runs the fastest of several implementations per input key, measured on first use.

    candidates: name -> fn(*args) (insertion order = preference when nothing is measured, and
    on a tie). The last one is the reference and must always work: every other candidate's
    first output is compared with its output (``disagreement``) and a candidate that disagrees
    is dropped for that key, so a kernel that compiled wrong on a GPU never wins by being fast.
    A candidate that raises anything but an out-of-memory is dropped likewise (both recorded in
    ``failed``): Triton's CompilationError and OutOfResources are no RuntimeError, and a
    launcher's ValueError (a size it refuses) is a refusal too.
    """

    def __init__(self, candidates: dict[str, Callable], timer: Timer = device_timer):
        if not candidates:
            raise ValueError("a Chooser needs at least one candidate")
        self.candidates = dict(candidates)
        self.timer = timer
        self.choice: dict = {}
        self.failed: dict = {}

    def __call__(self, key, *args):
        name = self.choice.get(key)
        if name is None:
            if _capturing():
                # no timing (it would synchronise) inside a capture: the last, always-working one
                return list(self.candidates.values())[-1](*args)
            name = self._choose(key, args)
        return self.candidates[name](*args)

    def _choose(self, key, args) -> str:
        times = {}
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        names = list(self.candidates)
        ref = self.candidates[names[-1]](*args) if len(names) > 1 else None
        for name, fn in self.candidates.items():
            try:
                if ref is not None and name != names[-1]:
                    why = disagreement(fn(*args), ref)
                    if why is not None:
                        self.failed[(key, name)] = why
                        continue
                times[name] = self.timer(lambda fn=fn: fn(*args), cuda)
            except Exception as e:  # noqa: BLE001 - any refusal drops the candidate, see above
                if is_oom(e):
                    raise
                self.failed[(key, name)] = f"{type(e).__name__}: {str(e).strip()[:200]}"
        if not times:
            raise RuntimeError(f"no implementation ran for {key}: {self.failed}")
        name = min(times, key=times.get)
        self.choice[key] = name
        return name


def _key(x: torch.Tensor, padding) -> tuple:
    return (tuple(x.shape), x.dtype, tuple(padding), x.is_contiguous(memory_format=torch.channels_last))


def eager_conv(conv: nn.Conv2d, relu: bool):
    """torch's conv2d (bias inside), then a separate in-place ReLU: the reference order."""

    def run(x, padding):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation, conv.groups)
        return F.relu(y, inplace=True) if relu else y

    return run


def cudnn_relu_conv(conv: nn.Conv2d):
    """cuDNN's fused conv + bias + ReLU, or None where this torch has no such op."""
    op = getattr(torch, "cudnn_convolution_relu", None)
    if op is None:
        return None

    def run(x, padding):
        return op(x, conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation, conv.groups)

    return run


def splitk_matmul(a: torch.Tensor, b: torch.Tensor, split: int) -> torch.Tensor:
    """a (M, K) @ b (K, N) as ``split`` partial products over K slices, summed in fp32: (M, N)
    in fp32 (split 1: one GEMM with fp32 output).

    Each slice is one GEMM of a batched call, so a small M x N (fc6 at batch 1: 256 x 4096,
    64 tiles of 128 x 128 for 132 SMs) still fills the GPU. On CUDA the bf16 / fp16 partials
    come out in fp32 (``bmm(..., out_dtype)``); elsewhere the operands are upcast.
    """
    m, k = a.shape
    if split == 1:  # one GEMM; cuBLAS splits K itself where its heuristics say so
        if a.is_cuda and a.dtype != torch.float32:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())
    if k % split:
        raise NotImplementedError(f"K={k} is not a multiple of split={split}")
    a3 = a.view(m, split, k // split).transpose(0, 1)  # (S, M, K/S), a strided view
    b3 = b.reshape(split, k // split, b.shape[1])
    if a.is_cuda and a.dtype != torch.float32:
        parts = torch.bmm(a3, b3, out_dtype=torch.float32)
    else:
        parts = torch.bmm(a3.float(), b3.float())
    return parts.sum(0)


def gemm_conv(conv: nn.Conv2d, relu: bool, split: int = 1):
    """The conv as im2col + one matmul (split 1: cuBLAS decides on split-K itself) or an explicit
    split-K over ``split`` slices of K: output channels_last. The GEMM's output is fp32 and the
    bias is added before the one rounding to the input's dtype (a bf16 GEMM output plus a bf16
    bias rounded twice: 5.1e-3 of the largest value off at fc6, against 0 with fp32 output)."""

    def run(x, padding):
        n = x.shape[0]
        kh, kw = conv.kernel_size
        ho = (x.shape[2] + 2 * padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
        wo = (x.shape[3] + 2 * padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
        if n * ho * wo > GEMM_MAX_ROWS:
            raise NotImplementedError(f"{n * ho * wo} output rows exceed GEMM_MAX_ROWS={GEMM_MAX_ROWS}")
        cols = F.unfold(x, (kh, kw), dilation=conv.dilation, padding=tuple(padding), stride=conv.stride)
        w2 = conv.weight.reshape(conv.weight.shape[0], -1)
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * L, K)
        y = splitk_matmul(a, w2.t(), split).view(n, ho * wo, -1)  # fp32: the bias rounds once
        if conv.bias is not None:
            y = y.add_(conv.bias)
        if relu:
            y = y.relu_()
        return y.to(x.dtype).view(n, ho, wo, -1).permute(0, 3, 1, 2)

    return run


def _triton_here(x: torch.Tensor) -> None:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise NotImplementedError("the Triton convolution runs on CUDA tensors (or in Triton's interpreter)")


def triton_conv(conv: nn.Conv2d, pool: bool = False):
    """fastfcn's Triton conv + bias + ReLU (+ 2x2/2 ceil max pool), or None where it does not apply
    (grouped, unequal strides or dilations, no bias). The packed weight is made once per dtype."""
    if conv.groups != 1 or conv.bias is None or len(set(conv.stride)) != 1 or len(set(conv.dilation)) != 1:
        return None
    packed: dict = {}

    def run(x, padding):
        _triton_here(x)
        from ..kernels import conv_epilogue as ce

        key = (x.dtype, tensor_version(conv.weight), tensor_version(conv.bias))
        if packed.get("key") != key:
            w = ce.pack_weight(conv.weight.to(x.dtype))
            packed.update(key=key, w=w, b=conv.bias.float().contiguous())
        # fp32 means fp32 products unless the Segmenter asked for TF32 (it sets the flag per
        # call); bf16 / fp16 never read it (a process that mixed torch's two TF32 APIs makes
        # the read raise)
        ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        # fp32 products build like the rest since the taps are a loop (static sm_90a builds,
        # benchmarks/results/static/sm90a-triton-3.6.0.md: at most 0.64 s per specialisation
        # on the 2-core AMD EPYC Zen 4, against 10-45 s with the taps unrolled), so the FMA
        # kernel is measured against cuDNN's fp32 like every other candidate.
        geom = (conv.kernel_size, padding, conv.stride[0], conv.dilation[0])
        return ce.conv_bias_relu(x, packed["w"], packed["b"], *geom, pool, ieee)

    return run


def conv_candidates(conv: nn.Conv2d, relu: bool, gemm: bool = False) -> dict[str, Callable]:
    """The implementations worth measuring for one conv step, eager last (the fallback)."""
    cands: dict[str, Callable] = {}
    fused = cudnn_relu_conv(conv) if relu else None
    if fused is not None:
        cands["cudnn_relu"] = fused
    tri = triton_conv(conv) if relu else None
    if tri is not None:
        cands["triton"] = tri
    if gemm and conv.groups == 1:
        cands["gemm"] = gemm_conv(conv, relu)
    cands["eager"] = eager_conv(conv, relu)
    return cands


class EpilogueConv:
    """A ConvImpl (models/backbone.py) for one backbone Conv step: impl(x, padding), and
    conv_pool(x, padding, kernel, stride) for a step followed by max pooling (run_steps on whole
    maps, the dead-zone skip on the pool's window: both call it with one (x, padding) per shape,
    so each pooled shape is measured once)."""

    def __init__(self, conv: nn.Conv2d, relu: bool, gemm: bool = False, timer: Timer = device_timer):
        self.chooser = Chooser(conv_candidates(conv, relu, gemm), timer)
        fused = triton_conv(conv, pool=True) if relu else None
        self._pool_candidates = {"triton_pool": fused} if fused is not None else {}
        self._pool_choosers: dict = {}
        self.timer = timer

    def __call__(self, x: torch.Tensor, padding) -> torch.Tensor:
        return self.chooser(_key(x, padding), x, padding)

    def conv_pool(self, x: torch.Tensor, padding, kernel: int, stride: int) -> torch.Tensor:
        """max_pool2d(self(x, padding), kernel, stride, ceil_mode=True), the fastest of: the pool
        inside the conv's epilogue (2x2/2 only), the conv's best then fastfcn's Triton pool
        (kernels/pool.py; torch's NHWC pool ran at ~18% of the H200's memory bandwidth), and the
        conv's best then torch's pool (the reference)."""
        chooser = self._pool_choosers.get((kernel, stride))
        if chooser is None:
            cands = dict(self._pool_candidates) if (kernel, stride) == (2, 2) else {}

            def conv_then_triton_pool(x, padding):
                y = self(x, padding)
                _triton_here(y)
                from ..kernels import pool

                return pool.max_pool2d(y, kernel, stride)

            cands["triton_maxpool"] = conv_then_triton_pool

            def separate(x, padding):
                return F.max_pool2d(self(x, padding), kernel, stride, ceil_mode=True)

            cands["separate"] = separate
            chooser = self._pool_choosers[(kernel, stride)] = Chooser(cands, self.timer)
        return chooser(_key(x, padding), x, padding)


class ChosenConv2d(nn.Conv2d):
    """A Conv2d (same parameters, same state-dict keys) whose forward is measured per shape
    between torch's conv and the GEMM path: fc6, which the backbone runner does not own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chooser(_key(x, self.padding), x, self.padding)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, timer: Timer = device_timer) -> ChosenConv2d:
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same Parameters: keys and weights unchanged
        cands = {"gemm": gemm_conv(new, False)}
        for split in SPLITS:
            cands[f"gemm_splitk{split}"] = gemm_conv(new, False, split)
        cands["eager"] = eager_conv(new, False)
        new.chooser = Chooser(cands, timer)
        return new


def install(model: SegmentationModel, timer: Timer = device_timer) -> dict[str, object]:
    """Swap every backbone Conv step (BatchNorm already folded) for an EpilogueConv and fc6 for
    a ChosenConv2d (every stream's: late fusion's fc6color, fc6hha). Returns name -> the
    installed object (for inspection)."""
    done: dict[str, object] = {}
    streams = model.backbone_streams()
    # Every stream's convs (late fusion), an Inception block's branches included.
    for step in step_convs(tuple(s for steps in streams.values() for s in steps)):
        if step.bn is not None and not isinstance(getattr(model, step.bn), nn.Identity):
            continue  # an unfolded BatchNorm sits between conv and ReLU: keep torch's step
        impl = EpilogueConv(getattr(model, step.name), step.relu, timer=timer)
        model.set_conv_impl(step.name, impl)
        done[step.name] = impl
    for name in (f"fc6{suffix}" for suffix in streams):
        fc6 = getattr(model, name, None)
        if type(fc6) is nn.Conv2d and fc6.groups == 1:
            setattr(model, name, ChosenConv2d.wrap(fc6, timer))
            done[name] = getattr(model, name)
    return done
