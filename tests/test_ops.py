"""The one kernel test harness: every fused op, every implementation, against kernels.reference.

"triton" runs the Triton kernels (in the interpreter without a GPU), "cpu" the C++ twins,
"reference" the spec itself (a check of the harness). Each test is parametrized over IMPLS and
calls the op through fastfcn.ops, so the implementations share the cases and the tolerances.

Tolerances, one per dtype, for every implementation:
- float32: elementwise fp32_bound, 2 * (n + 3) * eps * sum|terms|. Two implementations sum the
  same n products in different orders, and two orders of an n-term fp32 sum differ by at most
  about n * eps * sum|terms| (Higham, recursive summation); the bilinear path takes its taps
  from the formula (one ulp from the rounded weight tensor); factor 2 for the reference's own
  rounding. sum|terms| per element is the reference run on absolute values in float64. An
  off-by-one tap, a wrong offset or a dropped skip fails it by orders of magnitude.
- float16 / bfloat16: lowp_bound, twice plain PyTorch's error at that dtype against the float64
  result, floored at half an ulp of the largest output (DESIGN convention: a multiple of what
  torch itself gets at the same dtype).
- labels: equal to the float64 reference's argmax except at near-ties (top two within twice
  the bound), and at most 1% of pixels; pooling and unpooling: exact (torch.equal).

Shapes are small on the CPU lane: the interpreter costs about 1 ms per tl op whatever the block
size (measured here: 0.2-0.6 s per upsample_crop call at 7x13, 1.5-3 s at 500x375), so the
Triton cases cover every geometry, kind and output rather than every combination, and the size
sweeps run the interpreter at one odd size only.
"""

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_twin_available

import fastfcn.ops as ops
from fastfcn.kernels import cpu
from fastfcn.kernels import reference as ref
from fastfcn.kernels import structure as st

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


NEEDS_TWIN = pytest.mark.skipif(not cpu_twin_available(), reason="fastfcn.kernels.cpu is not built here")
IMPLS = ["triton", pytest.param("cpu", marks=NEEDS_TWIN), "reference"]
KINDS = ("bilinear", "depthwise", "dense")


@pytest.fixture(autouse=True)
def _fp32_products_on_cuda():
    """fp32 means fp32 products here. torch lets cuDNN's convolutions use TF32 by default
    (torch.backends.cudnn.allow_tf32), which the reference mode's conv_transpose2d follows as
    torch itself does; a Segmenter fixes the switch per call (runtime/segmenter.py). The H200's
    first run of this file had 16 reference cases fail the fp32 bounds by TF32's rounding
    (max error 2.4e-3 where the bound allows ~1e-6; benchmarks/results/h200-2026-12-04.json)."""
    if not HAS_CUDA:
        yield
        return
    from fastfcn.runtime.segmenter import _tf32_switches

    before = _tf32_switches()[0]  # reads either of torch's two TF32 APIs
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def impl_params(cases, ids, interpret=lambda case: True, spec=lambda case: True):
    """(case, impl) for every case and implementation; Triton only where ``interpret(case)`` holds:
    in its interpreter (no GPU) a call costs 10-100x the C++ twin's, and on a GPU each new
    specialization compiles (benchmarks/gpu_first_contact.sh gives this file 40 s).
    impl="reference" runs where ``spec(case)`` holds: the grids that extend a base list leave it
    out, as the base cases already check it against float64 and it would only time torch twice."""
    out = []
    for case in cases:
        for impl in ("triton", "cpu", "reference"):
            if impl == "triton" and not interpret(case):
                continue
            if impl == "reference" and not spec(case):
                continue
            marks = [NEEDS_TWIN] if impl == "cpu" else []
            out.append(pytest.param(case, impl, id=f"{ids(case)}-{impl}", marks=marks))
    return out


def _dev(impl):
    return "cpu" if impl == "cpu" else DEV


# ------------------------------------------------------------------ helpers

EPS32 = torch.finfo(torch.float32).eps


def make_weight(kind, c, k, layout="full", seed=0):
    """An upsampling weight of the given structure: (C, C, k, k), or (C, 1, k, k) for layout 'dw'."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bilinear":
        w = st.bilinear_weight(c, k, depthwise=layout == "dw")
    elif kind == "depthwise":
        d = torch.randn(c, k, k, generator=g)
        if layout == "dw":
            w = d[:, None].clone()
        else:
            w = torch.zeros(c, c, k, k)
            w[torch.arange(c), torch.arange(c)] = d
    else:
        w = torch.randn(c, c, k, k, generator=g) / math.sqrt(c)
    assert st.weight_kind(w) == kind or (c == 1 and kind == "dense")
    return w


def _abs_inputs(*ts):
    return [None if t is None else t.detach().abs().double() for t in ts]


def _terms(kind, c, k, s):
    """Products summed per output element by one upsampling stage."""
    return (c if kind == "dense" else 1) * math.ceil(k / s) ** 2


def fp32_bound(magnitude, n_terms):
    """Elementwise bound on |ours - reference| in fp32.

    Both sides sum the same n products in fp32 in different orders; the classic bound on
    a float sum is gamma_n * sum|terms| with gamma_n ~ n * eps (Higham, ch. 4). The bilinear
    path takes its taps from the formula, which can differ from the rounded weight tensor
    by one ulp: two more eps, and one for each multiplication's rounding. Factor 2 for the
    reference's own rounding. magnitude is the same computation run on absolute values in
    float64, i.e. sum|terms| per element.
    """
    return 2 * (n_terms + 3) * EPS32 * magnitude.float() + 1e-30


def check_logits(out, want, bound):
    assert out.shape == want.shape and out.dtype == want.dtype
    err = (out.double() - want.double()).abs()
    bad = err > bound.double()
    assert not bad.any(), f"{int(bad.sum())} elements beyond the bound; max err {err.max():.3g}"


def check_labels(out, logits, bound):
    """Labels equal the reference argmax except where the top two are within the error bound."""
    c = logits.shape[1]
    assert out.dtype == (torch.uint8 if c <= 256 else torch.int32)
    assert out.shape == (logits.shape[0], *logits.shape[2:])
    want = logits.argmax(1)
    diff = out.long() != want
    if diff.any():
        top = logits.max(1).values
        got = logits.gather(1, out.long().clamp(0, c - 1)[:, None])[:, 0]
        slack = 2 * bound.max(1).values if bound.dim() == 4 else 2 * bound
        near = (top - got) <= slack
        assert near[diff].all(), f"{int((diff & ~near).sum())} labels differ beyond near-ties"
    # a kernel that ignored most classes would still pass the near-tie check on constant maps
    assert diff.float().mean() <= 0.01


def check_probs(out, logits, bound):
    assert out.shape == logits.shape and out.dtype == logits.dtype
    want = torch.softmax(logits.double(), 1)
    # softmax is 1-Lipschitz per logit in the max norm up to a factor 2
    tol = 2 * float(bound.max()) + 4 * torch.finfo(out.dtype).eps
    err = (out.double() - want).abs().max()
    assert err <= tol, f"probs off by {err:.3g} > {tol:.3g}"


def check_output(out, logits, bound, output):
    if output == "logits":
        check_logits(out, logits, bound)
    elif output == "labels":
        check_labels(out, logits, bound)
    else:
        check_probs(out, logits, bound)


def covering(size, k, s, offset):
    """The smallest input length whose transposed conv covers offset + size, plus one."""
    return max(1, math.ceil((offset + size - k) / s) + 1) + 1


# FCN geometries: (name, kernel, stride, final crop offset) of the last stage
FINAL = {
    "fcn32s": (64, 32, 19),
    "fcn16s": (32, 16, 27),
    "fcn8s": (16, 8, 31),
    "alexnet": (63, 32, 18),
    "dilated": (16, 8, 4),  # grouped deconvolution k16 s8 pad 4
    "up2": (4, 2, 0),
    "pool4": (4, 2, 5),  # FCN-16s/8s upscore2 with score_pool4's offset
    "pool3": (4, 2, 9),  # FCN-8s upscore_pool4 with score_pool3's offset
}

# (geometry, kind, layout, C, N, (H, W), output)
CROP_CASES = [
    # every geometry at a mid size, labels (what a user sees)
    ("fcn32s", "bilinear", "full", 21, 1, (37, 53), "labels"),
    ("fcn16s", "bilinear", "full", 21, 1, (37, 53), "labels"),
    ("fcn8s", "bilinear", "full", 21, 1, (37, 53), "labels"),
    ("alexnet", "bilinear", "full", 21, 1, (37, 53), "labels"),
    ("dilated", "bilinear", "dw", 21, 1, (37, 53), "labels"),
    ("dilated", "depthwise", "dw", 21, 3, (7, 13), "logits"),
    # every size, batch 3
    ("fcn8s", "bilinear", "full", 2, 3, (1, 1), "logits"),
    ("fcn8s", "bilinear", "full", 2, 3, (2, 3), "logits"),
    ("fcn8s", "bilinear", "full", 2, 3, (7, 13), "probs"),
    ("fcn8s", "bilinear", "full", 2, 3, (37, 53), "logits"),
    ("fcn8s", "bilinear", "full", 2, 1, (127, 129), "logits"),
    ("fcn8s", "bilinear", "full", 21, 1, (127, 129), "labels"),
    ("fcn32s", "depthwise", "full", 2, 1, (127, 129), "probs"),
    ("up2", "dense", "full", 2, 1, (127, 129), "logits"),
    # every kind and output
    ("fcn8s", "depthwise", "full", 21, 1, (7, 13), "logits"),
    ("fcn8s", "depthwise", "full", 21, 1, (7, 13), "labels"),
    ("fcn8s", "depthwise", "full", 21, 1, (7, 13), "probs"),
    ("fcn8s", "dense", "full", 21, 1, (7, 13), "logits"),
    ("fcn8s", "dense", "full", 5, 3, (7, 13), "labels"),
    ("up2", "dense", "full", 21, 1, (7, 13), "probs"),
    ("alexnet", "dense", "full", 2, 1, (37, 53), "labels"),
    ("fcn32s", "depthwise", "full", 2, 1, (1, 1), "labels"),
    # class counts: 1, 60, 300 (int32 labels, several class tiles)
    ("fcn8s", "bilinear", "full", 1, 3, (7, 13), "labels"),
    ("fcn8s", "bilinear", "full", 1, 1, (7, 13), "probs"),
    ("fcn8s", "depthwise", "full", 60, 1, (7, 13), "probs"),
    ("fcn8s", "dense", "full", 60, 1, (1, 1), "labels"),
    ("fcn8s", "bilinear", "dw", 300, 1, (7, 13), "labels"),
    ("up2", "depthwise", "dw", 300, 1, (2, 3), "logits"),
    ("fcn16s", "depthwise", "dw", 300, 1, (2, 3), "probs"),
]


def _crop_id(c):
    return f"{c[0]}-{c[1]}-{c[2]}-C{c[3]}-N{c[4]}-{c[5][0]}x{c[5][1]}" + "".join(f"-{o}" for o in c[6:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CROP_CASES, ids=_crop_id)
def test_upsample_crop(case, impl):
    geom, kind, layout, c, n, (H, W), output = case
    x, w, want, bound = _crop_expected(case[:6])
    k, s, off = FINAL[geom]
    dev = _dev(impl)
    out = ops.upsample_crop(x.to(dev), w.to(dev), s, off, (H, W), output, impl=impl).cpu()
    check_output(out, want, bound, output)


@pytest.mark.parametrize("kind,layout", [("bilinear", "full"), ("depthwise", "dw"), ("dense", "full")])
def test_cuda_launch_configs_in_interpreter(kind, layout, monkeypatch):
    """The CUDA launch configurations (one class per tile, a loop over classes) give the same
    results as the interpreter's wide tiles: every output, with a skip stage and 21 classes."""
    from fastfcn.kernels import upsample as up

    if HAS_CUDA:
        pytest.skip("on CUDA every test already runs the CUDA configurations")
    monkeypatch.setattr(up, "launch_config", lambda is_cuda, kind, output, c, hw: up.CUDA_LAUNCH[kind])
    case = ("fcn8s", kind, layout, 3, 2, (7, 13))
    x, w, want, bound = _crop_expected(case)
    k, s, off = FINAL["fcn8s"]
    for output in ("logits", "labels", "probs"):
        out = ops.upsample_crop(x, w, s, off, (7, 13), output, impl="triton")
        check_output(out, want, bound, output)
    xa, wa = torch.randn(2, 3, 3, 4), make_weight(kind, 3, 4, layout)
    skip = torch.randn(2, 3, 20, 22)
    got = ops.upsample_add(xa, wa, 2, skip, 5, 0.5, impl="triton")
    torch.testing.assert_close(got, ref.upsample_add(xa, wa, 2, skip, 5, 0.5), rtol=1e-5, atol=1e-5)


# the float64 expectation and its bound cost as much as a kernel run: computed once per case
@functools.lru_cache(maxsize=8)
def _crop_expected(case):
    geom, kind, layout, c, n, (H, W) = case
    k, s, off = FINAL[geom]
    w = make_weight(kind, c, k, layout)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, covering(H, k, s, off), covering(W, k, s, off) + 1, generator=g)
    want = ref.upsample_crop(x.double(), w.double(), s, off, (H, W))
    mag = ref.upsample_crop(*_abs_inputs(x, w), s, off, (H, W))
    return x, w, want.float(), fp32_bound(mag, _terms(kind, c, k, s))


# Every odd size x every FCN upsampling stage x every kind, logits; at 500x375 the non-bilinear
# kinds run FCN-8s' final stage only (the float64 reference of a dense 500x375 stage is slow).
SWEEP_SIZES = [(1, 1), (2, 3), (7, 13), (37, 53), (127, 129), (500, 375)]
SWEEP_GEOMS = ("pool4", "pool3", "fcn8s", "fcn16s", "fcn32s", "alexnet", "dilated")
SWEEP = [
    (size, geom, kind)
    for size in SWEEP_SIZES
    for geom in SWEEP_GEOMS
    for kind in KINDS
    if size != SWEEP_SIZES[-1] or kind == "bilinear" or geom == "fcn8s"
]


def _sweep_interpreted(case):
    # the interpreter runs the two stages CROP_CASES does not have, at one odd size
    return case[0] == (7, 13) and case[1] in ("pool4", "pool3")


@pytest.mark.parametrize("case,impl", impl_params(SWEEP, lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-{c[2]}",
                                                  interpret=_sweep_interpreted, spec=lambda c: False))
def test_upsample_crop_sweep(case, impl):
    (H, W), geom, kind = case
    n, c = (1, 2) if H * W > 10_000 else (3, 3)
    x, w, want, bound = _crop_expected((geom, kind, "full", c, n, (H, W)))
    k, s, off = FINAL[geom]
    dev = _dev(impl)
    out = ops.upsample_crop(x.to(dev), w.to(dev), s, off, (H, W), "logits", impl=impl).cpu()
    check_logits(out, want, bound)


# (geometry, kind, layout, C, N, (H, W)): every output of each; many classes use the grouped
# (C, 1, k, k) layout, which keeps the reference's conv_transpose2d cheap
OUTPUT_CASES = [
    ("fcn8s", "bilinear", "full", 1, 3, (37, 53)),
    ("fcn32s", "depthwise", "full", 2, 3, (37, 53)),
    ("fcn8s", "bilinear", "full", 21, 1, (127, 129)),
    ("fcn8s", "dense", "full", 21, 3, (37, 53)),
    ("alexnet", "depthwise", "full", 21, 3, (37, 53)),
    ("fcn16s", "bilinear", "dw", 60, 1, (37, 53)),
    ("pool3", "dense", "full", 60, 1, (7, 13)),
    ("dilated", "bilinear", "dw", 300, 1, (7, 13)),  # > 256 classes: int32 labels
    ("pool4", "dense", "full", 300, 1, (7, 13)),
]


def _outputs_interpreted(case):
    # CROP_CASES runs dense and 300 classes in the interpreter already; measured here, the
    # dense C=21 37x53 N=3 case alone costs 20 s interpreted
    return case[1] != "dense" and case[3] <= 60 and case[4] * case[5][0] * case[5][1] <= 2000


@pytest.mark.parametrize("case,impl", impl_params(OUTPUT_CASES, _crop_id, interpret=_outputs_interpreted,
                                                  spec=lambda c: False))
def test_upsample_crop_every_output(case, impl):
    x, w, want, bound = _crop_expected(case)
    k, s, off = FINAL[case[0]]
    dev = _dev(impl)
    for output in ("logits", "labels", "probs"):
        out = ops.upsample_crop(x.to(dev), w.to(dev), s, off, case[5], output, impl=impl).cpu()
        check_output(out, want, bound, output)


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_weight_reads_like_its_full_twin(impl):
    """A grouped (C, 1, k, k) weight, the dilated net's deconv, gives what its (C, C, k, k) twin gives."""
    x = torch.randn(2, 5, 9, 8, generator=torch.Generator().manual_seed(6))
    for kind in ("bilinear", "depthwise"):
        g = make_weight(kind, 5, 16, "dw")
        full = torch.zeros(5, 5, 16, 16)
        full[torch.arange(5), torch.arange(5)] = g[:, 0]
        want = ref.upsample_crop(x.double(), full.double(), 8, 4, (60, 50)).float()
        bound = fp32_bound(ref.upsample_crop(*_abs_inputs(x, full), 8, 4, (60, 50)), _terms(kind, 5, 16, 8))
        out = ops.upsample_crop(x.to(_dev(impl)), g.to(_dev(impl)), 8, 4, (60, 50), impl=impl).cpu()
        check_logits(out, want, bound)


@pytest.mark.parametrize("impl", IMPLS)
def test_labels_ties_go_to_lowest_index(impl):
    """Classes 1 and 3 are bit-identical maps: wherever they win, the label is 1, like torch.argmax.
    The reference runs on the CPU here: on CUDA it is cuDNN's transposed convolution, which does
    not promise bit-identical outputs for bit-identical input channels (on the H200 it labelled
    tied pixels 3, benchmarks/results/h200-2026-12-04-r2.json); the kernels promise it everywhere."""
    x = torch.randn(2, 5, 12, 11, generator=torch.Generator().manual_seed(7))
    x[:, 1] += 1.0  # make the tied pair win often
    x[:, 3] = x[:, 1]
    w = st.bilinear_weight(5, 16)
    dev = "cpu" if impl == "reference" else _dev(impl)
    got = ops.upsample_crop(x.to(dev), w.to(dev), 8, 31, (50, 40), "labels", impl=impl).cpu()
    assert bool((got == 1).any()) and not bool((got == 3).any())
    assert torch.equal(got, ref.upsample_crop(x, w, 8, 31, (50, 40), "labels"))


@pytest.mark.parametrize("impl", IMPLS)
def test_labels_nan_wins_like_argmax(impl):
    """A NaN score wins its pixels and the first NaN class is kept, as torch.argmax.

    The weight is the grouped (C, 1, k, k) form: with a full (C, C, k, k) weight the
    reference's dense product multiplies the NaN by the off-diagonal zeros and spreads it to
    every class, which the diagonal kernels (rightly) never compute.
    """
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    x[0, 2, 3, 3] = float("nan")
    x[0, 3, 3, 3] = float("nan")
    w = st.bilinear_weight(4, 4, depthwise=True)
    got = ops.upsample_crop(x.to(_dev(impl)), w.to(_dev(impl)), 2, 1, (9, 9), "labels", impl=impl).cpu()
    want = ref.upsample_crop(x, w, 2, 1, (9, 9), "labels")
    assert bool((want == 2).any())
    assert torch.equal(got, want)


# (kind, C, N, x size, kernel, stride, skip offset, scale)
ADD_CASES = [
    ("bilinear", 21, 1, (1, 1), 4, 2, 5, 1.0),  # FCN-8s upscore2 + score_pool4
    ("bilinear", 21, 3, (7, 13), 4, 2, 9, 1.0),  # upscore_pool4 + score_pool3
    ("bilinear", 2, 1, (37, 53), 4, 2, 5, 0.01),  # at-once pool4 scale
    ("bilinear", 2, 1, (37, 53), 4, 2, 9, 0.0001),  # at-once pool3 scale
    ("depthwise", 21, 1, (2, 3), 4, 2, 5, 1.0),
    ("depthwise", 60, 3, (7, 13), 4, 2, 9, 0.01),
    ("dense", 21, 1, (7, 13), 4, 2, 5, 1.0),
    ("dense", 60, 1, (2, 3), 4, 2, 9, 0.0001),
    ("dense", 1, 3, (37, 53), 4, 2, 0, 1.0),
    ("bilinear", 300, 1, (2, 3), 4, 2, 5, 1.0),  # a 300x300x4x4 weight: 14 MB
    ("bilinear", 2, 1, (63, 64), 4, 2, 5, 1.0),  # output 128x130
    ("depthwise", 2, 1, (3, 4), 32, 16, 0, 1.0),
    ("bilinear", 2, 1, (7, 13), 4, 2, None, 1.0),  # no skip
    ("bilinear", 4, 3, (5, 7), 16, 8, None, 1.0),
    ("depthwise", 4, 3, (5, 7), 16, 8, None, 1.0),
    ("dense", 4, 3, (5, 7), 16, 8, None, 1.0),
]
# every kind x the at-once scales x three class counts (FCN-8s' 4/2 stages)
ADD_GRID = [
    (kind, c, n, hw, 4, 2, off, scale)
    for c, n, off, hw in [(1, 3, 5, (1, 1)), (21, 1, 9, (7, 13)), (60, 2, 5, (9, 8))]
    for kind in KINDS
    for scale in (1.0, 0.01, 0.0001)
]


def _add_id(c):
    return f"{c[0]}-C{c[1]}-N{c[2]}-{c[3][0]}x{c[3][1]}-k{c[4]}s{c[5]}-off{c[6]}-scale{c[7]}"


@pytest.mark.parametrize(
    "case,impl",
    impl_params(ADD_CASES, _add_id)
    # ADD_CASES runs every kind and scale in the interpreter and the reference already
    + impl_params(ADD_GRID, _add_id, interpret=lambda c: False, spec=lambda c: False),
)
def test_upsample_add(case, impl):
    kind, c, n, (h, w_), k, s, off, scale = case
    x, w, skip, want, bound = _add_expected(case)
    dev = _dev(impl)
    out = ops.upsample_add(x.to(dev), w.to(dev), s, None if skip is None else skip.to(dev), off or 0, scale,
                           impl=impl).cpu()
    check_logits(out, want, bound)


@functools.lru_cache(maxsize=4)
def _add_expected(case):
    kind, c, n, (h, w_), k, s, off, scale = case
    w = make_weight(kind, c, k)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w_, generator=g)
    ho, wo = (h - 1) * s + k, (w_ - 1) * s + k
    skip = None if off is None else torch.randn(n, c, ho + off + 3, wo + off + 2, generator=g) * 50
    off = off or 0
    want = ref.upsample_add(x.double(), w.double(), s, None if skip is None else skip.double(), off, scale)
    mag = ref.upsample_add(*_abs_inputs(x, w), s, *_abs_inputs(skip), off, abs(scale))
    return x, w, skip, want.float(), fp32_bound(mag, _terms(kind, c, k, s) + 1)


# ------------------------------------------------------------------ whole heads


def _pool(size, k, s):
    return st.pool_out_size(size, k, s, True)


def head_case(arch, H, W, c, n, kinds=None, seed=3):
    """Score map, skips and stage lists with the reference nets' geometry for an H x W image."""
    g = torch.Generator().manual_seed(seed)

    def vgg(v):
        v = v + 198  # conv1_1 pad 100
        pools = []
        for _ in range(5):
            v = _pool(v, 2, 2)
            pools.append(v)
        return pools, pools[4] - 6  # fc6 7x7 pad 0

    if arch == "alexnet":
        def side(v):
            v = (v + 200 - 11) // 4 + 1
            for _ in range(3):
                v = _pool(v, 3, 2)
            return v - 5

        score_hw = (side(H), side(W))
        stages, skip_hw = [(63, 32, 18)], []
    elif arch == "dilated":
        score_hw = (math.ceil(H / 8), math.ceil(W / 8))
        stages, skip_hw = [(16, 8, 4)], []
    else:
        (ph, fh), (pw, fw) = vgg(H), vgg(W)
        score_hw = (fh, fw)
        if arch == "fcn32s":
            stages, skip_hw = [(64, 32, 19)], []
        elif arch == "fcn16s":
            stages, skip_hw = [(4, 2, 5), (32, 16, 27)], [(ph[3], pw[3])]
        else:
            stages, skip_hw = [(4, 2, 5), (4, 2, 9), (16, 8, 31)], [(ph[3], pw[3]), (ph[2], pw[2])]
    scales = [0.01, 0.0001][: len(skip_hw)] if arch == "fcn8s-atonce" else [1.0] * len(skip_hw)
    kinds = kinds or ["bilinear"] * len(stages)
    # over 256 classes the grouped layout keeps the weights small (a full 300x300x32x32 is 368 MB)
    layouts = ["dw" if arch == "dilated" or (c > 256 and kd != "dense") else "full" for kd in kinds]
    weights = [make_weight(kd, c, k, lay, seed=i)
               for i, (kd, lay, (k, _, _)) in enumerate(zip(kinds, layouts, stages))]
    score = torch.randn(n, c, *score_hw, generator=g)
    skips = [torch.randn(n, c, *hw, generator=g) * 30 for hw in skip_hw]
    return dict(score=score, skips=skips, weights=weights, strides=[s for _, s, _ in stages],
                offsets=[o for _, _, o in stages], scales=scales, size=(H, W)), kinds


def fp64_head(h):
    """The head's exact-enough result: the reference in float64."""
    skips, weights = [s.double() for s in h["skips"]], [w.double() for w in h["weights"]]
    return ref.fcn_head(h["score"].double(), skips, weights, h["strides"], h["offsets"], h["scales"],
                        h["size"])


def _head_terms(h, kinds):
    return sum(_terms(kd, h["score"].shape[1], w.shape[-1], s) + 1
               for kd, w, s in zip(kinds, h["weights"], h["strides"]))


# (arch, H, W, C, N, output, kinds)
HEAD_CASES = [
    ("fcn8s", 1, 1, 21, 1, "labels", None),
    ("fcn8s", 7, 13, 21, 3, "labels", None),
    ("fcn8s", 37, 53, 2, 1, "logits", None),
    ("fcn8s", 127, 129, 2, 1, "labels", None),
    ("fcn8s-atonce", 37, 53, 21, 1, "labels", None),
    ("fcn8s-atonce", 2, 3, 2, 1, "probs", None),
    ("fcn16s", 37, 53, 21, 1, "labels", None),
    ("fcn16s", 2, 3, 60, 1, "probs", None),
    ("fcn32s", 37, 53, 21, 1, "labels", None),
    ("fcn32s", 7, 13, 1, 3, "logits", None),
    ("alexnet", 37, 53, 21, 1, "labels", None),
    ("dilated", 37, 53, 21, 1, "labels", None),
    ("dilated", 7, 13, 2, 3, "probs", ["depthwise"]),
    # learned (non-bilinear) intermediate stages, as the paper's nets may have
    ("fcn8s", 7, 13, 21, 1, "labels", ["dense", "depthwise", "bilinear"]),
    ("fcn16s", 2, 3, 2, 3, "logits", ["dense", "dense"]),
    # every output of each ("all")
    ("fcn8s", 500, 375, 2, 1, "all", None),
    ("fcn8s", 2, 3, 2, 3, "all", ["depthwise"] * 3),
    ("fcn8s", 1, 1, 1, 1, "all", ["dense"] * 3),
    ("fcn8s-atonce", 127, 129, 21, 1, "all", None),
    ("fcn8s-atonce", 7, 13, 60, 3, "all", ["depthwise", "dense", "depthwise"]),
    ("fcn16s", 37, 53, 60, 3, "all", None),
    ("fcn16s", 7, 13, 300, 1, "all", None),
    ("fcn32s", 127, 129, 21, 1, "all", None),
    ("alexnet", 7, 13, 2, 1, "all", ["dense"]),
    ("dilated", 127, 129, 21, 1, "all", ["depthwise"]),
]


def _head_id(c):
    return f"{c[0]}-{c[1]}x{c[2]}-C{c[3]}-N{c[4]}-{c[5]}" + ("-" + "-".join(c[6]) if c[6] else "")


def _head_interpreted(case):
    # the single-output cases run every arch in the interpreter and the reference already; an
    # "all" case (three heads) costs 0.9-5 s interpreted
    return case[5] != "all"


@pytest.mark.parametrize("case,impl", impl_params(HEAD_CASES, _head_id, interpret=_head_interpreted,
                                                  spec=_head_interpreted))
def test_fcn_head(case, impl):
    arch, H, W, c, n, output, kinds = case
    h, want, bound = _head_expected(arch, H, W, c, n, None if kinds is None else tuple(kinds))
    dev = _dev(impl)
    args = (h["score"].to(dev), [s.to(dev) for s in h["skips"]], [w.to(dev) for w in h["weights"]],
            h["strides"], h["offsets"], h["scales"], h["size"])
    for out_kind in ("logits", "labels", "probs") if output == "all" else (output,):
        check_output(ops.fcn_head(*args, out_kind, impl=impl).cpu(), want, bound, out_kind)


@functools.lru_cache(maxsize=4)
def _head_expected(arch, H, W, c, n, kinds):
    h, kinds = head_case(arch, H, W, c, n, None if kinds is None else list(kinds))
    want = fp64_head(h)
    mag = ref.fcn_head(*_abs_inputs(h["score"]), _abs_inputs(*h["skips"]), _abs_inputs(*h["weights"]),
                       h["strides"], h["offsets"], h["scales"], h["size"])
    return h, want.float(), fp32_bound(mag, _head_terms(h, kinds))


# ------------------------------------------------------------------ low precision


def lowp_bound(torch_lowp, want, dtype):
    """Twice plain PyTorch's error at this dtype against the fp32-exact result, floored at half an
    ulp of the largest output (the rounding every low-precision output must take)."""
    torch_err = (torch_lowp.double() - want.double()).abs().max()
    floor = 0.5 * torch.finfo(dtype).eps * want.abs().max()
    return 2 * max(float(torch_err), float(floor))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["bilinear", "depthwise", "dense"])
def test_upsample_lowp(kind, dtype, impl):
    # dense costs C x more interpreted work per pixel: fewer classes keep the CPU lane fast
    c, k, s, off, (H, W) = 21 if kind != "dense" else 5, 16, 8, 31, (7, 13)
    w = make_weight(kind, c, k)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, c, covering(H, k, s, off), covering(W, k, s, off), generator=g).to(dtype)
    want = ref.upsample_crop(x.double(), w.double(), s, off, (H, W))
    bound = lowp_bound(ref.upsample_crop(x, w, s, off, (H, W)), want, dtype)
    dev = _dev(impl)
    xd, wd = x.to(dev), w.to(dev)
    logits = ops.upsample_crop(xd, wd, s, off, (H, W), "logits", impl=impl).cpu()
    assert logits.dtype == dtype
    err = float((logits.double() - want).abs().max())
    assert err <= bound, f"{dtype} logits off by {err:.3g}, bound {bound:.3g}"
    labels = ops.upsample_crop(xd, wd, s, off, (H, W), "labels", impl=impl).cpu()
    check_labels(labels, want.float(), torch.full_like(want.float(), bound))
    probs = ops.upsample_crop(xd, wd, s, off, (H, W), "probs", impl=impl).cpu()
    assert probs.dtype == dtype
    p_want = torch.softmax(want, 1)
    p_bound = 2 * float((ref.upsample_crop(x, w, s, off, (H, W), "probs").double() - p_want).abs().max())
    p_bound = max(p_bound, torch.finfo(dtype).eps)
    assert float((probs.double() - p_want).abs().max()) <= p_bound
    # upsample_add with a skip, at the same dtype
    skip = (torch.randn(1, c, 40, 40, generator=g) * 10).to(dtype)
    xa = x[:, :, :5, :6]
    w4 = make_weight(kind, c, 4)
    want_a = ref.upsample_add(xa.double(), w4.double(), 2, skip.double(), 5, 0.5)
    bound_a = lowp_bound(ref.upsample_add(xa, w4, 2, skip, 5, 0.5), want_a, dtype)
    out_a = ops.upsample_add(xa.to(dev), w4.to(dev), 2, skip.to(dev), 5, 0.5, impl=impl).cpu()
    assert out_a.dtype == dtype
    assert float((out_a.double() - want_a).abs().max()) <= bound_a


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fcn_head_lowp(dtype, impl):
    h, _ = head_case("fcn8s-atonce", 37, 53, 21, 1)  # the scaled skips too
    lo = dict(h, score=h["score"].to(dtype), skips=[s.to(dtype) for s in h["skips"]])
    want = fp64_head(lo)
    bound = lowp_bound(ref.fcn_head(**lo), want, dtype)
    dev = _dev(impl)
    args = (lo["score"].to(dev), [s.to(dev) for s in lo["skips"]], [w.to(dev) for w in h["weights"]],
            h["strides"], h["offsets"], h["scales"], h["size"])
    logits = ops.fcn_head(*args, "logits", impl=impl).cpu()
    assert logits.dtype == dtype
    assert float((logits.double() - want).abs().max()) <= bound
    labels = ops.fcn_head(*args, "labels", impl=impl).cpu()
    check_labels(labels, want.float(), torch.full_like(want.float(), bound))


# ------------------------------------------------------------------ pooling with switches, unpooling

POOL_SIZES = [(1, 1), (2, 3), (7, 13), (37, 53), (127, 129)]


def int_valued(n, c, H, W, dtype=torch.float32, seed=5):
    """Small integers: windows with duplicate maxima are common (first one must win)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (n, c, H, W), generator=g).to(dtype)


CL = torch.channels_last


# NHWC runs where an implementation has a kernel for it (the C++ twin) and on the reference;
# the interpreted Triton kernel reads NCHW only (the launcher makes the input contiguous)
IMPL_LAYOUTS = [("triton", "nchw")] + [pytest.param(i, lay, marks=[NEEDS_TWIN] if i == "cpu" else [])
                                       for i in ("cpu", "reference") for lay in ("nchw", "nhwc")]


@pytest.mark.parametrize("impl,layout", IMPL_LAYOUTS)
@pytest.mark.parametrize("size", POOL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 3), (2, 3), (3, 2)])
@pytest.mark.parametrize("ceil_mode", [True, False], ids=["ceil", "floor"])
def test_max_pool2d_with_switches(ceil_mode, kernel, stride, size, layout, impl):
    H, W = size
    if min(st.pool_out_size(v, kernel, stride, ceil_mode) for v in (H, W)) < 1:
        with pytest.raises(ValueError, match="too small"):  # torch has no window either
            tiny = torch.zeros(1, 1, H, W, device=_dev(impl))
            ops.max_pool2d_with_switches(tiny, kernel, stride, ceil_mode, impl=impl)
        return
    n, c = (3, 2) if H * W < 1000 else (1, 2)
    x = int_valued(n, c, H, W)  # small integers: the first of tied maxima must win
    x[0, 0] = torch.randn(H, W, generator=torch.Generator().manual_seed(9))
    if x.numel() > 40:
        x.view(-1)[::37] = float("nan")  # NaN propagates and takes the switch, as in torch
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    want_v, want_s = ref.max_pool2d_with_switches(x, kernel, stride, ceil_mode)
    v, s = ops.max_pool2d_with_switches(x.to(_dev(impl)), kernel, stride, ceil_mode, impl=impl)
    assert torch.equal(v.cpu().isnan(), want_v.isnan())
    assert torch.equal(v.cpu().nan_to_num(), want_v.nan_to_num())
    assert s.dtype == torch.uint8 and torch.equal(s.cpu(), want_s)
    if impl == "cpu" and layout == "nhwc" and v.shape[-2] * v.shape[-1] > 1:
        # the C++ twin has an NHWC kernel and keeps the layout (DeconvNet's channels_last encoder)
        assert v.is_contiguous(memory_format=CL) and s.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_max_pool2d_with_switches_lowp_and_specials(dtype, impl):
    x = torch.randn(2, 3, 9, 11).to(dtype)
    x[0, 0, 0, 0] = float("nan")  # torch propagates NaN and points the switch at it
    x[0, 1, :2, :2] = float("-inf")  # an all -inf window keeps its corner
    x[1, 2, 4, 4] = float("inf")
    want_v, want_s = ref.max_pool2d_with_switches(x, 2, 2, True)
    v, s = ops.max_pool2d_with_switches(x.to(_dev(impl)), 2, 2, True, impl=impl)
    assert torch.equal(v.cpu().isnan(), want_v.isnan())
    assert torch.equal(v.cpu().nan_to_num(), want_v.nan_to_num())
    assert torch.equal(s.cpu(), want_s)


# (H, W, kernel, stride, ceil_mode, C, N)
UNPOOL_CASES = [
    (1, 1, 2, 2, True, 2, 3),
    (2, 3, 2, 2, True, 2, 3),
    (7, 13, 2, 2, True, 21, 3),
    (8, 12, 2, 2, False, 2, 1),
    (37, 53, 2, 2, True, 3, 1),
    (127, 129, 2, 2, True, 2, 1),
    (7, 13, 3, 3, True, 2, 3),
    (10, 11, 2, 3, True, 2, 1),  # stride > kernel: pixels between windows stay zero
    (37, 53, 3, 3, True, 5, 3),
    (127, 129, 2, 3, True, 2, 1),
    (224, 224, 2, 2, True, 2, 1),  # DeconvNet's unpool1
    (224, 224, 3, 3, True, 2, 1),
]


def _unpool_id(c):
    return f"{c[0]}x{c[1]}-k{c[2]}s{c[3]}-ceil{int(c[4])}-C{c[5]}"


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("case,impl", impl_params(
    [(c, lay) for c in UNPOOL_CASES for lay in ("nchw", "nhwc")], lambda c: f"{_unpool_id(c[0])}-{c[1]}",
    interpret=lambda c: c[0][0] < 200 and c[1] == "nchw",  # see IMPL_LAYOUTS
))
def test_max_unpool2d(case, impl, relu):
    (H, W, k, s, ceil_mode, c, n), layout = case
    x = int_valued(n, c, H, W)
    values, idx = F.max_pool2d(x, k, s, ceil_mode=ceil_mode, return_indices=True)
    values = values - 1.5  # negative entries exercise the fused relu
    want = F.max_unpool2d(torch.relu(values) if relu else values, idx, k, s, output_size=(H, W))
    _, sw = ref.max_pool2d_with_switches(x, k, s, ceil_mode)
    if layout == "nhwc":  # switches from the C++ twin's NHWC pooling where it runs
        values = values.contiguous(memory_format=CL)
        if impl == "cpu":
            sw = ops.max_pool2d_with_switches(x.contiguous(memory_format=CL), k, s, ceil_mode, impl="cpu")[1]
    dev = _dev(impl)
    out = ops.max_unpool2d(values.to(dev), idx.to(dev), (H, W), k, s, relu=relu, impl=impl).cpu()
    assert torch.equal(out, want)
    # the same through one-byte switches
    out = ops.max_unpool2d(values.to(dev), sw.to(dev), (H, W), k, s, relu=relu, impl=impl).cpu()
    assert torch.equal(out, want)
    if impl == "cpu" and layout == "nhwc" and values.shape[-2] * values.shape[-1] > 1:
        assert out.is_contiguous(memory_format=CL)  # the C++ gather keeps the layout


@pytest.mark.parametrize("impl", IMPLS)
def test_max_unpool2d_floor_mode_and_larger_output(impl):
    dev = _dev(impl)
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(10))
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=False, return_indices=True)  # drops the last row/col
    got = ops.max_unpool2d(values.to(dev), idx.to(dev), (9, 11), impl=impl).cpu()
    assert torch.equal(got, F.max_unpool2d(values, idx, 2, 2, output_size=(9, 11)))
    # switches can be unpooled into any size torch accepts (here one past the windows)
    values, sw = ref.max_pool2d_with_switches(x[..., :8, :10], 2, 2, False)
    got = ops.max_unpool2d(values.to(dev), sw.to(dev), (9, 11), impl=impl).cpu()
    assert torch.equal(got, ref.max_unpool2d(values, sw, (9, 11)))
    assert not bool(got[..., 8, :].any()) and not bool(got[..., 10].any())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_max_unpool2d_lowp(dtype, impl):
    x = int_valued(2, 4, 15, 17, dtype)
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    want = F.max_unpool2d(values, idx, 2, 2, output_size=(15, 17))
    out = ops.max_unpool2d(values.to(_dev(impl)), idx.to(_dev(impl)), (15, 17), impl=impl).cpu()
    assert out.dtype == dtype and torch.equal(out, want)
    # DeconvNet's bf16 decoder: the unpooling with the following ReLU fused, through switches too
    values = values - 2.5  # int-valued, so exact in bf16/fp16; about half of them negative
    assert bool((values < 0).any()) and bool((values > 0).any())
    want = F.max_unpool2d(torch.relu(values), idx, 2, 2, output_size=(15, 17))
    _, sw = ref.max_pool2d_with_switches(x, 2, 2, True)
    for i in (idx, sw):
        out = ops.max_unpool2d(values.to(_dev(impl)), i.to(_dev(impl)), (15, 17), relu=True, impl=impl).cpu()
        assert out.dtype == dtype and torch.equal(out, want)


def test_pool_index_width_boundary(monkeypatch):
    """int32 flat indices up to 2**31 - 1 including the last program's overhang, int64 past it;
    the int64 path (forced on small shapes by lowering the limit) gives the same results."""
    from fastfcn.kernels import unpool

    assert not unpool.needs_int64(1024, 2**31 - 1024)
    assert unpool.needs_int64(1024, 2**31 - 1023)
    assert unpool.needs_int64(1024, 10, 2**31)  # the input's size counts as well
    x = int_valued(2, 3, 13, 14)
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    want = F.max_unpool2d(torch.relu(values - 1.5), idx, 2, 2, output_size=(13, 14))
    for limit in (unpool.INT32_LIMIT, 50):
        monkeypatch.setattr(unpool, "INT32_LIMIT", limit)
        assert unpool.needs_int64(unpool.launch_config(x.numel(), HAS_CUDA)[0], x.numel()) == (limit == 50)
        v, sw = ops.max_pool2d_with_switches(x.to(DEV), impl="triton")
        assert torch.equal(v.cpu(), values) and torch.equal(sw.cpu(), ref.max_pool2d_with_switches(x)[1])
        out = ops.max_unpool2d(v - 1.5, sw, (13, 14), relu=True, impl="triton")
        assert torch.equal(out.cpu(), want)


def test_upsample_plane_over_int32_refused():
    # a 46341 x 46341 crop: more pixels per plane than the kernel's int32 pixel math covers
    x = torch.randn(1, 1, 2, 2, device=DEV)
    w = st.bilinear_weight(1, 4).to(DEV)
    with pytest.raises(ValueError, match="over 2\\*\\*31"):
        ops.upsample_crop(x, w, 50000, 0, (46341, 46341), "labels", impl="triton")


@pytest.mark.parametrize("impl", ["triton", "cpu"])
def test_max_unpool2d_overlapping_falls_back(impl):
    if impl == "cpu" and not cpu_twin_available():
        pytest.skip("fastfcn.kernels.cpu is not built here")
    x = int_valued(1, 2, 9, 9)
    values, idx = F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    want = F.max_unpool2d(values, idx, 3, 2, output_size=(9, 9))
    with pytest.warns(RuntimeWarning, match="overlap"):
        out = ops.max_unpool2d(values.to(_dev(impl)), idx.to(_dev(impl)), (9, 9), 3, 2, impl=impl)
    assert torch.equal(out.cpu(), want)


def test_deconvnet_roundtrip_through_switches():
    """Pool with switches, then unpool: each window keeps exactly its maximum."""
    x = int_valued(1, 3, 13, 14)
    v, s = ops.max_pool2d_with_switches(x.to(DEV), impl="triton")
    out = ops.max_unpool2d(v, s, (13, 14), impl="triton").cpu()
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    assert torch.equal(out, F.max_unpool2d(values, idx, 2, 2, output_size=(13, 14)))
    assert int((out != 0).sum()) <= v.numel()


# ------------------------------------------------------------------ the C++ twins' own argument checks
# (fastfcn.kernels.cpu is also called directly, by the CPU backbone planner, so it validates
# what fastfcn.ops would have checked, and the switch values, which a GPU kernel cannot)


@NEEDS_TWIN
def test_cpu_twin_bad_inputs_raise_value_error():
    x = torch.randn(1, 3, 5, 5)
    w = st.bilinear_weight(3, 4)
    u8 = torch.zeros_like(x, dtype=torch.uint8)
    cases = [
        (lambda: cpu.upsample_crop(x, w, 2, 5, (5, 5), "logits", "nearest"), "kind must be one of"),
        (lambda: cpu.upsample_crop(x, w, 2, 5, (5, 5), "scores", "bilinear"), "output must be one of"),
        (lambda: cpu.upsample_crop(x, w, 2, 5, (20, 5), "logits", "bilinear"), "does not fit"),
        (lambda: cpu.upsample_crop(x, make_weight("dense", 4, 4), 2, 0, (5, 5), "logits", "dense"), "C=3"),
        (lambda: cpu.upsample_crop(x[0], w, 2, 0, (5, 5), "logits", "bilinear"), None),  # 3-D input
        (lambda: cpu.upsample_crop(x.long(), w, 2, 0, (5, 5), "logits", "bilinear"), None),  # integer dtype
        (lambda: cpu.upsample_crop(x, w, 0, 0, (5, 5), "logits", "bilinear"), "stride"),
        (lambda: cpu.upsample_crop(x, w, 2, -1, (5, 5), "logits", "bilinear"), "offset"),
        (lambda: cpu.upsample_add(x, w, 2, torch.randn(1, 3, 12, 12), 5, 1.0, "bilinear"), "does not fit"),
        (lambda: cpu.upsample_add(x, w, 2, torch.randn(1, 4, 40, 40), 5, 1.0, "bilinear"), "skip must be"),
        (lambda: cpu.fcn_head(x, [torch.randn(1, 3, 40, 40)], [w], [2], [5], [1.0], (5, 5), "labels"), None),
        (lambda: cpu.max_pool2d_with_switches(x, 17, 17), "kernel\\*kernel <= 256"),
        (lambda: cpu.max_pool2d_with_switches(torch.randn(1, 1, 1, 1), 2, 2, False), None),  # no window
        (lambda: cpu.max_unpool2d(x, torch.zeros(1, 3, 5, 5, dtype=torch.int32), (10, 10)), None),
        (lambda: cpu.max_unpool2d(x, torch.zeros(1, 3, 5, 4, dtype=torch.int64), (10, 10)), None),
        (lambda: cpu.max_unpool2d(x, u8, (10, 10), 3, 2), None),  # overlapping windows
        (lambda: cpu.max_unpool2d(x, u8, (13, 10)), None),  # size out of torch's range
        (lambda: cpu.max_unpool2d(x, u8 + 4, (10, 10)), "do not point inside"),  # switch >= k*k
    ]
    for i, (case, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            case()
            pytest.fail(f"case {i} did not raise")


@NEEDS_TWIN
def test_cpu_twin_nhwc_bad_switch_raises():
    x = torch.randn(1, 3, 5, 5).contiguous(memory_format=CL)
    sw = torch.zeros_like(x, dtype=torch.uint8)
    sw[0, 1, 2, 3] = 4  # >= k*k
    with pytest.raises(ValueError, match="do not point inside"):
        cpu.max_unpool2d(x, sw, (10, 10))
    sw[0, 1, 2, 3] = 0
    sw[0, 2, 4, 1] = 2  # dy = 1 on the last window row of a 9-row output
    with pytest.raises(ValueError, match="do not point inside"):
        cpu.max_unpool2d(x, sw, (9, 10))


@NEEDS_TWIN
def test_cpu_twin_rejects_indices_outside_their_window():
    """A scatter would silently accept these; the gather refuses them rather than drop values."""
    x = torch.randn(1, 2, 8, 8)
    values, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(11))
    shuffled = idx.flatten(2)[:, :, perm].view_as(idx)
    assert not torch.equal(shuffled, idx)
    with pytest.raises(ValueError, match="window"):
        cpu.max_unpool2d(values, shuffled, (8, 8))
    # indices of a 9-wide map read as an 8-wide one point into the wrong windows
    _, idx9 = F.max_pool2d(torch.randn(1, 2, 8, 9), 2, 2, return_indices=True)
    with pytest.raises(ValueError, match="window"):
        cpu.max_unpool2d(values, idx9[..., :4], (8, 8))


# ------------------------------------------------------------------ validation, caching, dispatch


def _bad_calls():
    x = torch.randn(1, 3, 4, 5)
    w = st.bilinear_weight(3, 4)
    return [
        (lambda: ops.upsample_add(x[0], w, 2), "x must be a \\(N, C, h, w\\)"),
        (lambda: ops.upsample_add(x.long(), w, 2), "float32, float16 or bfloat16"),
        (lambda: ops.upsample_add(x, w[:2], 2), "weight must be \\(C, C, k, k\\)"),
        (lambda: ops.upsample_add(x, w, 0), "stride must be a positive integer"),
        (lambda: ops.upsample_add(x, w, 2, torch.randn(1, 3, 9, 12), 0), "does not fit skip"),
        (lambda: ops.upsample_add(x, w, 2, torch.randn(1, 2, 40, 40), 0), "skip must be \\(N, C, Hs, Ws\\)"),
        (lambda: ops.upsample_crop(x, w, 2, 1, (10, 10)), "does not fit the upsampled map"),
        (lambda: ops.upsample_crop(x, w, 2, -1, (3, 3)), "offset must be a non-negative integer"),
        (lambda: ops.upsample_crop(x, w, 2, 0, (3, 3), "argmax"), "output must be one of"),
        (lambda: ops.upsample_crop(x, w, 2, 0, (3, 3), impl="gpu"), "impl must be one of"),
        (lambda: ops.fcn_head(x, [], [w, w], [2], [0], [], (3, 3)), "needs 1 weights, strides and offsets"),
        (lambda: ops.max_pool2d_with_switches(x, 17, 17), "kernel\\*kernel <= 256"),
        (lambda: ops.max_pool2d_with_switches(x, 5, 5, False), "too small"),
        (lambda: ops.max_unpool2d(x, torch.zeros(1, 3, 4, 5, dtype=torch.int32), (8, 10)), "int64"),
        (lambda: ops.max_unpool2d(x, torch.zeros(1, 3, 4, 4, dtype=torch.long), (8, 10)), "shape of x"),
        (lambda: ops.max_unpool2d(x, torch.zeros_like(x, dtype=torch.long), (8, 13)), "output_size"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(i):
    call, match = _bad_calls()[i]
    with pytest.raises(ValueError, match=match):
        call()


def test_weight_kind_cached_per_tensor(monkeypatch):
    calls = []
    real = st.weight_kind
    monkeypatch.setattr(ops._structure, "weight_kind", lambda w: calls.append(1) or real(w))
    w = st.bilinear_weight(3, 4).to(DEV)
    assert ops.weight_kind(w) == "bilinear"
    x = torch.randn(1, 3, 2, 2, device=DEV)
    for _ in range(3):
        ops.upsample_add(x, w, 2, impl="triton")
    assert len(calls) == 1
    with torch.no_grad():
        w[0, 1, 0, 0] = 0.5  # an in-place change moves the version counter: detect again
    assert ops.weight_kind(w) == "dense" and len(calls) == 2
    assert ops.weight_kind(make_weight("depthwise", 3, 4)) == "depthwise"


def test_default_impl_on_cpu_warns_once_without_twin(monkeypatch):
    monkeypatch.setattr(ops, "_cpu_state", {"mod": None, "why": "test: no twin"})
    x = torch.randn(1, 2, 3, 3)
    w = st.bilinear_weight(2, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = ops.upsample_crop(x, w, 2, 1, (4, 4))
        b = ops.upsample_crop(x, w, 2, 1, (4, 4))
    msgs = [str(r.message) for r in rec if "C++ kernels are unavailable" in str(r.message)]
    assert len(msgs) == 1 and "test: no twin" in msgs[0]
    assert torch.equal(a, ref.upsample_crop(x, w, 2, 1, (4, 4))) and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="test: no twin"):
        ops.upsample_crop(x, w, 2, 1, (4, 4), impl="cpu")


def test_default_impl_on_cpu_uses_twin_when_built():
    if not cpu_twin_available():
        pytest.skip("fastfcn.kernels.cpu is not built here")
    assert ops._resolve(None, torch.zeros(1)) == "cpu"


# ------------------------------------------------------------------ torch.compile / export


# schema, fake-tensor and autograd-registration checks; the AOT-dispatch checks compile the op
# several times (25 s here) and are covered by the compile/export test below
OPCHECK = ("test_schema", "test_faketensor", "test_autograd_registration")


def test_custom_ops_opcheck():
    x = torch.randn(2, 3, 4, 5, device=DEV)
    w = st.bilinear_weight(3, 4).to(DEV)
    skip = torch.randn(2, 3, 20, 20, device=DEV)
    xi = int_valued(2, 3, 7, 9).to(DEV)
    v, sw = ops.max_pool2d_with_switches(xi, impl="triton")
    lib = torch.ops.fastfcn
    for op, args in [
        (lib.upsample_add, (x, w, 2, skip, 5, 0.5, "triton")),
        (lib.upsample_crop, (x, w, 2, 1, [6, 7], "labels", "triton")),
        (lib.fcn_head, (x, [skip], [w, w], [2, 2], [5, 1], [0.5], [6, 7], "probs", "triton")),
        (lib.max_pool2d_with_switches, (xi, 2, 2, True, "triton")),
        (lib.max_unpool2d, (v, sw, [7, 9], 2, 2, True, "triton")),
    ]:
        torch.library.opcheck(op.default, args, test_utils=OPCHECK)


def test_compile_and_export_see_the_fused_head():
    w = st.bilinear_weight(3, 4).to(DEV)

    class Head(torch.nn.Module):
        def forward(self, x, skip):
            return ops.fcn_head(x, [skip], [w, w], [2, 2], [5, 1], [0.5], (6, 7), "labels", impl="triton")

    x, skip = torch.randn(2, 3, 4, 5, device=DEV), torch.randn(2, 3, 20, 20, device=DEV)
    eager = Head()(x, skip)
    compiled = torch.compile(Head(), fullgraph=True, backend="aot_eager")(x, skip)
    assert torch.equal(compiled, eager)
    ep = torch.export.export(Head(), (x, skip))
    assert "fastfcn.fcn_head" in str(ep.graph)
    assert torch.equal(ep.module()(x, skip), eager)


# ------------------------------------------------------------------ GPU lane: full sizes


@pytest.mark.gpu
@pytest.mark.parametrize("output", ["labels", "logits"])
@pytest.mark.parametrize("arch", ["fcn8s", "fcn8s-atonce", "fcn16s", "fcn32s", "alexnet", "dilated"])
def test_fcn_head_full_size_gpu(arch, output):
    h, kinds = head_case(arch, 500, 375, 21, 2)
    want = fp64_head(h)
    mag = ref.fcn_head(*_abs_inputs(h["score"]), _abs_inputs(*h["skips"]), _abs_inputs(*h["weights"]),
                       h["strides"], h["offsets"], h["scales"], h["size"])
    bound = fp32_bound(mag, _head_terms(h, kinds))
    out = ops.fcn_head(h["score"].cuda(), [s.cuda() for s in h["skips"]], [w.cuda() for w in h["weights"]],
                       h["strides"], h["offsets"], h["scales"], h["size"], output).cpu()
    check_output(out, want.float(), bound, output)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["depthwise", "dense"])
def test_upsample_crop_full_size_gpu(kind):
    c, (k, s, off), (H, W) = 21, FINAL["fcn8s"], (500, 375)
    w = make_weight(kind, c, k)
    x = torch.randn(2, c, covering(H, k, s, off), covering(W, k, s, off))
    want = ref.upsample_crop(x.double(), w.double(), s, off, (H, W))
    bound = fp32_bound(ref.upsample_crop(*_abs_inputs(x, w), s, off, (H, W)), _terms(kind, c, k, s))
    for output in ("logits", "labels", "probs"):
        out = ops.upsample_crop(x.cuda(), w.cuda(), s, off, (H, W), output).cpu()
        check_output(out, want.float(), bound, output)


@pytest.mark.gpu
@pytest.mark.parametrize("size,c", [((224, 224), 64), ((112, 112), 128), ((14, 14), 512), ((500, 375), 64)])
def test_max_unpool2d_full_size_gpu(size, c):
    x = torch.randn(2, c, *size, device="cuda")
    values, idx = F.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
    want = F.max_unpool2d(torch.relu(values), idx, 2, 2, output_size=size)
    assert torch.equal(ops.max_unpool2d(values, idx, size, relu=True), want)
    v, sw = ops.max_pool2d_with_switches(x)
    assert torch.equal(v, values)
    assert torch.equal(ops.max_unpool2d(v, sw, size, relu=True), want)
