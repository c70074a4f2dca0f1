"""The image-independent positions ("dead zone"): geometry against docs/facts.md and brute force, and
the executor against the reference forward.

Tolerance of the exactness checks: the skip recomputes the same convolutions on smaller windows,
so only the convolution's blocking (summation order) may differ. Measured: max |difference| of
the logits 0-4.4 float32 ulps of their largest value over test_fcn_logits_equal_the_reference's
cases (1.1e-8 on backbone maps of max 0.05); the bound used is 32 ulps of the largest value
(32 * 1.19e-7 * max|ref|), while a single wrong or stale cached value is off by the size of
the values themselves (dropping one ring strip failed 21 tests here, unshifted switches 2).
"""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm
from torch import nn

import fastfcn
from fastfcn.heads import run_head
from fastfcn.models.backbone import LRN, Conv, Pool, run_steps
from fastfcn.models.common import ops_impl
from fastfcn.runtime import deadzone
from fastfcn.runtime.deadzone import DeadZoneCache, DeadZoneForward, DeadZonePlan, _inside, conv_dim, pool_dim

EPS32 = torch.finfo(torch.float32).eps


def assert_float32_equal(got, ref):
    bound = 32 * EPS32 * ref.abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= bound, f"max |difference| {err:.3g} > {bound:.3g} (32 float32 ulps of max |ref|)"


def fcn(arch="fcn8s", width=0.125, seed=0):
    torch.manual_seed(seed)
    return fastfcn.models.build(arch, width=width).eval()


def meta_fcn(arch="fcn8s", width=1.0):
    with torch.device("meta"):
        return fastfcn.models.build(arch, width=width).eval()


def fcn_logits(model, fwd, x):
    """FCN.forward with the backbone run by ``fwd``."""
    feats = {}
    h = fwd(x, feats)
    score = model.score_fr(model._fc(h))
    return run_head(model.head, model, score, feats, tuple(x.shape[-2:]), "logits", ops_impl(model.impl))


class Toy(nn.Module):
    """A backbone-as-data model for step kinds FCN-VGG lacks: AlexNet's 11x11/4 conv with pad 100,
    LRN, 3x3/2 pooling and grouped convs; DeconvNet's BatchNorm and pooling switches; dilation."""

    def __init__(self, kind: str):
        super().__init__()
        if kind == "alexnet":
            self.conv1 = nn.Conv2d(3, 8, 11, stride=4, padding=100)
            self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
            self.conv2 = nn.Conv2d(8, 8, 5, padding=2, groups=2)
            self.conv3 = nn.Conv2d(8, 12, 3, padding=1)
            self.backbone = (
                Conv("conv1"), Pool(3, 2), LRN("norm1"), Conv("conv2"), Pool(3, 2, tap="p2"),
                Conv("conv3"), Pool(3, 2),
            )  # fmt: skip
        elif kind == "deconvnet":
            self.conv1_1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1_1 = nn.BatchNorm2d(8)
            self.conv1_2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn1_2 = nn.BatchNorm2d(8)
            self.conv2_1 = nn.Conv2d(8, 16, 3, padding=1)
            self.bn2_1 = nn.BatchNorm2d(16)
            self.conv3_1 = nn.Conv2d(16, 16, 3, padding=1)
            self.bn3_1 = nn.BatchNorm2d(16)
            self.backbone = (
                Conv("conv1_1", "bn1_1"), Conv("conv1_2", "bn1_2"), Pool(2, 2, switches=1),
                Conv("conv2_1", "bn2_1"), Pool(2, 2, switches=2), Conv("conv3_1", "bn3_1"),
                Pool(2, 2, switches=3),
            )  # fmt: skip
        elif kind == "dilated":
            self.conv1 = nn.Conv2d(3, 8, 3, padding=40)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=4, dilation=4)
            self.conv4 = nn.Conv2d(8, 8, 3, stride=2)
            self.backbone = (
                Conv("conv1"),
                Conv("conv2"),
                Pool(2, 2),
                Conv("conv3"),
                Conv("conv4", relu=False),
            )
        elif kind == "sampler":  # a strided 1x1 conv that skips the image's columns 0-1
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 1, stride=3, padding=1)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
            self.backbone = (Conv("conv1"), Pool(2, 2, tap="p1"), Conv("conv2"), Conv("conv3"), Pool(2, 2))
        else:
            raise ValueError(kind)
        randomize_batchnorm(self)
        self.eval()


# -- geometry ----------------------------------------------------------------------------------


def dep_len(span):
    return span[1] - span[0]


def test_fcn8s_500_per_layer_numbers():
    model = meta_fcn()
    plan = DeadZonePlan(model, model.backbone, (500, 500))
    got = {}
    for sp in plan.steps:
        name = sp.step.tap if isinstance(sp.step, Pool) else sp.step.name  # FCN taps every pool
        assert sp.rows == sp.cols  # square input: both dimensions alike
        got[name] = (dep_len(sp.rows.out_dep), sp.rows.out_size)
    # docs/facts.md, "Image-independent positions" (its table, with the correction listed under
    # "Corrections": the paper-style count of pool3 69/88 and conv4_x 71-75 is one too many;
    # brute force (test_brute_force_fcn, and the same count at 500x500) finds 68 and 70-74:
    # pool3 output 78 reads conv3_3 rows 156-157, beyond its last dependent row 154).
    assert got == {
        "conv1_1": (502, 698), "conv1_2": (504, 698), "pool1": (253, 349),
        "conv2_1": (255, 349), "conv2_2": (257, 349), "pool2": (129, 175),
        "conv3_1": (131, 175), "conv3_2": (133, 175), "conv3_3": (135, 175), "pool3": (68, 88),
        "conv4_1": (70, 88), "conv4_2": (72, 88), "conv4_3": (74, 88), "pool4": (38, 44),
        "conv5_1": (40, 44), "conv5_2": (42, 44), "conv5_3": (44, 44), "pool5": (22, 22),
    }  # fmt: skip
    assert plan.steps[-2].full and not plan.steps[-4].full


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (224, 224), (500, 375), (1080, 1920)])
@pytest.mark.parametrize("kind", ["fcn8s", "alexnet", "deconvnet", "dilated"])
def test_plan_sizes_match_torch(kind, size):
    model = meta_fcn() if kind == "fcn8s" else Toy(kind).to("meta")
    if kind == "deconvnet":
        size = (max(32, -(-size[0] // 32) * 32), max(32, -(-size[1] // 32) * 32))
    plan = DeadZonePlan(model, model.backbone, size)
    h = torch.empty(1, 3, *size, device="meta")
    for sp in plan.steps:
        assert (sp.rows.size, sp.cols.size) == tuple(h.shape[-2:])
        h = run_steps(model, [sp.step], h, {}, {})
        assert sp.out_size == tuple(h.shape[-2:]), sp.step


def nonzero_rect(h):
    """(mask of positions where any channel is nonzero, its bounding rectangle as spans)."""
    mask = (h[0] != 0).any(0)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    return mask, ((rows.min().item(), rows.max().item() + 1), (cols.min().item(), cols.max().item() + 1))


def averaging(model):
    """A float64 copy with every weight 1 / fan-in and every bias 0: an output is nonzero on an
    input of ones exactly where its receptive field reaches the image (no value cancels; max
    pooling of non-negative values is nonzero where one input is)."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 / p[0].numel() if name.endswith("weight") and p.dim() > 1 else 0.0)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.fill_(1.0)
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
    return m


@pytest.mark.parametrize(
    "kind, size, image",
    [("fcn8s", (7, 13), None), ("fcn8s", (64, 97), None), ("alexnet", (45, 30), None),
     ("deconvnet", (64, 96), (20, 37)), ("deconvnet", (64, 64), (64, 1))],
)  # fmt: skip
def test_brute_force(kind, size, image):
    """The planned dependent rectangle is exactly the set of outputs the image reaches."""
    model = averaging(fcn() if kind == "fcn8s" else Toy(kind))
    image = image or size
    x = torch.zeros(1, 3, *size, dtype=torch.float64)
    x[..., : image[0], : image[1]] = 1.0
    plan = DeadZonePlan(model, model.backbone, size, image)
    h = x
    with torch.no_grad():
        for sp in plan.steps:
            h = run_steps(model, [sp.step], h, {}, {})
            mask, rect = nonzero_rect(h)
            assert rect == (sp.rows.out_dep, sp.cols.out_dep), sp.step
            assert int(mask.sum()) == dep_len(rect[0]) * dep_len(rect[1]), sp.step


def bumped(x, a, b):
    y = x.clone()
    y[..., a:b] += 1
    return y


def test_one_dimension_windows_reproduce_the_full_layer():
    """conv_dim / pool_dim on every small case: the outputs at out_dep, computed from the clipped
    window with the padding the plan names, equal those of the whole layer."""
    g = torch.Generator().manual_seed(0)
    for size in range(1, 14):
        x = torch.rand(1, 1, size, generator=g, dtype=torch.float64)
        for a in range(size):
            for b in (a + 1, size):
                for k, s, p, d in [(3, 1, 1, 1), (3, 2, 2, 1), (5, 1, 3, 2), (2, 3, 0, 1), (3, 1, 4, 1)]:
                    if size + 2 * p < d * (k - 1) + 1:
                        continue
                    w = torch.rand(1, 1, k, generator=g, dtype=torch.float64)
                    dp = conv_dim(size, (a, b), k, s, p, d)
                    full = F.conv1d(x, w, stride=s, padding=p, dilation=d)
                    assert full.shape[-1] == dp.out_size
                    if dp.out_dep[0] >= dp.out_dep[1]:  # stride > kernel: no output reads [a, b)
                        assert torch.equal(
                            F.conv1d(bumped(x, a, b), w, stride=s, padding=p, dilation=d), full
                        )
                        continue
                    (lo, hi), pad = dp.clipped, dp.pad
                    part = F.conv1d(F.pad(x[..., lo:hi], pad), w, stride=s, dilation=d)
                    torch.testing.assert_close(part, full[..., dp.out_dep[0] : dp.out_dep[1]])
                for k, s in [(2, 2), (3, 2), (3, 1), (2, 3)]:
                    if size < k - s + 1:  # torch has no output either
                        with pytest.raises(ValueError, match="no output"):
                            pool_dim(size, (a, b), k, s)
                        with pytest.raises(RuntimeError):
                            F.max_pool1d(x, k, s, ceil_mode=True)
                        continue
                    dp = pool_dim(size, (a, b), k, s)
                    full = F.max_pool1d(x, k, s, ceil_mode=True)
                    assert full.shape[-1] == dp.out_size
                    if dp.out_dep[0] >= dp.out_dep[1]:
                        assert torch.equal(F.max_pool1d(bumped(x, a, b), k, s, ceil_mode=True), full)
                        continue
                    lo, hi = dp.clipped
                    part = F.max_pool1d(x[..., lo:hi], k, s, ceil_mode=True)
                    torch.testing.assert_close(part, full[..., dp.out_dep[0] : dp.out_dep[1]])


# -- the executor ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["fcn8s", "fcn16s", "fcn32s", "fcn8s-atonce"])
@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 97), (160, 120)])
def test_fcn_logits_equal_the_reference(arch, size):
    model = fcn(arch, width=0.125 if arch != "fcn32s" else 0.25)
    fwd = DeadZoneForward(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (2, 3):  # the second batch size reuses the first one's cache entry
            x = torch.randn(n, 3, *size, generator=g) * 50
            assert_float32_equal(fcn_logits(model, fwd, x), model(x))
    assert len(fwd.cache) == 1


def test_convs_before_pools_compute_the_pool_window():
    """conv1_2, conv2_2, conv3_3 compute the 1 px the pool reads beyond their dependent outputs
    (<= 2% more), so pool1-3 read their window without a copy; conv4_3 would need 5.5%: no."""
    model = meta_fcn()
    plan = DeadZonePlan(model, model.backbone, (500, 500), whole=[9, 13])
    by = {sp.step.tap if isinstance(sp.step, Pool) else sp.step.name: sp for sp in plan.steps}
    assert by["conv1_2"].rows.out_comp == (96, 602) and by["conv1_2"].rows.out_dep == (97, 601)
    assert by["conv2_2"].rows.out_comp == (46, 304) and by["conv3_3"].rows.out_comp == (20, 156)
    assert by["conv4_3"].rows.out_comp == by["conv4_3"].rows.out_dep == (7, 81)
    for pool in ("pool1", "pool2", "pool3"):
        assert _inside(by[pool].window, by[pool].avail), pool
    assert not _inside(by["pool4"].window, by["pool4"].avail)
    assert by["conv4_1"].avail == by["pool3"].whole  # pool3 is kept whole (a tap)
    plain = DeadZonePlan(model, model.backbone, (500, 500), whole=[9, 13], align=0)
    assert all(sp.comp == (sp.rows.out_dep, sp.cols.out_dep) for sp in plain.steps)


@pytest.mark.parametrize("align", [0.0, 0.02])
def test_backbone_maps_equal_run_steps_and_skip_is_dominant(align):
    model = fcn()
    fwd = DeadZoneForward(model, align=align)
    x = torch.randn(2, 3, 7, 13) * 50
    with torch.no_grad():
        ref_feats, feats = {}, {}
        ref = run_steps(model, model.backbone, x, ref_feats)
        got = fwd(x, feats)
    assert set(feats) == {"pool3", "pool4"}  # the head's taps only
    assert_float32_equal(got, ref)
    for tap in feats:
        assert_float32_equal(feats[tap], ref_feats[tap])
    # At 7x13 conv1_1 computes 9 x 15 of its 205 x 211 outputs.
    sp = fwd.plan((7, 13)).steps[0]
    assert (dep_len(sp.rows.out_dep), dep_len(sp.cols.out_dep)) == (9, 15)
    assert sp.dependent_fraction < 0.01


def padded_input(n, size, image, g):
    x = torch.zeros(n, 3, *size)
    x[..., : image[0], : image[1]] = torch.randn(n, 3, *image, generator=g) * 50
    return x


@pytest.mark.parametrize(
    "kind, size, image",
    [("alexnet", (45, 30), None), ("dilated", (33, 50), None), ("sampler", (40, 30), (40, 2))],
)
def test_other_step_kinds_equal_run_steps(kind, size, image):
    model = Toy(kind)
    fwd = DeadZoneForward(model)
    g = torch.Generator().manual_seed(4)
    x = padded_input(3, size, image or size, g)
    with torch.no_grad():
        ref_feats, feats = {}, {}
        ref = run_steps(model, model.backbone, x, ref_feats)
        got = fwd(x, feats, image_size=image)
    if kind == "sampler":  # no output of conv2 reads the image: the rest comes from the cache
        assert [sp.empty for sp in fwd.plan(size, image).steps] == [False, False, True, True, True]
    assert_float32_equal(got, ref)
    for tap in ref_feats:
        assert_float32_equal(feats[tap], ref_feats[tap])


@pytest.mark.parametrize("size, image", [((64, 96), (20, 37)), ((64, 64), (64, 64)), ((32, 64), (1, 1))])
def test_switches_in_full_map_coordinates(size, image):
    """DeconvNet-like encoder: the image top-left in its zero padding, torch's int64 switches."""
    model = Toy("deconvnet")
    fwd = DeadZoneForward(model)
    g = torch.Generator().manual_seed(2)
    for n in (2, 1):
        x = padded_input(n, size, image, g)
        with torch.no_grad():
            ref_sw, sw = {}, {}
            ref = run_steps(model, model.backbone, x, {}, ref_sw)
            got = fwd(x, {}, sw, image_size=image)
        assert_float32_equal(got, ref)
        assert set(sw) == {1, 2, 3}
        for level in ref_sw:
            assert sw[level][1] == ref_sw[level][1]
            assert torch.equal(sw[level][0], ref_sw[level][0]), level
            # Unpooling with them restores the same map.
            pooled = F.max_pool2d(torch.ones_like(ref_sw[level][0], dtype=torch.float32), 1)
            a = F.max_unpool2d(pooled, sw[level][0], 2, 2, output_size=sw[level][1])
            b = F.max_unpool2d(pooled, ref_sw[level][0], 2, 2, output_size=ref_sw[level][1])
            assert torch.equal(a, b)


def test_one_byte_switches():
    """fastfcn's own pooling (one byte per window, relative to the window) through the skip."""
    model = Toy("deconvnet")

    def pool(h, k, s):
        return fastfcn.ops.max_pool2d_with_switches(h, k, s, True, impl="reference")

    fwd = DeadZoneForward(model, pool_with_switches=pool)
    x = padded_input(2, (64, 96), (20, 37), torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_sw, sw = {}, {}
        ref = run_steps(model, model.backbone, x, {}, ref_sw, pool)
        got = fwd(x, {}, sw, image_size=(20, 37))
    assert_float32_equal(got, ref)
    for level in ref_sw:
        assert sw[level][0].dtype == torch.uint8
        assert torch.equal(sw[level][0], ref_sw[level][0]), level


@pytest.mark.parametrize("size", [(500, 375), (1080, 1920)])
def test_meta_device_large_sizes(size):
    model = meta_fcn()
    fwd = DeadZoneForward(model)
    x = torch.empty(2, 3, *size, device="meta")
    ref_feats, feats = {}, {}
    ref = run_steps(model, model.backbone, x, ref_feats)
    got = fwd(x, feats)
    assert got.shape == ref.shape
    assert {k: v.shape for k, v in feats.items()} == {k: ref_feats[k].shape for k in ("pool3", "pool4")}


def test_cache_memory_per_entry():
    """The numbers DeadZoneCache documents (FCN-8s width 1, fp32; sizes are exact on meta)."""
    model = meta_fcn()
    for size, mib in [((500, 500), 13.98), ((224, 224), 7.13), ((1080, 1920), 37.68)]:
        fwd = DeadZoneForward(model)
        fwd(torch.empty(1, 3, *size, device="meta"), {})
        assert fwd.cache.nbytes / 2**20 == pytest.approx(mib, abs=0.01)
        full_maps = sum(4 * c * h * w for c, h, w in [(256, 88, 88), (512, 44, 44), (512, 22, 22)])
        if size == (500, 500):  # far less than the whole pool3 / pool4 / pool5 maps it replaces
            assert fwd.cache.nbytes < 1.2 * full_maps


def test_lru_bounds():
    model = fcn()
    cache = DeadZoneCache(maxsize=2)
    fwd = DeadZoneForward(model, cache=cache)
    with torch.no_grad():
        for size in [(5, 5), (6, 6), (7, 7)]:
            fwd(torch.randn(1, 3, *size), {})
    assert len(cache) == 2
    assert [k[0] for k in cache._entries] == [(6, 6), (7, 7)]
    one = cache._entries[next(reversed(cache._entries))].nbytes
    assert cache.nbytes > one > 0
    small = DeadZoneCache(max_bytes=one)
    fwd = DeadZoneForward(model, cache=small)
    with torch.no_grad():
        for size in [(5, 5), (7, 7)]:
            fwd(torch.randn(1, 3, *size), {})
    assert len(small) == 1
    with pytest.raises(ValueError, match="maxsize"):
        DeadZoneCache(maxsize=0)


def test_concurrent_callers_share_one_build():
    model = fcn()
    fwd = DeadZoneForward(model)
    builds = []
    build = fwd._build
    fwd._build = lambda *a: builds.append(1) or build(*a)
    xs = [torch.randn(1, 3, 9, 11) * 50 for _ in range(4)]
    out = [None] * 4

    def work(i):
        with torch.no_grad():
            out[i] = fwd(xs[i], {})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    with torch.no_grad():
        for x, got in zip(xs, out):
            assert_float32_equal(got, run_steps(model, model.backbone, x, {}))


def test_new_weights_and_conv_impls_rebuild_the_cache():
    model = fcn(seed=0)
    fwd = DeadZoneForward(model)
    x = torch.randn(2, 3, 7, 13) * 50
    with torch.no_grad():
        fwd(x, {})
        model.load_state_dict(fcn(seed=1).state_dict())  # in place: same tensors, new values
        assert_float32_equal(fwd(x, {}), run_steps(model, model.backbone, x, {}))
        calls = []
        conv = model.conv2_1

        def impl(h, padding):
            calls.append((tuple(h.shape[-2:]), tuple(padding)))
            return F.relu(F.conv2d(h, conv.weight, conv.bias, 1, padding))

        model.set_conv_impl("conv2_1", impl)
        assert_float32_equal(fwd(x, {}), run_steps(model, model.backbone, x, {}))
    assert len(fwd.cache) == 3
    # The impl ran on conv2_1's window, pool1's dependent 6 x 9 of 103 x 106 with a 2 px ring and
    # no padding (-> conv2_1's dependent 8 x 11), and once on the whole map to fill the cache.
    assert ((10, 13), (0, 0)) in calls and ((103, 106), (1, 1)) in calls


def test_switch_off(monkeypatch):
    model = fcn()
    x = torch.randn(1, 3, 7, 13)
    with torch.no_grad():
        off = DeadZoneForward(model, enabled=False)
        off(x, {})
        assert len(off.cache) == 0
        monkeypatch.setattr(deadzone, "ENABLED", False)
        follows = DeadZoneForward(model)
        assert_float32_equal(follows(x, {}), run_steps(model, model.backbone, x, {}))
        assert len(follows.cache) == 0
        forced = DeadZoneForward(model, enabled=True)
        forced(x, {})
        assert len(forced.cache) == 1


def test_bad_input():
    model = fcn()
    with pytest.raises(ValueError, match="top-left part"):
        DeadZonePlan(model, model.backbone, (10, 10), (11, 3))
    with pytest.raises(ValueError, match="switches"):
        DeadZoneForward(Toy("deconvnet"))(torch.zeros(1, 3, 32, 32), {})
    with pytest.raises(ValueError, match="not taps"):
        DeadZoneForward(model, taps=["score"])
    with pytest.raises(ValueError, match="too small"):
        DeadZonePlan(Toy("dilated"), [Conv("conv4")], (2, 2))  # 3x3, no padding
    with pytest.raises(ValueError, match="4-d"):
        DeadZoneForward(model)(torch.zeros(3, 7, 13), {})


def test_new_batchnorm_statistics_rebuild_the_cache():
    model = Toy("deconvnet")
    fwd = DeadZoneForward(model)
    x = padded_input(2, (32, 64), (20, 37), torch.Generator().manual_seed(5))
    with torch.no_grad():
        fwd(x, {}, {}, image_size=(20, 37))
        model.bn2_1.running_mean.add_(0.5)  # only a buffer changes
        ref = run_steps(model, model.backbone, x, {}, {})
        assert_float32_equal(fwd(x, {}, {}, image_size=(20, 37)), ref)
    assert len(fwd.cache) == 2


def test_channels_last_and_autocast_have_their_own_entries():
    model = fcn().to(memory_format=torch.channels_last)
    fwd = DeadZoneForward(model)
    x = (torch.randn(2, 3, 37, 50) * 50).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, ref = fwd(x, {}), run_steps(model, model.backbone, x, {})
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_float32_equal(got, ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, ref = fwd(x, {}), run_steps(model, model.backbone, x, {})
        assert got.dtype == ref.dtype == torch.bfloat16
        # bf16 rounding of both is alike; bound it by 2 bf16 ulps of the largest value.
        assert (got.float() - ref.float()).abs().max() <= 2 * 2**-8 * ref.float().abs().max()
    assert len(fwd.cache) == 2


def test_a_failed_build_leaves_the_cache_usable():
    cache = DeadZoneCache()

    def broken():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.get("k", broken)
    assert len(cache) == 0 and not cache._building
    entry = deadzone._Entry([[]], [None], [None])
    assert cache.get("k", lambda: entry) is entry
    assert cache.get("k", broken) is entry  # a hit builds nothing


# -- conv + pool as one call (an impl's conv_pool) ------------------------------------------------


class Float64Conv:
    """A ConvImpl built from torch's conv2d (+ BatchNorm) + ReLU for ``step`` of ``model``,
    recording its calls in ``calls``. It computes in float64 and rounds once to the input's
    dtype, so another blocking on another window cannot change a float32 value: results compare
    bitwise."""

    def __init__(self, model, step, calls):
        self.step, self.calls = step, calls
        self.conv = getattr(model, step.name)
        self.bn = getattr(model, step.bn) if step.bn is not None else None

    def conv64(self, x, padding):
        c = self.conv
        y = F.conv2d(x.double(), c.weight.double(), c.bias.double(), c.stride, padding, c.dilation, c.groups)
        if self.bn is not None:
            b = self.bn
            y = F.batch_norm(y, b.running_mean.double(), b.running_var.double(), b.weight.double(),
                             b.bias.double(), False, 0.0, b.eps)  # fmt: skip
        return F.relu(y) if self.step.relu else y

    def __call__(self, x, padding):
        self.calls.append(("conv", self.step.name, tuple(x.shape[-2:])))
        return self.conv64(x, padding).to(x.dtype)


class Float64ConvPool(Float64Conv):
    def conv_pool(self, x, padding, kernel, stride):
        self.calls.append(("conv_pool", self.step.name, (kernel, stride)))
        return F.max_pool2d(self.conv64(x, padding), kernel, stride, ceil_mode=True).to(x.dtype)


def with_impls(model, cls, calls):
    for step in model.backbone:
        if isinstance(step, Conv):
            model.set_conv_impl(step.name, cls(model, step, calls))
    return model


def dead_zone_runs(model, x, image=None, switches=False):
    """(run_steps's output, taps, switches; the dead-zone forward's, second call: from the
    cache; the impls' calls in that second call)."""
    calls = model._conv_impls[next(iter(model._conv_impls))].calls
    fwd = DeadZoneForward(model)
    ref_feats, feats, ref_sw, sw = {}, {}, ({} if switches else None), ({} if switches else None)
    with torch.no_grad():
        ref = run_steps(model, model.backbone, x, ref_feats, ref_sw)
        fwd(x, {}, {} if switches else None, image_size=image)  # builds the cache entry
        calls.clear()
        got = fwd(x, feats, sw, image_size=image)
    return (ref, ref_feats, ref_sw), (got, feats, sw), list(calls), fwd


VGG_BLOCK_ENDS = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"]


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (31, 18), (64, 97)])
def test_conv_pool_runs_each_vgg_block_end_with_its_pool(size):
    """FCN-8s: each block's last conv and its 2x2/2 pool run as one conv_pool call on the window
    the plan aligned to the pool (odd sizes: ceil-mode windows cut short at the map's edge), and
    the result, the taps included, equals run_steps' and the dead-zone forward's without
    conv_pool bitwise (float32 rounded once from float64)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, *size, generator=g) * 50
    model = with_impls(fcn(), Float64ConvPool, [])
    (ref, ref_feats, _), (got, feats, _), calls, fwd = dead_zone_runs(model, x)
    assert torch.equal(got, ref)
    assert set(feats) == {"pool3", "pool4"}
    for tap in feats:
        assert torch.equal(feats[tap], ref_feats[tap]), tap
    assert [c[1:] for c in calls if c[0] == "conv_pool"] == [(name, (2, 2)) for name in VGG_BLOCK_ENDS]
    assert len([c for c in calls if c[0] == "conv"]) == 13 - 5
    plan = fwd.plan(size)
    names = {sp.step.name: k for k, sp in enumerate(plan.steps) if isinstance(sp.step, Conv)}
    assert plan.fused == {names[n] for n in VGG_BLOCK_ENDS}
    for k in plan.fused:  # the conv computes exactly the pool's window
        assert plan.steps[k].comp == plan.steps[k + 1].window
    plain = with_impls(fcn(), Float64Conv, [])  # the same weights (seed 0), no conv_pool
    (_, _, _), (got_plain, feats_plain, _), calls_plain, fwd_plain = dead_zone_runs(plain, x)
    assert not fwd_plain.plan(size).fused and all(c[0] == "conv" for c in calls_plain)
    assert torch.equal(got, got_plain)
    for tap in feats:
        assert torch.equal(feats[tap], feats_plain[tap]), tap


def test_conv_pool_grows_the_conv_to_the_pool_window():
    """Where a conv impl has conv_pool, the conv computes its pool's window whatever ``align``:
    FCN-8s 500x500's conv4_3 76 instead of 74 rows (align alone: 2% > 5.5%, no); the other
    convs as before; taps and the last step are still made whole."""
    model = meta_fcn()
    pools = deadzone.conv_pool_steps(model.backbone, model._conv_impls)
    assert pools == frozenset()  # torch's own convs: no conv_pool
    with_impls(model, Float64ConvPool, [])
    pools = deadzone.conv_pool_steps(model.backbone, model._conv_impls)
    assert sorted(model.backbone[k].name for k in pools) == VGG_BLOCK_ENDS
    base = DeadZonePlan(model, model.backbone, (500, 500), whole=[9, 13])
    plan = DeadZonePlan(model, model.backbone, (500, 500), whole=[9, 13], conv_pools=pools)
    assert base.fused == frozenset() and plan.fused == pools
    for a, b in zip(base.steps, plan.steps):
        name = getattr(a.step, "name", None)
        if name == "conv4_3":
            assert (a.rows.out_comp, b.rows.out_comp) == ((7, 81), (6, 82))
        else:
            assert a.comp == b.comp, a.step
    assert plan.whole == base.whole == {9, 13, len(plan.steps) - 1}
    assert _inside(plan.steps[13].window, plan.steps[13].avail)  # pool4 reads no ring now
    # align=0: no conv grows for align, each conv_pool conv still does
    zero = DeadZonePlan(model, model.backbone, (500, 500), whole=[9, 13], align=0, conv_pools=pools)
    assert zero.fused == pools
    assert all(zero.steps[k].comp == zero.steps[k + 1].window for k in pools)


@pytest.mark.parametrize("size", [(45, 61), (1, 1), (16, 9)])
def test_conv_pool_is_not_used_before_3x3_pools(size):
    """FCN-AlexNet pools 3x3/2: the pool epilogue is 2x2/2 only, so no pair fuses; every conv runs
    as a step on its window and the result equals run_steps bitwise."""
    torch.manual_seed(0)
    model = with_impls(fastfcn.models.build("fcn-alexnet", width=0.125).eval(), Float64ConvPool, [])
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(8)) * 50
    assert {(s.kernel, s.stride) for s in model.backbone if isinstance(s, Pool)} == {(3, 2)}
    (ref, ref_feats, _), (got, feats, _), calls, fwd = dead_zone_runs(model, x)
    assert torch.equal(got, ref)
    assert calls and all(c[0] == "conv" for c in calls)
    assert deadzone.conv_pool_steps(model.backbone, model._conv_impls) == frozenset()
    assert not fwd.plan(size).fused
    for tap in feats:
        assert torch.equal(feats[tap], ref_feats[tap]), tap


@pytest.mark.parametrize(
    "size, image", [((224, 224), (100, 150)), ((224, 256), (224, 256)), ((224, 224), (1, 1))]
)
def test_conv_pool_is_not_used_before_pools_with_switches(size, image):
    """DeconvNet's encoder pools keep switches (its unpooling levels): no pair fuses, the switches
    and the result equal run_steps' bitwise; 224x256 filled by the image has no dead zone."""
    torch.manual_seed(0)
    model = randomize_batchnorm(fastfcn.models.build("deconvnet", width=0.125).eval())
    with_impls(model, Float64ConvPool, [])
    x = padded_input(2, size, image, torch.Generator().manual_seed(9))
    (ref, _, ref_sw), (got, _, sw), calls, fwd = dead_zone_runs(model, x, image, switches=True)
    assert torch.equal(got, ref)
    assert calls and all(c[0] == "conv" for c in calls)
    assert not fwd.plan(size, image).fused
    assert set(sw) == set(ref_sw) and len(sw) == 5
    for level in ref_sw:
        assert sw[level][1] == ref_sw[level][1] and torch.equal(sw[level][0], ref_sw[level][0]), level
    if image == size:  # no dead zone: every step computes all of its outputs
        assert all(sp.full for sp in fwd.plan(size, image).steps)


@pytest.mark.parametrize(
    "dtype,c",
    [(torch.bfloat16, 64), (torch.float32, 6), (torch.float16, 3), (torch.uint8, 16), (torch.float32, 1)],
)
def test_paste_equals_copy_bit_for_bit(dtype, c):
    """deadzone._paste (channels as 8- or 4-byte words where both sides are channels_last) is
    copy_: into a window of a larger map, from a window and from a (1, C, h, w) ring broadcast
    over the batch; NaN payloads and -0.0 kept; NCHW and odd channel counts take copy_ itself."""
    from fastfcn.runtime.deadzone import _paste

    g = torch.Generator().manual_seed(c)
    big = (
        (torch.randn(3, c, 12, 13, generator=g) * 100).to(dtype).contiguous(memory_format=torch.channels_last)
    )
    if dtype.is_floating_point:
        flat = big.permute(0, 2, 3, 1).view(-1)  # channels_last memory, flat
        flat[::7] = float("nan")
        flat[1::11] = -0.0
    src = big[:, :, 2:9, 3:11]
    ring = big[:1, :, 0:7, 0:8]
    for fmt in (torch.channels_last, torch.contiguous_format):
        for s in (src, ring, src.contiguous()):
            a = torch.zeros(3, c, 10, 12, dtype=dtype).contiguous(memory_format=fmt)
            b = a.clone()
            _paste(a[:, :, 1:8, 2:10], s)
            b[:, :, 1:8, 2:10].copy_(s)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
            assert torch.equal(a.view(bits), b.view(bits))


def test_dense_window_only_on_cuda():
    """deadzone._dense: a channels_last window is made contiguous (channels_last) by _paste on
    CUDA, where the convolution would copy it element by element; on the CPU it is the view."""
    from fastfcn.runtime.deadzone import _dense, _memory_format

    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    win = x[:, :, 1:7, 2:8]
    assert _memory_format(win) == torch.channels_last
    assert _memory_format(x[:, :1, 1:7, 2:8]) == torch.contiguous_format
    assert _dense(win) is win
    if torch.cuda.is_available():
        d = _dense(win.cuda())
        assert d.is_contiguous(memory_format=torch.channels_last) and torch.equal(d.cpu(), win)
