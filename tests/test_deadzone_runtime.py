"""The dead-zone skip inside the fused backend: installed for the families whose input padding
surrounds the image (FCN-VGG, FCN-AlexNet, DeconvNet's encoder), not for the reflect-padded
dilated nets; equal to the reference forward with the skip on and off; counted by fastfcn.flops.

Tolerance, max |fused - reference| / max |reference|: the skip only changes the blocking of the
convolutions; the fused backend's own convolutions differ from torch's by their own rounding.
With oneDNN measured <= 3.2e-7 on these cases, with and without the skip (bound 2e-5); NNPACK's
Winograd transform is less exact: 1.5e-3 on DeconvNet 224x224 (26 layers, folded random
BatchNorm) with or without the skip, <= 1e-5 elsewhere (bound 5e-3). A wrong or stale cached
value is off by the size of the values themselves.
"""

import pytest
import torch
from helpers import randomize_batchnorm

import fastfcn
from fastfcn.flops import count_macs
from fastfcn.runtime.backends import create_backend
from fastfcn.runtime.deadzone import DeadZoneForward

CPU = torch.device("cpu")
TOL = {"onednn": 2e-5, "nnpack": 5e-3}


def model(arch, width=0.125, seed=0):
    torch.manual_seed(seed)
    m = fastfcn.models.build(arch, width=width, num_classes=5)
    randomize_batchnorm(m)
    return m.eval()


def rel_err(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def prefer(monkeypatch, impl):
    """A timer under which ``impl`` wins wherever it applies: the planner's choice, and so the
    rounding, is the same on every run."""
    from fastfcn.runtime import cpu_fast

    def timer(name, fn, best=None):
        return (0.0 if name == impl else 1.0), fn()

    monkeypatch.setattr(cpu_fast, "wall_timer", timer)


@pytest.mark.parametrize("impl", ["onednn", "nnpack"])
@pytest.mark.parametrize(
    "arch,size",
    [("fcn8s", (37, 53)), ("fcn32s", (1, 1)), ("fcn-alexnet", (45, 61)), ("deconvnet", (100, 150)),
     ("deconvnet", (224, 224))],
)  # fmt: skip
def test_fused_backend_with_skip_equals_reference(arch, size, impl, monkeypatch):
    prefer(monkeypatch, impl)
    m = model(arch)
    x = torch.randn(2, 3, *size) * 50
    with torch.no_grad():
        ref = m(x)
    on = create_backend("fused", m, CPU, "fp32")
    off = create_backend("fused", m, CPU, "fp32", skip_dead_zone=False)
    assert isinstance(on.dead_zone, DeadZoneForward) and on.model.backbone_runner is on.dead_zone
    assert off.dead_zone is None and off.model.backbone_runner is None
    with torch.no_grad():
        a, b = on(x, "logits"), off(x, "logits")
        a2 = on(x, "logits")  # second call: from the cache
    for got in (a, b, a2):
        assert got.shape == ref.shape
        assert rel_err(got, ref) < TOL[impl], rel_err(got, ref)
    assert impl in {e["chosen"] for e in on.plan()}
    if size != (224, 224) or arch != "deconvnet":  # 224x224 DeconvNet has no padding to skip
        assert len(on.dead_zone.cache) == 1


def test_dilated_nets_get_no_runner():
    for arch in ("dilated-frontend", "dilated-context"):
        b = create_backend("fused", model(arch), CPU, "fp32")
        assert b.dead_zone is None and b.model.backbone_runner is None
    assert not fastfcn.Segmenter(model("dilated-context"), backend="fused", precision="fp32").skip_dead_zone


def test_segmenter_switch():
    m = model("fcn8s")
    img = torch.randint(0, 256, (41, 29, 3), dtype=torch.uint8)
    on = fastfcn.Segmenter(m, backend="fused", precision="fp32")
    off = fastfcn.Segmenter(m, backend="fused", precision="fp32", skip_dead_zone=False)
    assert on._backend.dead_zone is not None and off._backend.dead_zone is None
    assert on.skip_dead_zone and not off.skip_dead_zone
    assert not fastfcn.Segmenter(m, backend="torch", precision="fp32").skip_dead_zone
    lo, lf = on.run(img, output="logits"), off.run(img, output="logits")
    assert rel_err(lo, lf) < 2e-5


@pytest.mark.parametrize("arch,size,lo,hi", [("fcn-alexnet", (500, 500), 0.08, 0.11),
                                             ("deconvnet", (100, 150), 0.24, 0.29)])  # fmt: skip
def test_flops_count_the_skip_of_other_families(arch, size, lo, hi):
    """Measured shares of the MACs skipped: FCN-AlexNet 500x500 9.6% (conv1's stride 4 shrinks
    the 100 px pad to 25 px at once, and most of its work is in fc6), DeconvNet 100x150 (padded to
    224x224) 26.4% (the encoder is about half the work; the decoder after fc6 depends on the
    whole image); the bounds are +-1.5 points around them."""
    with torch.device("meta"):
        m = fastfcn.models.build(arch).eval()
    c = count_macs(m, (1, 3, *size))
    skipped = 1 - c.computed_macs / c.macs
    assert lo < skipped < hi, skipped


def test_flops_of_dilated_nets_skip_nothing():
    with torch.device("meta"):
        m = fastfcn.models.build("dilated-context").eval()
    c = count_macs(m, (1, 3, 250, 250))
    assert c.computed_macs == c.macs


def test_hold_entries_keeps_what_a_capture_read():
    """A CUDA graph replays reads of the cached maps without the cache: the entries read while
    it was captured are handed to it (cuda_graphs.CapturedForward.held) and outlive the LRU."""
    from fastfcn.runtime.deadzone import hold_entries

    b = create_backend("fused", model("fcn8s"), CPU, "fp32")
    x = torch.randn(1, 3, 23, 31) * 50
    with torch.no_grad():
        b(x, "logits")  # warm-up: the entry is built here, outside the block
        with hold_entries() as held:
            b(x, "logits")
        b(torch.randn(1, 3, 17, 19), "logits")  # outside the block: not held
    assert len(held) == 1 and len(b.dead_zone.cache) == 2
    nbytes = held[0].nbytes
    b.dead_zone.cache.clear()
    assert len(b.dead_zone.cache) == 0 and b.dead_zone.cache.nbytes == 0
    assert nbytes > 0 and held[0].nbytes == nbytes  # the held entry keeps its tensors


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton conv in its interpreter on the CPU (on a GPU: test_gpu_readiness's "
    "test_fused_cuda_backend_chooses_an_epilogue_for_every_conv)",
)
def test_triton_pool_epilogue_under_the_skip(monkeypatch):
    """The fused CUDA backend's conv impls (cuda_fast.install) under the skip, the pool epilogue
    being Triton's kernel in the interpreter: each VGG block's last conv runs with its pool as one
    conv_pool call on its window, chooses the Triton kernel (a tie goes to the first candidate,
    and it agreed with conv + torch's pool, else it would be in ``failed``), and the backbone's
    output and taps agree with torch's plain forward within the tolerance of the conv-epilogue
    tests (rtol = atol = 1e-5, here on max |reference|; measured: 6e-7 of it at most). Plain
    convs run eager: the interpreter takes ~33 s for conv1_1's whole 205 x 211 map (the cache
    fill), against ~0.3 s for a 13 x 19 window (measured on the 2-core AMD EPYC Zen 4)."""
    from fastfcn.models.backbone import run_steps
    from fastfcn.runtime import cuda_fast

    monkeypatch.setattr(cuda_fast, "conv_candidates", lambda conv, relu, gemm=False: {
        "eager": cuda_fast.eager_conv(conv, relu)})  # fmt: skip

    def tie(fn, cuda):
        fn()
        return 0.0

    ref_model = model("fcn8s", width=0.0625)
    m = model("fcn8s", width=0.0625)
    impls = cuda_fast.install(m, timer=tie)
    fwd = DeadZoneForward(m)
    x = torch.randn(2, 3, 7, 13, generator=torch.Generator().manual_seed(11)) * 50
    with torch.no_grad():
        ref_feats, feats = {}, {}
        ref = run_steps(ref_model, ref_model.backbone, x, ref_feats)
        got = fwd(x, feats)
    ends = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"]
    assert {name for name, i in impls.items() if getattr(i, "_pool_choosers", None)} == set(ends)
    for name in ends:
        (chooser,) = impls[name]._pool_choosers.values()
        assert list(chooser.choice.values()) == ["triton_pool"] and not chooser.failed, name
    for a, b in [(got, ref)] + [(feats[t], ref_feats[t]) for t in ("pool3", "pool4")]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_flops_count_the_convs_grown_for_their_pool_epilogue():
    """count_macs(conv_pool=True): the fused CUDA backend's plan, where each conv before a 2x2/2
    pool computes the pool's whole window. FCN-8s 500x500: only conv4_3 grows beyond the plain
    plan's alignment, 74^2 -> 76^2 outputs of 512 x 512 x 9 MACs (runtime/deadzone.py,
    DeadZonePlan)."""
    with torch.device("meta"):
        m = fastfcn.models.build("fcn8s").eval()
    plain, grown = count_macs(m, (1, 3, 500, 500)), count_macs(m, (1, 3, 500, 500), conv_pool=True)
    assert grown.macs == plain.macs
    assert grown.computed_macs - plain.computed_macs == (76**2 - 74**2) * 512 * 512 * 9
    with torch.device("meta"):  # 3x3/2 pools: nothing to grow
        alex = fastfcn.models.build("fcn-alexnet").eval()
    a, b = count_macs(alex, (1, 3, 500, 500)), count_macs(alex, (1, 3, 500, 500), conv_pool=True)
    assert a.computed_macs == b.computed_macs


def _timer(times: dict):
    """A timer that runs fn once and 'measures' it by which way it is (DeadZoneForward names
    them "skip" and "whole"): times maps each to seconds; ``seen`` lists what was timed."""
    seen = []

    def timer(fn, cuda):
        assert fn.__name__ in times, fn.__name__
        fn()
        seen.append(fn.__name__)
        return times[fn.__name__]

    timer.seen = seen
    return timer


@pytest.mark.parametrize("faster", ["skip", "whole"])
def test_skip_or_whole_measured_per_input(faster):
    """With a timer (the fused CUDA backend's), each new input shape runs both ways once and the
    faster is kept per shape; either way the backbone's output and taps are the plain steps'."""
    from fastfcn.models.backbone import run_steps

    m = model("fcn8s", width=0.0625)
    timer = _timer({"skip": 1.0, "whole": 2.0} if faster == "skip" else {"skip": 2.0, "whole": 1.0})
    fwd = DeadZoneForward(m, timer=timer)
    g = torch.Generator().manual_seed(2)
    for n in (1, 2, 2):
        x = torch.randn(n, 3, 21, 17, generator=g) * 40
        with torch.no_grad():
            ref_feats, feats = {}, {}
            ref = run_steps(m, m.backbone, x, ref_feats)
            got = fwd(x, feats)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        for t in ("pool3", "pool4"):
            tol = 1e-5 * float(ref_feats[t].abs().max())
            torch.testing.assert_close(feats[t], ref_feats[t], rtol=1e-5, atol=tol)
    assert timer.seen == ["skip", "whole"] * 2  # batch 1 and batch 2 measured once each
    assert set(fwd.choice.values()) == {faster} and len(fwd.choice) == 2
    assert all(set(t) == {"skip", "whole"} for t in fwd.times.values())


def test_whole_maps_out_of_memory_keep_the_skip(monkeypatch):
    """A whole-map run that does not fit leaves the skip chosen (its own OOM would propagate)."""
    from fastfcn.runtime import deadzone

    m = model("fcn8s", width=0.0625)

    def timer(fn, cuda):
        if fn.__name__ == "whole":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        fn()
        return 1.0

    fwd = DeadZoneForward(m, timer=timer)
    with torch.no_grad():
        fwd(torch.randn(1, 3, 21, 17), {})
    assert list(fwd.choice.values()) == ["skip"] and list(fwd.times.values()) == [{"skip": 1.0}]
    assert deadzone.DeadZoneForward(m).timer is None  # the CPU backend measures nothing
