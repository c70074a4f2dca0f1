"""The static sm_90a build report (benchmarks/triton_sm90.py): its enumeration covers every
upsample / unpool specialisation fastfcn.ops launches, and a representative subset compiles for
sm_90a with the installed Triton, without the spills the launch-config comments rule out.

No GPU: Triton's NVIDIA backend compiles for GPUTarget("cuda", 90, 32) on the CPU and runs the
ptxas it bundles. triton is a dev dependency, so a missing backend or ptxas fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from fastfcn import ops
from fastfcn.heads import HEADS
from fastfcn.kernels import structure as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import triton_sm90 as report  # noqa: E402

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# ops launches Triton on CUDA tensors, or on CPU ones in the interpreter (no GPU): the recorded
# launches below are made with tensors where ops accepts them
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def on_dev():
    """Tensors the helpers create without a device go to DEV."""
    before = torch.get_default_device()
    torch.set_default_device(DEV)
    yield
    torch.set_default_device(before)

# The subset compiled here: FCN-8s's last head stage in a bf16 model (fp32 after the skip stages,
# uint8 labels out), DeconvNet's unpool with switches and the fused ReLU, and a VGG block's last
# conv with the 2x2 pool in its epilogue (conv1_2 of the FCN nets), bf16.
SUBSET = {
    "upsample/final/bilinear/labels-u8/xfp32-skipnone/k16s8": "upsample.upsample_kernel",
    "unpool/unpool/bf16/idx=u8/relu=True/int64=False/k2s2": "unpool.max_unpool_gather_kernel",
    "conv/pool/bf16/k3x3s1d1/pad1/cin64-cout64/n1": "conv_epilogue.conv_bias_relu_kernel",
}


class Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) records the launch, runs nothing."""

    def __init__(self, name: str, seen: list):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda *args, **kw: self.seen.append((self.name, args, kw))


def _ptr_dtypes(args, n: int) -> tuple:
    return tuple(a.dtype for a in args[:n])


def _upsample_key(args, kw) -> tuple:
    cx = tuple(kw[k] for k in ("K", "S", "KIND", "OUTPUT", "HAS_SKIP"))
    return cx + _ptr_dtypes(args, 4)


def _unpool_key(name, args, kw) -> tuple:
    flags = tuple(kw.get(k) for k in ("KERNEL", "STRIDE", "SWITCHES", "RELU", "INT64"))
    return (name,) + flags + _ptr_dtypes(args, 3)


def _weight(kind: str, c: int, k: int) -> torch.Tensor:
    if kind == "bilinear":
        return st.bilinear_weight(c, k, depthwise=True)
    if kind == "depthwise":
        return torch.rand(c, 1, k, k)
    return torch.rand(c, c, k, k)


def _head_calls(kind: str, dtype: torch.dtype, c: int):
    """Every way fastfcn.ops reaches upsample_kernel for one kind, dtype and class count: each head
    of HEADS through fcn_head (all outputs), and the public upsample_add / upsample_crop."""
    for head in HEADS.values():
        stages = head.stages
        weights = [_weight(kind, c, s.kernel) for s in stages]
        strides, offsets = [s.stride for s in stages], [s.offset for s in stages]
        h = 2
        score = torch.randn(1, c, h, h, dtype=dtype)
        skips = []
        for s in stages[:-1]:
            h = (h - 1) * s.stride + s.kernel
            skips.append(torch.randn(1, c, h + s.offset + 1, h + s.offset + 1, dtype=dtype))
        last = stages[-1]
        side = last.offset // last.stride + 2  # the upsampled map covers a 1x1 crop at the offset
        x_last = torch.randn(1, c, side, side, dtype=dtype)
        for output in st.OUTPUTS:
            yield partial(ops.fcn_head, score, skips, weights, strides, offsets, [1.0] * len(skips), (1, 1),
                          output, impl="triton")  # fmt: skip
            yield partial(ops.upsample_crop, x_last, weights[-1], last.stride, last.offset, (1, 1), output,
                          impl="triton")  # fmt: skip
        for s, w in zip(stages[:-1], weights):
            x = torch.randn(1, c, 2, 2, dtype=dtype)
            side = s.kernel + s.stride + s.offset
            skip = torch.randn(1, c, side, side, dtype=dtype)
            yield partial(ops.upsample_add, x, w, s.stride, skip, s.offset, 0.5, impl="triton")
            yield partial(ops.upsample_add, x, w, s.stride, impl="triton")


def test_enumeration_covers_every_upsample_launch_of_ops(monkeypatch, on_dev):
    """Each (kind, output, dtype) launch ops makes for the heads' geometries (constexprs and the
    dtypes of x, weight, skip and out) is one the report compiles."""
    from fastfcn.kernels import upsample as up

    seen: list = []
    monkeypatch.setattr(up, "upsample_kernel", Recorder("upsample", seen))
    for kind in st.KINDS:
        for dtype in FLOATS:
            # 300 classes: int32 labels; dense weights of 300 x 300 classes are skipped for time
            for c in (3, 300) if kind != "dense" else (3,):
                for call in _head_calls(kind, dtype, c):
                    call()
    launched = {_upsample_key(args, kw) for _, args, kw in seen}
    enumerated = {
        tuple(x.constexprs[k] for k in ("K", "S", "KIND", "OUTPUT", "HAS_SKIP")) + x.args[:4]
        for x in report.all_launches("^upsample/")
    }
    kinds = {key[2] for key in launched}
    outputs = {key[3] for key in launched}
    assert kinds == set(st.KIND_CODES.values())
    assert outputs == {st.OUT_LOGITS, st.OUT_LABELS_U8, st.OUT_LABELS_I32, st.OUT_PROBS}
    assert {key[5] for key in launched} == set(FLOATS)
    assert launched - enumerated == set(), "ops launches specialisations the report does not compile"


def test_enumeration_covers_every_unpool_launch_of_ops(monkeypatch, on_dev):
    from fastfcn.kernels import unpool

    seen: list = []
    monkeypatch.setattr(unpool, "max_pool_switches_kernel", Recorder("unpool.max_pool_switches_kernel", seen))
    monkeypatch.setattr(unpool, "max_unpool_gather_kernel", Recorder("unpool.max_unpool_gather_kernel", seen))
    for limit in (unpool.INT32_LIMIT, 50):  # 50: the int64 path, forced on a small shape
        monkeypatch.setattr(unpool, "INT32_LIMIT", limit)
        for dtype in FLOATS:
            x = torch.randn(1, 2, 8, 8, dtype=dtype)
            ops.max_pool2d_with_switches(x, impl="triton")
            v, idx = torch.nn.functional.max_pool2d(x.float(), 2, 2, return_indices=True)
            sw = torch.zeros(v.shape, dtype=torch.uint8)
            for indices in (idx, sw):
                for relu in (False, True):
                    ops.max_unpool2d(v.to(dtype), indices, (8, 8), relu=relu, impl="triton")
    launched = {_unpool_key(name, args, kw) for name, args, kw in seen}
    enumerated = set()
    for x in report.all_launches("^unpool/"):
        flags = tuple(x.constexprs.get(k) for k in ("KERNEL", "STRIDE", "SWITCHES", "RELU", "INT64"))
        enumerated.add((x.kernel,) + flags + x.args[:3])
    assert len(launched) == 3 * 2 + 3 * 2 * 2 * 2  # pool: dtype x int64; unpool: also indices x relu
    assert launched - enumerated == set()


def test_enumeration_has_each_conv_the_fused_backend_gives_triton():
    """Every precision of every Triton-candidate conv shape, pooled where a pool follows; the
    enumeration's shapes come from cuda_fast.install itself, so this checks the plumbing."""
    convs = report.triton_convs()
    names = {(arch, layer, pool) for arch, layer, _, pool in convs}
    assert ("fcn8s", "conv1_2", True) in names and ("fcn8s", "conv1_1", False) in names
    assert not any(layer.startswith(("fc6", "score")) for _, layer, _ in names)
    assert not any(arch == "fcn-alexnet" and layer == "conv2" for arch, layer, _ in names)  # grouped
    launches = report.all_launches("^conv/")
    precisions = {(x.args[0], x.constexprs["IEEE"]) for x in launches}
    assert precisions == {(torch.float32, True), (torch.float32, False), (torch.bfloat16, False),
                          (torch.float16, False)}  # fmt: skip
    geometry = {(x.constexprs["KH"], x.constexprs["STRIDE"], x.constexprs["DIL"], x.constexprs["POOL"])
                for x in launches}  # fmt: skip
    want = {(c.kernel_size[0], c.stride[0], c.dilation[0], pool) for _, _, c, pool in convs}
    assert geometry == want


def test_subset_compiles_for_sm90a_without_spills(tmp_path):
    """FCN-8s's bf16 labels stage, one unpool and one pooled conv epilogue build for sm_90a with
    the installed Triton, with no spills (what the config comments say), and with the registers
    and spills of the committed report for this Triton version when there is one."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(90).path)
    assert ptxas.is_file(), f"Triton's NVIDIA backend has no ptxas at {ptxas}: reinstall triton"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pattern = "^(" + "|".join(name.replace("[", r"\[") for name in SUBSET) + ")$"
    script = ROOT / "benchmarks" / "triton_sm90.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--only", pattern],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / f"sm90a-triton-{triton.__version__}.json").read_text())["specialisations"]
    assert {r["name"]: r["kernel"] for r in rows} == SUBSET
    for r in rows:
        assert r["ok"], r
        assert 0 < r["regs"] <= 255, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['name']} spills: {r}"
    committed = report.RESULTS / f"sm90a-triton-{triton.__version__}.json"
    if committed.is_file():
        stored = {r["name"]: r for r in json.loads(committed.read_text())["specialisations"]}
        for r in rows:
            fields = ("regs", "spill_stores", "spill_loads", "shared_bytes")
            want = stored[r["name"]]
            assert [r[f] for f in fields] == [want[f] for f in fields], r["name"]


def test_conv_cuda_configs_match_reference_in_interpreter(monkeypatch):
    """Each CUDA launch config of the conv epilogue (its block shapes, masks of partial tiles and
    the pooled windows' loop) gives the reference result, run in Triton's interpreter. On a GPU
    the CUDA configs are what every conv test runs already."""
    import torch.nn.functional as F

    from fastfcn.kernels import conv_epilogue as ce

    if torch.cuda.is_available():
        pytest.skip("on a GPU the CUDA configs run compiled in every conv test (test_gpu_readiness)")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 7, 13, generator=g)  # odd sizes: the pool's ceil windows hang over the edge
    wt = torch.randn(17, 5, 3, 3, generator=g) / 45**0.5
    b = torch.randn(17, generator=g)
    conv = F.relu(F.conv2d(x.double(), wt.double(), b.double(), 1, 1))
    for (pool, ieee), cfg in ce.CUDA_LAUNCH.items():
        monkeypatch.setattr(ce, "launch_config", lambda is_cuda, p, i, cfg=cfg: cfg)
        want = F.max_pool2d(conv, 2, 2, ceil_mode=True) if pool else conv
        got = ce.conv_bias_relu(x, ce.pack_weight(wt), b, (3, 3), (1, 1), pool=pool, ieee=ieee)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"config {cfg}")


def test_committed_reports_are_current_and_clean():
    """The committed reports (one per Triton version) built everything without spills, with the
    launch configs the kernels carry now; the installed Triton's report has every specialisation
    the code launches today. A config or kernel-set change needs a rerun:
    python benchmarks/triton_sm90.py (with each Triton version reported)."""
    import triton

    files = sorted(report.RESULTS.glob("sm90a-triton-*.json"))
    assert files, f"no static reports in {report.RESULTS}"
    current = {x.name: x.config for x in report.all_launches()}
    for f in files:
        rows = json.loads(f.read_text())["specialisations"]
        assert all(r["ok"] for r in rows), [r["name"] for r in rows if not r["ok"]]
        assert not [r["name"] for r in rows if r["spill_stores"] or r["spill_loads"]], f.name
        stale = [f"{r['name']}: {r['config']}" for r in rows
                 if current.get(r["name"], r["config"]) != r["config"]]  # fmt: skip
        assert not stale, f"{f.name}: {len(stale)} launch configs the code no longer has, e.g. {stale[:3]}"
        if f.name == f"sm90a-triton-{triton.__version__}.json":
            assert set(current) <= {r["name"] for r in rows}, f"{f.name} lacks specialisations"


def test_specialisation_classes_follow_triton():
    """The report merges launches whose arguments Triton specialises alike: its classes of ints
    (== 1 a constexpr, multiples of 16 with a divisibility hint, int64 past int32) and pointers
    must be the installed Triton's own."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    for v in (0, 1, 2, 3, 16, 17, 100, 224, 2**31 - 16, 2**31 + 16, 2**31 + 17, torch.float32, torch.uint8):
        arg = torch.empty(1, dtype=v) if isinstance(v, torch.dtype) else v
        kind, hint = native_specialize_impl(BaseBackend, arg, False, True, True)[:2]
        aligned = hint == "D" and not kind.startswith("*")  # pointers: torch's allocations are all aligned
        want = "1" if kind == "constexpr" else kind + ("/16" if aligned else "")
        assert report._arg_class(v) == want, (v, kind, hint)
