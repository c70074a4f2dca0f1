"""Fused ops against the plain-PyTorch composition they replace.

impls: "torch" (kernels.reference in eager: conv_transpose2d + slice + add + argmax,
F.max_pool2d / F.max_unpool2d), "torch.compile" (the same, compiled; GPU only), "triton"
(GPU only: on the CPU it would run in the interpreter, whose timings mean nothing) and "cpu"
(the C++ twins). GB/s counts the bytes the op must move at minimum: its inputs read once and
its output written once (the switches as stored: 8 bytes per window for torch's int64, 1 for
ours). GPU sizes: the final FCN-8s stage at 1080p, C=21, batch 8, emitting labels; DeconvNet's
pool1/unpool1 at batch 8. CPU sizes are reduced so the file runs in well under a minute.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastfcn.ops as ops
from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as st

sys.path.insert(0, str(Path(__file__).parent))
from common import sync  # noqa: E402

CUDA = torch.cuda.is_available()
IMPLS = ["torch", "torch.compile", "triton", "cpu"]


def _cpu_available():
    try:
        from fastfcn.kernels import cpu

        return bool(cpu.available())
    except Exception:
        return False


def _skip_unrunnable(impl, device):
    if device.type == "cuda" and impl == "cpu":
        pytest.skip("the C++ twins run on CPU tensors; this run is on the GPU")
    if device.type != "cuda" and impl == "triton":
        pytest.skip("without a GPU Triton runs in its interpreter: timings would measure Python")
    if device.type != "cuda" and impl == "torch.compile":
        pytest.skip("torch.compile is timed on the GPU only: compiling on 2 CPU cores exceeds the budget")
    if impl == "cpu" and not _cpu_available():
        pytest.skip("fastfcn.kernels.cpu is not built here")


_compiled = {}


def _compile(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _run(benchmark, fn, device):
    def timed():
        out = fn()
        sync(device)
        return out

    rounds, warmup = (20, 3) if device.type == "cuda" else (5, 1)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)


def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def covering(size, k, s, offset):
    return math.ceil((offset + size - k) / s) + 1


# ------------------------------------------------------------------ skip path


def _final_stage_case(device):
    n, c, (H, W) = (8, 21, (1080, 1920)) if device.type == "cuda" else (1, 21, (240, 320))
    k, s, off = 16, 8, 31
    x = torch.randn(n, c, covering(H, k, s, off), covering(W, k, s, off), device=device)
    # the reference nets' weight: full C x C, bilinear on the diagonal (what torch must run densely)
    w = st.bilinear_weight(c, k).to(device)
    return x, w, s, off, (H, W)


@pytest.mark.parametrize("impl", IMPLS)
def test_final_stage_labels(benchmark, impl, bench_device, record_extra):
    """FCN-8s upscore8 (16/8) + crop 31 + argmax -> uint8 labels."""
    _skip_unrunnable(impl, bench_device)
    x, w, s, off, size = _final_stage_case(bench_device)
    if impl.startswith("torch"):
        f = _compile(ref.upsample_crop) if impl == "torch.compile" else ref.upsample_crop
        out = _run(benchmark, lambda: f(x, w, s, off, size, "labels"), bench_device)
    else:
        ops.weight_kind(w)  # detected once, at load time, in real use
        def fused():
            return ops.upsample_crop(x, w, s, off, size, "labels", impl=impl)

        out = _run(benchmark, fused, bench_device)
    record_extra(benchmark, nbytes=_nbytes(x, out), items=x.shape[0], op="upsample_crop/labels", impl=impl,
                 shape=f"N{x.shape[0]} C{x.shape[1]} {size[0]}x{size[1]}")


@pytest.mark.parametrize("impl", IMPLS)
def test_upsample_add(benchmark, impl, bench_device, record_extra):
    """FCN-8s fuse_pool3: upscore_pool4 (4/2) + crop(score_pool3, 9)."""
    _skip_unrunnable(impl, bench_device)
    n, c, (h, w_) = (8, 21, (68, 121)) if bench_device.type == "cuda" else (1, 21, (32, 42))
    x = torch.randn(n, c, h, w_, device=bench_device)
    w = st.bilinear_weight(c, 4).to(bench_device)
    skip = torch.randn(n, c, 2 * h + 2 + 12, 2 * w_ + 2 + 12, device=bench_device)
    if impl.startswith("torch"):
        f = _compile(ref.upsample_add) if impl == "torch.compile" else ref.upsample_add
        out = _run(benchmark, lambda: f(x, w, 2, skip, 9, 1.0), bench_device)
    else:
        ops.weight_kind(w)
        out = _run(benchmark, lambda: ops.upsample_add(x, w, 2, skip, 9, 1.0, impl=impl), bench_device)
    # the skip is read only where it is kept: as many elements as the output
    record_extra(benchmark, nbytes=_nbytes(x) + 2 * _nbytes(out), items=n, op="upsample_add", impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fcn8s_head_labels(benchmark, impl, bench_device, record_extra):
    """The whole FCN-8s head, score_fr to labels, with the reference geometry."""
    _skip_unrunnable(impl, bench_device)
    n, c, (H, W) = (8, 21, (1080, 1920)) if bench_device.type == "cuda" else (1, 21, (240, 320))
    # the smallest score map whose chain 4/2 -> 4/2 -> 16/8 covers the final crop at 31
    h5, w5 = 1, 1
    while ((h5 - 1) * 2 + 3) * 2 * 8 + 16 < 31 + H:
        h5 += 1
    while ((w5 - 1) * 2 + 3) * 2 * 8 + 16 < 31 + W:
        w5 += 1
    (h4, w4), (h3, w3) = ((h5 - 1) * 2 + 4, (w5 - 1) * 2 + 4), ((h5 - 1) * 4 + 10, (w5 - 1) * 4 + 10)
    g = dict(device=bench_device)
    score = torch.randn(n, c, h5, w5, **g)
    skips = [torch.randn(n, c, h4 + 10, w4 + 10, **g), torch.randn(n, c, h3 + 18, w3 + 18, **g)]
    w2 = st.bilinear_weight(c, 4).to(bench_device)
    w_final = st.bilinear_weight(c, 16).to(bench_device)
    args = (score, skips, [w2, w2, w_final], [2, 2, 8], [5, 9, 31], [1.0, 1.0], (H, W), "labels")
    if impl.startswith("torch"):
        f = _compile(ref.fcn_head) if impl == "torch.compile" else ref.fcn_head
        out = _run(benchmark, lambda: f(*args), bench_device)
    else:
        out = _run(benchmark, lambda: ops.fcn_head(*args, impl=impl), bench_device)
    kept = n * c * (h4 * w4 + h3 * w3)  # skip elements read (only where kept)
    record_extra(benchmark, nbytes=_nbytes(score, out) + 4 * kept, items=n, op="fcn_head/fcn8s/labels",
                 impl=impl)


# ------------------------------------------------------------------ unpooling


def _deconvnet_pool1(device):
    n, c, H = (8, 64, 224) if device.type == "cuda" else (1, 64, 112)
    return torch.randn(n, c, H, H, device=device)


@pytest.mark.parametrize("switches", ["int64", "uint8"])
@pytest.mark.parametrize("impl", IMPLS)
def test_max_unpool2d(benchmark, impl, switches, bench_device, record_extra):
    """DeconvNet unpool1 (64 x 112 x 112 -> 224 x 224) with the fused ReLU of deconv2_2."""
    _skip_unrunnable(impl, bench_device)
    if impl.startswith("torch") and switches == "uint8":
        pytest.skip("torch's max_unpool2d takes int64 indices only")
    x = _deconvnet_pool1(bench_device)
    size = tuple(x.shape[-2:])
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    if switches == "uint8":
        idx = ref.max_pool2d_with_switches(x)[1]
    if impl.startswith("torch"):
        f = _compile(ref.max_unpool2d) if impl == "torch.compile" else ref.max_unpool2d
        out = _run(benchmark, lambda: f(values, idx, size, 2, 2, True), bench_device)
    else:
        def fused():
            return ops.max_unpool2d(values, idx, size, 2, 2, True, impl=impl)

        out = _run(benchmark, fused, bench_device)
    record_extra(benchmark, nbytes=_nbytes(values, idx, out), items=x.shape[0], op="max_unpool2d", impl=impl,
                 switches=switches)


@pytest.mark.parametrize("impl", IMPLS)
def test_max_pool2d_with_switches(benchmark, impl, bench_device, record_extra):
    """DeconvNet pool1: torch writes int64 indices, ours one byte per window."""
    _skip_unrunnable(impl, bench_device)
    x = _deconvnet_pool1(bench_device)
    if impl.startswith("torch"):
        def pool(t):
            return F.max_pool2d(t, 2, 2, ceil_mode=True, return_indices=True)

        f = _compile(pool) if impl == "torch.compile" else pool
        v, s = _run(benchmark, lambda: f(x), bench_device)
    else:
        v, s = _run(benchmark, lambda: ops.max_pool2d_with_switches(x, impl=impl), bench_device)
    record_extra(benchmark, nbytes=_nbytes(x, v, s), items=x.shape[0], op="max_pool2d_with_switches",
                 impl=impl)
