"""CPU planner candidates beyond the convolution libraries: the C++ channels_last max pool
without indices (planned per shape against torch's) and the 1x1 convolution as one GEMM."""

import pytest
import torch
import torch.nn.functional as F

import fastfcn.models as models
from fastfcn.kernels import cpu
from fastfcn.models.backbone import Pool
from fastfcn.runtime import cpu_fast

pytestmark = pytest.mark.skipif(not cpu.available(), reason="C++ kernels not built")
CL = torch.channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,kernel,stride",
    [((1, 5, 1, 1), 2, 2), ((2, 3, 7, 13), 2, 2), ((1, 17, 9, 9), 3, 2), ((1, 8, 10, 11), 3, 3),
     ((2, 64, 127, 129), 2, 2), ((1, 33, 2, 3), 2, 2)],
)  # fmt: skip
def test_equals_torch_max_pool_ceil(shape, kernel, stride, dtype):
    g = torch.Generator().manual_seed(sum(shape) + kernel)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=CL)
    x[..., ::3, ::2] *= -1  # negative maxima too
    got = cpu.max_pool2d_nhwc(x, kernel, stride)
    want = F.max_pool2d(x, kernel, stride, ceil_mode=True)
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want)  # exact: the maximum element is copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_propagates_and_negative_infinity_survives(dtype):
    x = torch.full((1, 4, 4, 4), float("-inf")).to(dtype).contiguous(memory_format=CL)
    x[0, 1, 3, 3] = float("nan")  # last position of the last window
    x[0, 2, 0, 0] = float("nan")  # first position of the first window
    x[0, 2, 0, 1] = 5.0
    got = cpu.max_pool2d_nhwc(x, 2, 2)
    want = F.max_pool2d(x, 2, 2, ceil_mode=True)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 2
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert got[0, 0].eq(float("-inf")).all()


def test_refuses_what_it_does_not_compute():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="channels_last"):
        cpu.max_pool2d_nhwc(x)  # NCHW
    with pytest.raises(ValueError, match="float32"):
        cpu.max_pool2d_nhwc(x.half().contiguous(memory_format=CL))
    with pytest.raises(ValueError, match="smaller than"):
        cpu.max_pool2d_nhwc(torch.randn(1, 4, 2, 2).contiguous(memory_format=CL), 3, 1)


class Prefer:
    """A timer under which the pool candidate ``name`` wins (0.1 s against 1 s) and every
    convolution runs through oneDNN (0.05 s), whichever pool wins."""

    def __init__(self, name):
        self.name = name

    def __call__(self, name, fn, best=None):
        return (0.05 if name.startswith("onednn") else 0.1 if name == self.name else 1.0), fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_model_pools_through_the_cpp_kernel_and_agrees(dtype):
    """dilated-frontend (three switchless pools) through the planner with the C++ pool chosen:
    the same output as with torch's pool chosen, bit for bit."""
    outs = {}
    for prefer in ("cpp", "torch"):
        torch.manual_seed(0)
        m = models.fold_batchnorm(models.build("dilated-frontend", 5, 1 / 16).eval())
        planner = cpu_fast.ConvPlanner(m, dtype, timer=Prefer(prefer), persist=False)
        x = torch.randn(1, 3, 19, 26).contiguous(memory_format=CL)
        with torch.no_grad():
            outs[prefer] = m(x)
        pools = [e for e in planner.plan() if e["layer"] == "maxpool"]
        assert len(pools) == sum(isinstance(s, Pool) for s in m.backbone) == 3
        assert {e["chosen"] for e in pools} == {prefer}
    assert torch.equal(outs["cpp"], outs["torch"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [True, False])
def test_gemm1x1_candidate_equals_torch_conv(dtype, relu):
    """The 1x1 convolution as one addmm over the pixels of a channels_last map (fc7, score layers)."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 40, 1, 1, generator=g), torch.randn(24, generator=g)
    geom = cpu_fast._Geom(w, b, [1, 1], [1, 1], 1, relu)
    x = torch.randn(2, 40, 7, 13, generator=g).to(dtype).contiguous(memory_format=CL)
    got = cpu_fast.Gemm1x1Conv(geom, dtype)(x, (0, 0))
    want = cpu_fast.TorchConv(geom, dtype)(x, (0, 0))
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    # bf16: both round one fp32 accumulation to bf16 (2^-8 relative), summed in different orders: 2 ulps
    tol = 0 if dtype == torch.float32 else 2**-7 * float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=tol + 1e-5)
    assert "gemm1x1" + ("" if dtype == torch.float32 else "-bfloat16") in cpu_fast.candidates(geom, dtype)
    three = cpu_fast._Geom(torch.randn(24, 40, 3, 3), torch.randn(24), [1, 1], [1, 1], 1, relu)
    assert not any(k.startswith("gemm1x1") for k in cpu_fast.candidates(three, dtype))
    impl = cpu_fast.Gemm1x1Conv(geom, dtype)
    assert not impl.accepts(x, (1, 1)) and not impl.accepts(x.contiguous(), (0, 0))
    with pytest.raises(ValueError, match="unpadded channels_last"):
        impl(x, (1, 1))


def _keeps(env: dict) -> str:
    import os
    import subprocess
    import sys

    code = "from fastfcn.runtime.memory import keep_freed_memory as k; print(k(), k())"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_kept_once_per_process_and_can_be_turned_off():
    import ctypes

    glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert _keeps({"FASTFCN_KEEP_FREED_MEMORY": ""}) == ("True True" if glibc else "False False")
    assert _keeps({"FASTFCN_KEEP_FREED_MEMORY": "0"}) == "False False"


def test_the_fused_cpu_backend_applies_it():
    from fastfcn.runtime.memory import keep_freed_memory

    seg = __import__("fastfcn").Segmenter(models.build("fcn32s", 3, 1 / 16), backend="fused", device="cpu",
                                          precision="fp32")  # fmt: skip
    assert seg._backend.keeps_freed_memory is keep_freed_memory()
