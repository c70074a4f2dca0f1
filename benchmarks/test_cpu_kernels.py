"""C++ twins vs the plain-PyTorch composition on the CPU (pytest-benchmark).

    pytest benchmarks/test_cpu_kernels.py --benchmark-only

Each benchmark stores in extra_info: median ms, GB/s of the bytes the op must
move (inputs read once, output written once), and, for the C++ op, the speedup
over the torch composition measured in the same session (the torch case of a
pair runs first). Target (issue 3): the C++ bilinear FCN-8s head >= 3x the torch
composition on the 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastfcn.kernels import cpu
from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as st

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fastfcn.kernels.cpu._ext is not built")

_MEDIANS: dict[str, float] = {}


def _record(benchmark, key: str, nbytes: int, baseline: str | None = None) -> None:
    med = benchmark.stats.stats.median
    _MEDIANS[key] = med
    benchmark.extra_info["median_ms"] = round(med * 1e3, 3)
    benchmark.extra_info["GB/s"] = round(nbytes / med / 1e9, 3)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if baseline is not None and baseline in _MEDIANS:
        benchmark.extra_info["speedup"] = round(_MEDIANS[baseline] / med, 2)


def _fcn8s_head(c=21, n=1):
    """FCN-8s at 500x500: score_fr 16x16, score_pool4 44x44, score_pool3 88x88
    (docs/facts.md, "Cost of FCN-8s")."""
    g = torch.Generator().manual_seed(0)
    score = torch.randn(n, c, 16, 16, generator=g)
    skips = [torch.randn(n, c, 44, 44, generator=g), torch.randn(n, c, 88, 88, generator=g)]
    weights = [st.bilinear_weight(c, 4), st.bilinear_weight(c, 4), st.bilinear_weight(c, 16)]
    return score, skips, weights, [2, 2, 8], [5, 9, 31], [1.0, 1.0], (500, 500)


def _torch_head(score, skips, weights, strides, offsets, scales, size):
    """conv_transpose2d + slice + add per stage, then conv_transpose2d + slice + argmax."""
    y = score
    for i, skip in enumerate(skips):
        y = F.conv_transpose2d(y, weights[i], stride=strides[i])
        o = offsets[i]
        y = y + skip[:, :, o : o + y.shape[2], o : o + y.shape[3]]
    y = F.conv_transpose2d(y, weights[-1], stride=strides[-1])
    o = offsets[-1]
    return y[:, :, o : o + size[0], o : o + size[1]].argmax(1).to(torch.uint8)


def _head_bytes(score, skips, size):
    n = score.shape[0]
    return 4 * (score.numel() + sum(s.numel() for s in skips)) + n * size[0] * size[1]


def test_head_torch(benchmark):
    args = _fcn8s_head()
    out = benchmark.pedantic(_torch_head, args=args, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (1, 500, 500)
    _record(benchmark, "head", _head_bytes(args[0], args[1], args[6]))


def test_head_cpp_bilinear(benchmark):
    args = _fcn8s_head()
    kinds = ["bilinear"] * 3
    out = benchmark.pedantic(
        cpu.fcn_head, args=(*args, "labels", kinds), rounds=30, iterations=1, warmup_rounds=2
    )
    assert (out == ref.fcn_head(*args, "labels")).float().mean() > 0.999
    _record(benchmark, "head_cpp", _head_bytes(args[0], args[1], args[6]), baseline="head")
    if "head" in _MEDIANS:
        # the target; measured, not assumed
        assert _MEDIANS["head"] / _MEDIANS["head_cpp"] >= 3


def test_head_cpp_dense(benchmark):
    """The same head when the weights are learned (dense): correct, no structure to exploit."""
    args = _fcn8s_head()
    benchmark.pedantic(cpu.fcn_head, args=(*args, "labels", ["dense"] * 3), rounds=3, iterations=1)
    _record(benchmark, "head_cpp_dense", _head_bytes(args[0], args[1], args[6]), baseline="head")


def _final_stage(c=21):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, c, 70, 70, generator=g), st.bilinear_weight(c, 16)


def test_crop_labels_torch(benchmark):
    x, w = _final_stage()

    def run():
        y = F.conv_transpose2d(x, w, stride=8)
        return y[:, :, 31:531, 31:531].argmax(1).to(torch.uint8)

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    _record(benchmark, "crop", 4 * x.numel() + 500 * 500)


def test_crop_labels_cpp(benchmark):
    x, w = _final_stage()
    benchmark.pedantic(
        cpu.upsample_crop, args=(x, w, 8, 31, (500, 500), "labels", "bilinear"), rounds=30, iterations=1,
        warmup_rounds=2,
    )  # fmt: skip
    _record(benchmark, "crop_cpp", 4 * x.numel() + 500 * 500, baseline="crop")


# DeconvNet's unpooling layers at 224x224 (docs/facts.md, "DeconvNet"): (channels, pooled size)
UNPOOL = [(512, 7), (512, 14), (256, 28), (128, 56), (64, 112)]


def _unpool_inputs(c, h):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, c, 2 * h, 2 * h, generator=g)
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    _, sw = ref.max_pool2d_with_switches(x, 2, 2, True)
    return values, idx, sw, (2 * h, 2 * h)


def _unpool_bytes(values, index_bytes, size):
    return values.numel() * (4 + index_bytes) + values.shape[1] * size[0] * size[1] * 4


@pytest.mark.parametrize("c,h", UNPOOL, ids=[f"unpool{5 - i}" for i in range(len(UNPOOL))])
def test_unpool_torch(benchmark, c, h):
    values, idx, _, size = _unpool_inputs(c, h)
    benchmark(F.max_unpool2d, values, idx, 2, 2, output_size=size)
    _record(benchmark, f"unpool{c}x{h}", _unpool_bytes(values, 8, size))


@pytest.mark.parametrize("c,h", UNPOOL, ids=[f"unpool{5 - i}" for i in range(len(UNPOOL))])
def test_unpool_cpp_indices(benchmark, c, h):
    values, idx, _, size = _unpool_inputs(c, h)
    out = benchmark(cpu.max_unpool2d, values, idx, size)
    assert torch.equal(out, F.max_unpool2d(values, idx, 2, 2, output_size=size))
    _record(benchmark, f"unpool{c}x{h}_cpp", _unpool_bytes(values, 8, size), baseline=f"unpool{c}x{h}")


@pytest.mark.parametrize("c,h", UNPOOL, ids=[f"unpool{5 - i}" for i in range(len(UNPOOL))])
def test_unpool_cpp_switches(benchmark, c, h):
    values, idx, sw, size = _unpool_inputs(c, h)
    out = benchmark(cpu.max_unpool2d, values, sw, size)
    assert torch.equal(out, F.max_unpool2d(values, idx, 2, 2, output_size=size))
    _record(benchmark, f"unpool{c}x{h}_sw", _unpool_bytes(values, 1, size), baseline=f"unpool{c}x{h}")
