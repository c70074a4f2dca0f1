"""The C++ twins (fastfcn.kernels.cpu) against the plain-PyTorch spec (kernels.reference).

Tolerances. fp32 results are compared with a per-pixel bound instead of a fixed
rtol: the C++ kernels and torch's conv_transpose2d sum the same K products in a
different order, and two orders of a K-term fp32 sum differ by at most
2 * K * eps * sum|terms| (Higham, recursive summation bound). sum|terms| per
pixel is exactly the reference evaluated on |x|, |w| and |skip|; K counts the
products per output (C_in * ceil(k/s)^2, plus the skip term, plus one per
multiplication rounding). The bound is tight enough that an off-by-one tap, a
wrong offset or a dropped skip fails by orders of magnitude.
fp16/bf16: the kernels compute in fp32 and round once at the end, so the result
is within half an ulp of the dtype of the fp32 reference on the same
(low-precision) inputs, plus the fp32 bound.
Labels must equal the reference argmax except where the reference's top two
classes are within the fp32 bound of each other (a tie at rounding level).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastfcn.kernels import cpu
from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as st

pytestmark = pytest.mark.skipif(
    not cpu.available(),
    reason="fastfcn.kernels.cpu._ext is not built (no C++ compiler at install time); "
    "reinstall with `pip install -e .` on a machine with g++/clang++",
)

EPS = torch.finfo(torch.float32).eps
SIZES = [(1, 1), (2, 3), (7, 13), (37, 53), (127, 129), (500, 375)]
# (kernel, stride, offset) of every FCN upsampling stage: FCN-16s/8s upscore2 and
# upscore_pool4 (offsets 5, 9), FCN-8s upscore8 (31), FCN-16s upscore16 (27),
# FCN-32s upscore (19), FCN-AlexNet (63/32, 18), the dilated net's x8 (16/8, pad 4).
VARIANTS = [(4, 2, 5), (4, 2, 9), (16, 8, 31), (32, 16, 27), (64, 32, 19), (63, 32, 18), (16, 8, 4)]
KINDS = ("bilinear", "depthwise", "dense")


def make_weight(c: int, k: int, kind: str, grouped: bool = False) -> torch.Tensor:
    """A (C, C, k, k) weight (or (C, 1, k, k) when grouped) of the requested structure."""
    if kind == "bilinear":
        return st.bilinear_weight(c, k, depthwise=grouped)
    filt = torch.randn(c, k, k)
    if kind == "depthwise":
        if grouped:
            return filt.unsqueeze(1)
        w = torch.zeros(c, c, k, k)
        w[torch.arange(c), torch.arange(c)] = filt
        return w
    return torch.randn(c, c, k, k) / math.sqrt(c)


def in_size(out: int, k: int, s: int, offset: int, extra: int = 0) -> int:
    """Smallest input length whose transposed conv covers offset + out, plus extra."""
    return max(1, -(-(offset + out - k) // s) + 1) + extra


def taps(k: int, s: int, c: int, kind: str) -> int:
    return (c if kind == "dense" else 1) * (-(-k // s)) ** 2


def bound(absref: torch.Tensor, k_terms: int) -> torch.Tensor:
    """Largest allowed |ours - ref| per element (see the module docstring)."""
    return 2 * (k_terms + 3) * EPS * absref.float() + 1e-30


def assert_close_bound(ours, want, absref, k_terms, what=""):
    assert ours.shape == want.shape and ours.dtype == want.dtype, (ours.shape, want.shape, ours.dtype)
    err = (ours.float() - want.float()).abs()
    lim = bound(absref, k_terms)
    bad = err > lim
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} elements off, worst {float((err - lim).max()):.3g} over the bound"
    )


def assert_labels(labels, logits_ref, lim, what=""):
    """labels == argmax(logits_ref) except where the top two are within lim of each other."""
    c = logits_ref.shape[1]
    assert labels.dtype == (torch.uint8 if c <= 256 else torch.int32), labels.dtype
    want = logits_ref.argmax(1)
    diff = labels.long() != want
    if bool(diff.any()):
        top = logits_ref.gather(1, want.unsqueeze(1)).squeeze(1)
        got = logits_ref.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        gap = (top - got)[diff]
        tol = lim.amax(1)[diff]
        assert bool((gap <= 2 * tol).all()), f"{what}: {int(diff.sum())} labels differ beyond ties"


def assert_probs(probs, logits_ref, lim, what=""):
    want = torch.softmax(logits_ref.float(), 1)
    c = logits_ref.shape[1]
    # relative error of a softmax: twice the logits' error plus exp/sum rounding
    tol = want * (2 * lim.amax(1, keepdim=True) + (c + 8) * EPS) + 1e-30
    err = (probs.float() - want).abs()
    assert bool((err <= tol).all()), f"{what}: probs off by {float((err - tol).max()):.3g} over the bound"


def absolute_args(x, w, skip=None):
    return x.abs(), w.abs(), None if skip is None else skip.abs()


# ----------------------------------------------------------------- upsample_crop


# every size x variant x kind, except that the largest size runs the non-bilinear
# kinds for FCN-8s' final stage only (keeps the file under a minute on 2 cores)
CROP_CASES = [
    (size, v, kind)
    for size in SIZES
    for v in VARIANTS
    for kind in KINDS
    if size != SIZES[-1] or kind == "bilinear" or v == (16, 8, 31)
]


@pytest.mark.parametrize("size,variant,kind", CROP_CASES)
def test_upsample_crop_sizes(size, variant, kind):
    k, s, off = variant
    big = size[0] * size[1] > 10_000
    n, c = (1, 2) if big else (3, 3)
    h, w = in_size(size[0], k, s, off, 1), in_size(size[1], k, s, off)
    x = torch.randn(n, c, h, w)
    wt = make_weight(c, k, kind)
    got = cpu.upsample_crop(x, wt, s, off, size, "logits", kind)
    want = ref.upsample_crop(x, wt, s, off, size)
    absref = ref.upsample_crop(*absolute_args(x, wt)[:2], s, off, size)
    assert_close_bound(got, want, absref, taps(k, s, c, kind), f"{kind} {k}/{s}@{off} {size}")


@pytest.mark.parametrize(
    "c,kind,k,s,off,size",
    [
        (1, "bilinear", 16, 8, 31, (37, 53)),
        (2, "depthwise", 64, 32, 19, (37, 53)),
        (21, "bilinear", 16, 8, 31, (127, 129)),
        (21, "dense", 16, 8, 31, (37, 53)),
        (21, "depthwise", 63, 32, 18, (37, 53)),
        (60, "bilinear", 32, 16, 27, (37, 53)),
        (60, "dense", 4, 2, 9, (7, 13)),
        (300, "bilinear", 16, 8, 4, (7, 13)),  # > 256 classes: int32 labels
        (300, "dense", 4, 2, 5, (7, 13)),
    ],
)
def test_upsample_crop_outputs(c, kind, k, s, off, size):
    n = 3 if c <= 21 else 1
    x = torch.randn(n, c, in_size(size[0], k, s, off, 2), in_size(size[1], k, s, off, 1))
    wt = make_weight(c, k, kind, grouped=c >= 60 and kind != "dense")  # keeps the reference cheap
    logits = ref.upsample_crop(x, wt, s, off, size)
    absref = ref.upsample_crop(x.abs(), wt.abs(), s, off, size)
    lim = bound(absref, taps(k, s, c, kind))
    what = f"C={c} {kind} {k}/{s}@{off}"
    got = cpu.upsample_crop(x, wt, s, off, size, "logits", kind)
    assert_close_bound(got, logits, absref, taps(k, s, c, kind), what)
    labels = cpu.upsample_crop(x, wt, s, off, size, "labels", kind)
    assert labels.shape == (n, *size)
    assert_labels(labels, logits, lim, what)
    probs = cpu.upsample_crop(x, wt, s, off, size, "probs", kind)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    assert_probs(probs, logits, lim, what)


def test_grouped_weight_layout():
    """A grouped (C, 1, k, k) weight, the dilated net's deconv, is read like its (C, C, k, k) twin."""
    x = torch.randn(2, 5, 9, 8)
    for kind in ("bilinear", "depthwise"):
        g = make_weight(5, 16, kind, grouped=True)
        got = cpu.upsample_crop(x, g, 8, 4, (60, 50), "logits", kind)
        want = ref.upsample_crop(x, g, 8, 4, (60, 50))
        assert_close_bound(got, want, ref.upsample_crop(x.abs(), g.abs(), 8, 4, (60, 50)), 4, kind)


def test_labels_ties_go_to_lowest_index():
    """Classes 1 and 3 are bit-identical maps: wherever they win, the label must be 1, like torch.argmax."""
    x = torch.randn(2, 5, 12, 11)
    x[:, 3] = x[:, 1]
    x[:, 1] += 1.0  # make the tied pair win often
    x[:, 3] = x[:, 1]
    wt = make_weight(5, 16, "bilinear")
    got = cpu.upsample_crop(x, wt, 8, 31, (50, 40), "labels", "bilinear")
    want = ref.upsample_crop(x, wt, 8, 31, (50, 40), "labels")
    assert bool((got == 1).any()) and not bool((got == 3).any())
    assert torch.equal(got, want)


def test_labels_nan_wins_like_argmax():
    """A NaN score wins its pixels and the first NaN class is kept, as torch.argmax.

    The weight is the grouped (C, 1, k, k) form: with a full (C, C, k, k) weight the
    reference's dense product multiplies the NaN by the off-diagonal zeros and
    spreads it to every class, which the diagonal kernels (rightly) never compute.
    """
    x = torch.randn(1, 4, 6, 6)
    x[0, 2, 3, 3] = float("nan")
    x[0, 3, 3, 3] = float("nan")
    wt = make_weight(4, 4, "bilinear", grouped=True)
    got = cpu.upsample_crop(x, wt, 2, 1, (9, 9), "labels", "bilinear")
    want = ref.upsample_crop(x, wt, 2, 1, (9, 9), "labels")
    assert bool((want == 2).any())
    assert torch.equal(got, want)


# ------------------------------------------------------------------ upsample_add


@pytest.mark.parametrize("scale", [1.0, 0.01, 0.0001])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("c,n,off,hw", [(1, 3, 5, (1, 1)), (21, 1, 9, (7, 13)), (60, 2, 5, (9, 8))])
def test_upsample_add(c, n, off, hw, kind, scale):
    k, s = 4, 2
    x = torch.randn(n, c, *hw)
    ho, wo = (hw[0] - 1) * s + k, (hw[1] - 1) * s + k
    skip = torch.randn(n, c, off + ho + 3, off + wo + 1) * 50  # pool scores are large before scaling
    wt = make_weight(c, k, kind)
    got = cpu.upsample_add(x, wt, s, skip, off, scale, kind)
    want = ref.upsample_add(x, wt, s, skip, off, scale)
    absref = ref.upsample_add(x.abs(), wt.abs(), s, skip.abs(), off, scale)
    assert_close_bound(got, want, absref, taps(k, s, c, kind) + 1, f"C={c} {kind} scale={scale}")


@pytest.mark.parametrize("kind", KINDS)
def test_upsample_add_without_skip(kind):
    x = torch.randn(3, 4, 5, 7)
    wt = make_weight(4, 16, kind)
    got = cpu.upsample_add(x, wt, 8, None, 0, 1.0, kind)
    want = ref.upsample_add(x, wt, 8)
    assert_close_bound(got, want, ref.upsample_add(x.abs(), wt.abs(), 8), taps(16, 8, 4, kind))


# ---------------------------------------------------------------------- fcn_head


def head_geometry(arch: str):
    """(ks, strides, offsets, scales, kinds) of the reference heads."""
    return {
        "fcn8s": ([4, 4, 16], [2, 2, 8], [5, 9, 31], [1.0, 1.0]),
        "fcn8s-atonce": ([4, 4, 16], [2, 2, 8], [5, 9, 31], [0.01, 0.0001]),
        "fcn16s": ([4, 32], [2, 16], [5, 27], [1.0]),
        "fcn32s": ([64], [32], [19], []),
        "alexnet": ([63], [32], [18], []),
        "dilated": ([16], [8], [4], []),
    }[arch]


def make_head(arch, size, n, c, kinds):
    ks, ss, offs, scales = head_geometry(arch)
    ns = len(scales)
    # coarsest score map large enough that the final crop fits
    h0 = [1, 1]
    for d in range(2):
        while True:
            hh = h0[d]
            for i in range(ns + 1):
                hh = (hh - 1) * ss[i] + ks[i] if i < ns else hh
            if (hh - 1) * ss[ns] + ks[ns] >= offs[ns] + size[d]:
                break
            h0[d] += 1
    score = torch.randn(n, c, *h0)
    skips, hw = [], list(h0)
    for i in range(ns):
        hw = [(v - 1) * ss[i] + ks[i] for v in hw]
        skips.append(torch.randn(n, c, offs[i] + hw[0] + 2, offs[i] + hw[1] + 1) * (1 / scales[i]))
    # many classes: the grouped form keeps the reference's conv_transpose2d cheap
    weights = [make_weight(c, k, kd, grouped=c >= 60 and kd != "dense") for k, kd in zip(ks, kinds)]
    return score, skips, weights, ss, offs, scales


@pytest.mark.parametrize(
    "arch,size,n,c,kinds",
    [
        ("fcn8s", (500, 375), 1, 2, ["bilinear"] * 3),
        ("fcn8s", (37, 53), 3, 21, ["bilinear"] * 3),
        ("fcn8s", (7, 13), 1, 21, ["dense", "dense", "bilinear"]),  # learned intermediate deconvs
        ("fcn8s", (2, 3), 3, 2, ["depthwise"] * 3),
        ("fcn8s", (1, 1), 1, 1, ["dense"] * 3),
        ("fcn8s-atonce", (127, 129), 1, 21, ["bilinear"] * 3),
        ("fcn8s-atonce", (7, 13), 3, 60, ["depthwise", "dense", "depthwise"]),
        ("fcn16s", (37, 53), 3, 60, ["bilinear", "bilinear"]),
        ("fcn16s", (7, 13), 1, 300, ["bilinear", "bilinear"]),
        ("fcn32s", (127, 129), 1, 21, ["bilinear"]),
        ("alexnet", (37, 53), 3, 21, ["bilinear"]),
        ("alexnet", (7, 13), 1, 2, ["dense"]),
        ("dilated", (127, 129), 1, 21, ["depthwise"]),
    ],
)
def test_fcn_head(arch, size, n, c, kinds):
    score, skips, weights, ss, offs, scales = make_head(arch, size, n, c, kinds)
    logits = ref.fcn_head(score, skips, weights, ss, offs, scales, size)
    absref = ref.fcn_head(
        score.abs(), [t.abs() for t in skips], [t.abs() for t in weights], ss, offs, scales, size
    )
    ks = [w.shape[-1] for w in weights]
    k_terms = sum(taps(k, s, c, kd) + 1 for k, s, kd in zip(ks, ss, kinds))
    lim = bound(absref, k_terms)
    what = f"{arch} {size} C={c} {kinds}"
    got = cpu.fcn_head(score, skips, weights, ss, offs, scales, size, "logits", kinds)
    assert_close_bound(got, logits, absref, k_terms, what)
    labels = cpu.fcn_head(score, skips, weights, ss, offs, scales, size, "labels", kinds)
    assert labels.shape == (n, *size)
    assert_labels(labels, logits, lim, what)
    probs = cpu.fcn_head(score, skips, weights, ss, offs, scales, size, "probs", kinds)
    assert_probs(probs, logits, lim, what)


# ------------------------------------------------------------------ low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(dtype, kind):
    c, k, s, off, size = 21, 16, 8, 31, (37, 53)
    x = torch.randn(3, c, in_size(size[0], k, s, off), in_size(size[1], k, s, off)).to(dtype)
    wt = make_weight(c, k, kind).to(dtype)  # a half-precision checkpoint
    x32, w32 = x.float(), wt.float()
    want = ref.upsample_crop(x32, w32, s, off, size)
    lim = bound(ref.upsample_crop(x32.abs(), w32.abs(), s, off, size), taps(k, s, c, kind))
    got = cpu.upsample_crop(x, wt, s, off, size, "logits", kind)
    assert got.dtype == dtype
    # computed in fp32, rounded once to the dtype: half an ulp of the result
    half_ulp = torch.finfo(dtype).eps / 2 * want.abs() + torch.finfo(dtype).tiny
    err = (got.float() - want).abs()
    assert bool((err <= half_ulp + lim).all()), float((err - half_ulp - lim).max())
    assert_labels(cpu.upsample_crop(x, wt, s, off, size, "labels", kind), want, lim, f"{dtype} labels")
    probs = cpu.upsample_crop(x, wt, s, off, size, "probs", kind)
    assert probs.dtype == dtype
    assert bool(((probs.float() - torch.softmax(want, 1)).abs() <= torch.finfo(dtype).eps + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_head(dtype):
    score, skips, weights, ss, offs, scales = make_head("fcn8s-atonce", (37, 53), 3, 21, ["bilinear"] * 3)
    score, skips = score.to(dtype), [t.to(dtype) for t in skips]
    got = cpu.fcn_head(score, skips, weights, ss, offs, scales, (37, 53), "logits", ["bilinear"] * 3)
    assert got.dtype == dtype
    s32 = [t.float() for t in skips]
    want = ref.fcn_head(score.float(), s32, weights, ss, offs, scales, (37, 53))
    absref = ref.fcn_head(score.float().abs(), [t.abs() for t in s32], weights, ss, offs, scales, (37, 53))
    lim = bound(absref, 3 * 5)
    err = (got.float() - want).abs()
    assert bool((err <= torch.finfo(dtype).eps / 2 * want.abs() + lim + 1e-30).all())
    labels = cpu.fcn_head(score, skips, weights, ss, offs, scales, (37, 53), "labels", ["bilinear"] * 3)
    assert_labels(labels, want, lim, f"{dtype} head labels")


# ------------------------------------------------------------- pooling / unpooling


def tied_input(n, c, h, w, dtype=torch.float32):
    """Small integers: many windows hold duplicate maxima."""
    return torch.randint(0, 3, (n, c, h, w)).to(dtype) - 1


POOLS = [(2, 2), (3, 3), (2, 3), (3, 2)]
CL = torch.channels_last


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize("kernel,stride", POOLS)
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 13), (37, 53), (127, 129)])
def test_max_pool2d_with_switches(size, kernel, stride, ceil_mode, layout):
    x = tied_input(3, 4, *size)
    x[0, 0].normal_()
    if x.numel() > 40:
        x.view(-1)[::37] = float("nan")  # NaN propagates as torch does
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    try:
        want_v, want_s = ref.max_pool2d_with_switches(x, kernel, stride, ceil_mode)
    except RuntimeError:  # torch refuses a window larger than the input
        with pytest.raises(ValueError):
            cpu.max_pool2d_with_switches(x, kernel, stride, ceil_mode)
        return
    got_v, got_s = cpu.max_pool2d_with_switches(x, kernel, stride, ceil_mode)
    assert got_s.dtype == torch.uint8
    if layout == "nhwc" and got_v.shape[-2] * got_v.shape[-1] > 1:  # the layout is kept
        assert not got_v.is_contiguous() and got_v.is_contiguous(memory_format=CL)
        assert got_s.is_contiguous(memory_format=CL)
    assert torch.equal(got_v.isnan(), want_v.isnan())
    assert torch.equal(got_v.nan_to_num(), want_v.nan_to_num())
    assert torch.equal(got_s, want_s)


def test_max_pool2d_low_precision_and_neg_inf():
    x = torch.full((1, 2, 5, 5), float("-inf"))
    x[0, 1] = torch.randn(5, 5)
    for dtype in (torch.float16, torch.bfloat16):
        xv = x.to(dtype)
        got_v, got_s = cpu.max_pool2d_with_switches(xv)
        want_v, want_s = ref.max_pool2d_with_switches(xv)
        assert got_v.dtype == dtype and torch.equal(got_v, want_v) and torch.equal(got_s, want_s)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 3), (2, 3)])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 13), (37, 53), (127, 129), (224, 224)])
def test_max_unpool2d_from_real_pool(size, kernel, stride, relu):
    if size[0] < kernel - 1 or (size == (1, 1) and kernel > 2):
        pytest.skip("torch has no window for this size")
    n, c = (1, 2) if size[0] > 100 else (3, 5)
    x = tied_input(n, c, *size)
    x[:, 0].normal_()
    values, idx = F.max_pool2d(x, kernel, stride, ceil_mode=True, return_indices=True)
    values = values * 1.5 - 0.25  # decoder features differ from the pooled ones
    want = F.max_unpool2d(torch.relu(values) if relu else values, idx, kernel, stride, output_size=size)
    got = cpu.max_unpool2d(values, idx, size, kernel, stride, relu)
    assert torch.equal(got, want)
    # the compact switches of the same pooling give the same map
    _, sw = ref.max_pool2d_with_switches(x, kernel, stride, True)
    assert torch.equal(cpu.max_unpool2d(values, sw, size, kernel, stride, relu), want)
    assert torch.equal(ref.max_unpool2d(values, sw, size, kernel, stride, relu), want)
    # channels last: switches from the NHWC pooling twin, the gather keeps the layout
    _, sw_cl = cpu.max_pool2d_with_switches(x.contiguous(memory_format=CL), kernel, stride, True)
    got_cl = cpu.max_unpool2d(values.contiguous(memory_format=CL), sw_cl, size, kernel, stride, relu)
    assert torch.equal(got_cl, want)
    assert got_cl.is_contiguous(memory_format=CL) or values.shape[-1] * values.shape[-2] == 1  # 1x1: NCHW


def test_max_unpool2d_nhwc_bad_switch_raises():
    x = torch.randn(1, 3, 5, 5).contiguous(memory_format=CL)
    sw = torch.zeros_like(x, dtype=torch.uint8)
    sw[0, 1, 2, 3] = 4  # >= k*k
    with pytest.raises(ValueError, match="do not point inside"):
        cpu.max_unpool2d(x, sw, (10, 10))
    sw[0, 1, 2, 3] = 0
    sw[0, 2, 4, 1] = 2  # dy = 1 on the last window row of a 9-row output
    with pytest.raises(ValueError, match="do not point inside"):
        cpu.max_unpool2d(x, sw, (9, 10))


def test_max_unpool2d_floor_mode_and_larger_output():
    x = torch.randn(2, 3, 9, 11)
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=False, return_indices=True)  # drops the last row/col
    got = cpu.max_unpool2d(values, idx, (9, 11))
    assert torch.equal(got, F.max_unpool2d(values, idx, 2, 2, output_size=(9, 11)))
    # switches can be unpooled into any size torch accepts (here one past the windows)
    values, sw = cpu.max_pool2d_with_switches(x[..., :8, :10], 2, 2, False)
    got = cpu.max_unpool2d(values, sw, (9, 11))
    assert torch.equal(got, ref.max_unpool2d(values, sw, (9, 11)))
    assert not bool(got[..., 8, :].any()) and not bool(got[..., 10].any())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_max_unpool2d_low_precision(dtype):
    x = torch.randn(2, 4, 15, 14).to(dtype)
    values, idx = F.max_pool2d(x.float(), 2, 2, ceil_mode=True, return_indices=True)
    values = values.to(dtype)
    got = cpu.max_unpool2d(values, idx, (15, 14), relu=True)
    assert got.dtype == dtype
    assert torch.equal(got, ref.max_unpool2d(values, idx, (15, 14), relu=True))


# -------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error():
    x = torch.randn(1, 3, 5, 5)
    w = make_weight(3, 4, "bilinear")
    cases = [
        lambda: cpu.upsample_crop(x, w, 2, 5, (5, 5), "logits", "nearest"),  # unknown kind
        lambda: cpu.upsample_crop(x, w, 2, 5, (5, 5), "scores", "bilinear"),  # unknown output
        lambda: cpu.upsample_crop(x, w, 2, 5, (20, 5), "logits", "bilinear"),  # crop does not fit
        lambda: cpu.upsample_crop(x, make_weight(4, 4, "dense"), 2, 0, (5, 5), "logits", "dense"),
        lambda: cpu.upsample_crop(x[0], w, 2, 0, (5, 5), "logits", "bilinear"),  # 3-D input
        lambda: cpu.upsample_crop(x.long(), w, 2, 0, (5, 5), "logits", "bilinear"),  # integer dtype
        lambda: cpu.upsample_crop(x, w, 0, 0, (5, 5), "logits", "bilinear"),  # stride 0
        lambda: cpu.upsample_crop(x, w, 2, -1, (5, 5), "logits", "bilinear"),  # negative offset
        lambda: cpu.upsample_add(x, w, 2, torch.randn(1, 3, 12, 12), 5, 1.0, "bilinear"),  # skip too small
        lambda: cpu.upsample_add(x, w, 2, torch.randn(1, 4, 40, 40), 5, 1.0, "bilinear"),  # skip channels
        lambda: cpu.fcn_head(x, [torch.randn(1, 3, 40, 40)], [w], [2], [5], [1.0], (5, 5), "labels"),
        lambda: cpu.max_pool2d_with_switches(x, 17, 17),  # switch does not fit a byte
        lambda: cpu.max_pool2d_with_switches(torch.randn(1, 1, 1, 1), 2, 2, False),  # no window
        lambda: cpu.max_unpool2d(x, torch.zeros(1, 3, 5, 5, dtype=torch.int32), (10, 10)),  # index dtype
        lambda: cpu.max_unpool2d(x, torch.zeros(1, 3, 5, 4, dtype=torch.int64), (10, 10)),  # index shape
        lambda: cpu.max_unpool2d(x, torch.zeros_like(x, dtype=torch.uint8), (10, 10), 3, 2),  # overlap
        lambda: cpu.max_unpool2d(x, torch.zeros_like(x, dtype=torch.uint8), (13, 10)),  # size out of range
        lambda: cpu.max_unpool2d(x, torch.zeros_like(x, dtype=torch.uint8) + 4, (10, 10)),  # switch >= k*k
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_unpool_rejects_indices_outside_their_window():
    """A scatter would silently accept these; the gather must refuse them rather than drop values."""
    x = torch.randn(1, 2, 8, 8)
    values, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    shuffled = idx.flatten(2)[:, :, torch.randperm(16)].view_as(idx)
    assert not torch.equal(shuffled, idx)
    with pytest.raises(ValueError, match="window"):
        cpu.max_unpool2d(values, shuffled, (8, 8))
    # indices of a 9-wide map read as an 8-wide one point into the wrong windows
    _, idx9 = F.max_pool2d(torch.randn(1, 2, 8, 9), 2, 2, return_indices=True)
    with pytest.raises(ValueError, match="window"):
        cpu.max_unpool2d(values, idx9[..., :4], (8, 8))
