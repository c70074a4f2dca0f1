"""FCN-GoogLeNet (models/googlenet.py): the layer list against bvlc_googlenet, parameter and MAC
counts derived here from that list, geometry at every side, the crop offset derived with Caffe's
coordinate arithmetic and checked by flip symmetry, .caffemodel import by Caffe name against an
independent forward, and the fused backend against the reference.

The layer table below is written from bvlc_googlenet's deploy.prototxt, independently of the
model's own table, so a typo in either shows up as a count or a state-dict mismatch.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from helpers import caffe_blob, caffe_layer, caffe_net

import fastfcn
from fastfcn import models
from fastfcn.flops import count_macs
from fastfcn.heads import HEADS, Head, Stage
from fastfcn.models.backbone import LRN, Conv, Inception, Pool
from fastfcn.models.googlenet import CONV1_PAD, googlenet_sizes

# deploy.prototxt: (block, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj); "pool" is a
# 3x3/2 max pooling.
PROTOTXT = [
    ("3a", 64, 96, 128, 16, 32, 32), ("3b", 128, 128, 192, 32, 96, 64), "pool",
    ("4a", 192, 96, 208, 16, 48, 64), ("4b", 160, 112, 224, 24, 64, 64),
    ("4c", 128, 128, 256, 24, 64, 64), ("4d", 112, 144, 288, 32, 64, 64),
    ("4e", 256, 160, 320, 32, 128, 128), "pool",
    ("5a", 256, 160, 320, 32, 128, 128), ("5b", 384, 192, 384, 48, 128, 128),
]  # fmt: skip


def caffe_convs(width: float = 1.0, num_classes: int = 21):
    """[(Caffe name, c_out, c_in, k, stride, pad)] of every convolution, in prototxt order, then
    score_fr; the channel counts scaled as fastfcn scales them (round, at least 1)."""

    def ch(c):
        return max(1, round(c * width))

    convs = [("conv1/7x7_s2", ch(64), 3, 7, 2, CONV1_PAD), ("conv2/3x3_reduce", ch(64), ch(64), 1, 1, 0),
             ("conv2/3x3", ch(192), ch(64), 3, 1, 1)]  # fmt: skip
    c_in = ch(192)
    for block in PROTOTXT:
        if block == "pool":
            continue
        b, n1, n3r, n3, n5r, n5, npp = block
        n1, n3r, n3, n5r, n5, npp = map(ch, (n1, n3r, n3, n5r, n5, npp))
        convs += [
            (f"inception_{b}/1x1", n1, c_in, 1, 1, 0), (f"inception_{b}/3x3_reduce", n3r, c_in, 1, 1, 0),
            (f"inception_{b}/3x3", n3, n3r, 3, 1, 1), (f"inception_{b}/5x5_reduce", n5r, c_in, 1, 1, 0),
            (f"inception_{b}/5x5", n5, n5r, 5, 1, 2), (f"inception_{b}/pool_proj", npp, c_in, 1, 1, 0),
        ]  # fmt: skip
        c_in = n1 + n3 + n5 + npp
    return convs + [("score_fr", num_classes, c_in, 1, 1, 0)]


def params(convs) -> int:
    return sum(co * ci * k * k + co for _, co, ci, k, _, _ in convs)


def meta(arch="fcn-googlenet", **kw):
    with torch.device("meta"):
        return models.build(arch, **kw).eval()


def small(seed=0, width=0.0625, num_classes=5):
    torch.manual_seed(seed)
    return models.build("fcn-googlenet", num_classes=num_classes, width=width).eval()


# ------------------------------------------------------------------------------ definition and counts


def test_build_defaults_and_choices():
    m = models.build("fcn-googlenet", width=0.0625)
    assert m.num_classes == 21 and m.config["arch"] == "fcn-googlenet"
    assert m.config["mean"] == [104.0, 117.0, 123.0] and m.config["color_order"] == "BGR"
    assert m.config["options"] == {"learnable_upsampling": False, "dropout": 0.4}
    assert m.drop.p == 0.4 and not m.has_dead_zone
    assert m.conv1_7x7_s2.padding == (18, 18) and m.conv1_7x7_s2.stride == (2, 2)
    assert [(s.upsample, s.kernel, s.stride, s.offset) for s in HEADS["fcn-googlenet"].stages] == [
        ("upscore", 63, 32, 16)
    ]
    assert not m.upscore.weight.requires_grad
    assert models.build("fcn-googlenet", width=0.0625, learnable_upsampling=True).upscore.weight.requires_grad
    # No aux classifiers, no average pooling, no ImageNet classifier.
    assert not any(n.startswith(("loss", "pool5")) for n, _ in m.named_modules())
    names = [s.name for s in m.conv_steps()]
    assert names == [n.replace("/", "_") for n, *_ in caffe_convs()]
    for lrn in (m.pool1_norm1, m.conv2_norm2):  # Caffe's LRN: local_size 5, alpha 1e-4, beta 0.75
        assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)


def test_layer_shapes_match_the_prototxt():
    m = meta(num_classes=21)
    for name, co, ci, k, s, p in caffe_convs():
        conv = getattr(m, name.replace("/", "_"))
        assert tuple(conv.weight.shape) == (co, ci, k, k), name
        assert (conv.stride, conv.padding) == ((s, s), (p, p)), name


def test_parameter_count_against_bvlc_googlenet():
    # bvlc_googlenet up to inception_5b (conv1 9,472; conv2 114,944; 3a 163,696; 3b 388,736;
    # 4a 376,176; 4b 449,160; 4c 510,104; 4d 605,376; 4e 868,352; 5a 1,043,456; 5b 1,444,080):
    # 5,973,552. With loss3/classifier (1024 x 1000 + 1000) that is the 6,998,552 of the BVLC
    # model without its aux heads (the "7M" usually quoted; torchvision's 6.6M googlenet uses
    # BatchNorm and a 3x3 for the 5x5 branch). Table 1 of the FCN paper lists FCN-GoogLeNet at
    # "6M": the trunk plus score_fr (1024 x 21 + 21 = 21,525) is 5,995,077.
    convs = caffe_convs()
    trunk = params(convs[:-1])
    assert trunk == 5_973_552
    assert trunk + 1024 * 1000 + 1000 == 6_998_552
    assert params(convs) == 5_995_077
    m = meta()
    # plus the fixed 21 x 21 x 63 x 63 bilinear upscore, a parameter like FCN-32s' upscore
    assert models.parameter_count(m) == 5_995_077 + 21 * 21 * 63 * 63 == 7_745_406
    learned = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("upscore"))
    assert learned == 5_995_077


def test_macs_at_500_against_fcn32s_vgg16():
    """Table 1: FCN-GoogLeNet is cheaper than FCN-VGG16 (59 vs 210 ms on a K40c). Counted MACs at
    500x500, 21 classes: 9.206 GMAC against FCN-32s' 181.366 (19.7x fewer; the paper's time
    ratio is 3.6x), and against FCN-AlexNet's 21.42 GMAC (2.3x fewer). Learned parameters as in
    Table 1's row: 6M, 134M, 57M."""
    c = count_macs(meta(), (1, 3, 500, 500))
    vgg = count_macs(meta("fcn32s"), (1, 3, 500, 500))
    alex = count_macs(meta("fcn-alexnet"), (1, 3, 500, 500))
    # By hand from the prototxt: each conv costs out_h * out_w * c_out * c_in * k * k; maps 265
    # (conv1), 132 (conv2), 66 (3x), 33 (4x), 16 (5x, score_fr); upscore 21 x 21 x 63^2 per input.
    side = {"conv1": 265, "conv2": 132, "inception_3": 66, "inception_4": 33, "inception_5": 16,
            "score": 16}  # fmt: skip
    hand = 0
    for name, co, ci, k, _, _ in caffe_convs():
        s = next(v for key, v in side.items() if name.startswith(key))
        hand += s * s * co * ci * k * k
    hand += 16 * 16 * 21 * 21 * 63 * 63
    assert c.macs == hand == 9_206_010_048
    assert vgg.macs == 181_365_854_976 and alex.macs == 21_424_487_968
    assert vgg.macs / c.macs == pytest.approx(19.70, abs=0.01)
    assert c.macs < alex.macs < vgg.macs
    assert c.computed_macs == c.macs  # no dead-zone skip for this arch

    def learned(arch):
        return sum(p.numel() for n, p in meta(arch).named_parameters() if not n.startswith("upscore"))

    assert (learned("fcn-googlenet"), learned("fcn32s"), learned("fcn-alexnet")) == (
        5_995_077, 134_346_581, 56_954_261
    )


# ----------------------------------------------------------------------------------------- geometry


def test_every_side_from_1_to_4096_gives_its_size():
    # Pure ints: the four 3x3/2 pools get a non-empty input and upscore covers offset + side.
    for h in range(1, 4097):
        sizes = googlenet_sizes(h)
        assert sizes is not None and sizes[-1] >= h + 16, h
    # pad 18 is the smallest that works: with 17 the pools run dry for H = 1 and 2.
    assert [h for h in range(1, 4097) if googlenet_sizes(h, 17) is None] == [1, 2]


def test_output_is_exactly_the_input_size_on_meta():
    m = meta(num_classes=5, width=1 / 64)
    for h in range(1, 97):  # each H paired with W = 97 - H: every height and every width
        y = m(torch.empty(1, 3, h, 97 - h, device="meta"))
        assert tuple(y.shape) == (1, 5, h, 97 - h), h
    assert googlenet_sizes(500) == [265, 132, 66, 33, 16, 543]


def _layers(model):
    """(kernel, stride, pad) along one dimension from the input to the coarsest score map; an
    Inception block, checked to be centred and size-preserving, is its widest branch."""
    out = []
    for step in tuple(model.backbone) + tuple(model.extra_steps):
        if isinstance(step, Conv):
            m = getattr(model, step.name)
            out.append(((m.kernel_size[0] - 1) * m.dilation[0] + 1, m.stride[0], m.padding[0]))
            if step.name == model.head.score:
                return out
        elif isinstance(step, Pool):
            out.append((step.kernel, step.stride, 0))
        elif isinstance(step, Inception):
            spans = [2]  # the pool branch's 3x3/1 pool (pad 1), then its 1x1 pool_proj
            for branch in step.branches:
                for conv in branch:
                    m = getattr(model, conv.name)
                    assert m.stride == (1, 1) and 2 * m.padding[0] == m.kernel_size[0] - 1, conv
                spans.append(sum(getattr(model, c.name).kernel_size[0] - 1 for c in branch))
            k = max(spans) + 1  # as wide as its widest branch (5x5), centred like every branch
            out.append((k, 1, (k - 1) // 2))
        else:
            assert isinstance(step, LRN)
    raise AssertionError("no score layer")


def crop_offset(model, kernel: int, stride: int) -> Fraction:
    """fcn.berkeleyvision.org coord_map.py: a conv or pool maps x -> (x + pad - (k - 1) / 2) / s,
    a Deconvolution x -> s x + (k - 1) / 2 - pad; the crop offset is where input 0 lands."""
    a, b = Fraction(1), Fraction(0)
    for k, s, p in _layers(model):
        a, b = a / s, (b + p - Fraction(k - 1, 2)) / s
    a, b = a * stride, b * stride + Fraction(kernel - 1, 2)
    assert a == 1
    return b


def receptive_field(model, extra=()) -> int:
    rf, jump = 1, 1
    for k, s, _ in (*_layers(model), *extra):
        rf, jump = rf + (k - 1) * jump, jump * s
    return rf


def test_crop_offset_derivation_reproduces_the_reference_and_centres_googlenet():
    # The arithmetic gives the reference nets' published offsets ...
    assert crop_offset(meta("fcn32s", width=1 / 64), 64, 32) == 19
    assert crop_offset(meta("fcn-alexnet", width=1 / 64), 63, 32) == 18
    assert crop_offset(meta("fcn-alexnet", width=1 / 64), 64, 32) == Fraction(37, 2)  # why AlexNet has k63
    g = meta(width=1 / 64)
    # ... and for GoogLeNet (pad 18) k64 would land between two pixels; k63 lands on pixel 16.
    assert crop_offset(g, 64, 32) == Fraction(33, 2)
    assert crop_offset(g, 63, 32) == 16 == CONV1_PAD - 2 == HEADS["fcn-googlenet"].stages[0].offset


def test_receptive_fields_match_table_1():
    # Table 1 (rf size): FCN-AlexNet 355, FCN-VGG16 404, FCN-GoogLeNet 907. GoogLeNet's 907 counts
    # its 7x7/1 average pool, which the paper's FCN discards: without it, 715.
    assert receptive_field(meta("fcn-alexnet", width=1 / 64)) == 355
    assert receptive_field(meta("fcn32s", width=1 / 64)) == 404
    g = meta(width=1 / 64)
    assert receptive_field(g) == 715
    assert receptive_field(g, extra=[(7, 1, 0)]) == 907


def _exact_side(model, lo=1, hi=200):
    """A side length at which every strided layer's windows tile its input exactly (no ceil-mode
    overhang), so the whole net is mirror-symmetric."""
    for side in range(lo, hi):
        h, ok = side, True
        for k, s, p in _layers(model):
            ok = ok and h + 2 * p - k >= 0 and (h + 2 * p - k) % s == 0
            h = (h + 2 * p - k) // s + 1
        if ok:
            return side
    raise AssertionError("no exact side")


def _symmetrize(model):
    with torch.no_grad():
        for step in model.conv_steps():
            w = getattr(model, step.name).weight
            w.copy_(w + w.flip(-1))
    return model


@pytest.mark.parametrize("arch", ["fcn32s", "fcn-alexnet", "fcn-googlenet"])
def test_mirrored_input_gives_mirrored_output(arch):
    """With mirror-symmetric kernels (conv taps, max pools, bilinear upsampling, LRN across
    channels) the net commutes with a horizontal flip exactly when the crop is centred on the
    receptive fields; a crop one pixel off breaks it. Checked on the reference nets too."""
    torch.manual_seed(0)
    m = _symmetrize(models.build(arch, num_classes=3, width=1 / 16).eval())
    w = _exact_side(m)
    x = torch.randn(1, 3, 5, w) * 50
    with torch.no_grad():
        y, yf = m(x), m(x.flip(-1))
        torch.testing.assert_close(yf, y.flip(-1), rtol=1e-5, atol=1e-5 * float(y.abs().max()))
        st = m.head.stages[-1]
        m.head = Head(m.head.score, (), (Stage(st.upsample, st.kernel, st.stride, st.offset + 1),))
        y, yf = m(x), m(x.flip(-1))
    assert (yf - y.flip(-1)).abs().max() > 1e-2 * y.abs().max()


# ------------------------------------------------------------------------- caffemodel and agreement


def caffe_weights(seed=0, width=0.125, num_classes=7) -> dict[str, torch.Tensor]:
    """Random He-scaled weights by Caffe name, plus the bilinear upscore."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, co, ci, k, _, _ in caffe_convs(width, num_classes):
        sd[f"{name}.weight"] = torch.randn(co, ci, k, k, generator=g) * math.sqrt(2.0 / (ci * k * k))
        sd[f"{name}.bias"] = torch.randn(co, generator=g) * 0.1
    f = 1 - (torch.arange(63.0) - 31).abs() / 32  # FACTS.md's bilinear filter, k = 63
    up = torch.zeros(num_classes, num_classes, 63, 63)
    for i in range(num_classes):
        up[i, i] = torch.outer(f, f)
    sd["upscore.weight"] = up
    return sd


def caffe_forward(sd, x):
    """bvlc_googlenet deploy.prototxt up to inception_5b with conv1 pad 18, then score_fr,
    upscore (k63 s32) and a Crop at 16, in plain torch.nn.functional calls."""

    def conv(name, h, pad=0, stride=1):
        return F.relu(F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride, pad))

    def lrn(h):  # Caffe LRN across channels, local_size 5, alpha 1e-4, beta 0.75
        sq = F.pad(h * h, (0, 0, 0, 0, 2, 2))
        return h / (1 + 1e-4 / 5 * sum(sq[:, i:i + h.shape[1]] for i in range(5))) ** 0.75

    def pool(h):
        return F.max_pool2d(h, 3, 2, ceil_mode=True)

    h = lrn(pool(conv("conv1/7x7_s2", x, 18, 2)))
    h = pool(lrn(conv("conv2/3x3", conv("conv2/3x3_reduce", h), 1)))
    for block in PROTOTXT:
        if block == "pool":
            h = pool(h)
            continue
        n = f"inception_{block[0]}"
        h = torch.cat([
            conv(f"{n}/1x1", h), conv(f"{n}/3x3", conv(f"{n}/3x3_reduce", h), 1),
            conv(f"{n}/5x5", conv(f"{n}/5x5_reduce", h), 2),
            conv(f"{n}/pool_proj", F.max_pool2d(h, 3, 1, 1)),
        ], 1)  # fmt: skip
    score = F.conv2d(h, sd["score_fr.weight"], sd["score_fr.bias"])
    up = F.conv_transpose2d(score, sd["upscore.weight"], stride=32)
    H, W = x.shape[-2:]
    assert up.shape[-2] >= 16 + H and up.shape[-1] >= 16 + W
    return up[:, :, 16:16 + H, 16:16 + W]


@pytest.fixture(scope="module")
def caffemodel(tmp_path_factory):
    sd = caffe_weights()
    layers = []
    for key, t in sd.items():  # weight then bias of each layer, in prototxt order
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight"):
            ltype = "Deconvolution" if name == "upscore" else "Convolution"
            blobs = [caffe_blob(t)] + ([caffe_blob(sd[f"{name}.bias"])] if f"{name}.bias" in sd else [])
            layers.append(caffe_layer(name, ltype, blobs))
    path = tmp_path_factory.mktemp("caffe") / "fcn-googlenet.caffemodel"
    path.write_bytes(caffe_net(layers))
    return sd, path


def test_caffemodel_loads_by_caffe_name_and_matches_an_independent_forward(caffemodel):
    sd, path = caffemodel
    m = fastfcn.load(path)  # arch, classes and width inferred from the names and shapes
    assert (m.config["arch"], m.config["num_classes"], m.config["width"]) == ("fcn-googlenet", 7, 0.125)
    own = m.state_dict()
    assert sorted(own) == sorted(k.replace("/", "_") for k in sd)
    assert all(torch.equal(own[k.replace("/", "_")], v) for k, v in sd.items())
    for n, h, w in ((2, 1, 1), (1, 37, 53), (1, 64, 97)):
        x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w)) * 60
        with torch.no_grad():
            got, want = m(x), caffe_forward(sd, x)
        assert got.shape == (n, 7, h, w)
        # the same float32 ops up to summation order; a geometry error is O(1) of the logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (n, h, w)
    # The comparison can fail: the input shifted by one pixel is caught.
    x = torch.randn(1, 3, 37, 53, generator=torch.Generator().manual_seed(3)) * 60
    with torch.no_grad():
        shifted = caffe_forward(sd, F.pad(x, (1, 0, 1, 0)))[:, :, 1:, 1:]
        assert (m(x) - shifted).abs().max() > 1e-3 * shifted.abs().max()


@pytest.mark.parametrize("width", [0.0625, 0.3])
def test_bare_state_dict_infers_width(tmp_path, width):
    m = models.build("fcn-googlenet", num_classes=4, width=width)
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    loaded = fastfcn.load(tmp_path / "bare.pth")
    assert loaded.config["arch"] == "fcn-googlenet"
    assert loaded.config["width"] == pytest.approx(width, abs=0.01)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))


def test_config_validator_accepts_its_options():
    from fastfcn.config import validate_config
    from fastfcn.errors import CheckpointError

    cfg = {"arch": "fcn-googlenet", "num_classes": 21, "width": 1,
           "options": {"dropout": 0.4, "learnable_upsampling": True}}  # fmt: skip
    assert validate_config(cfg, "x")["options"] == cfg["options"]
    with pytest.raises(CheckpointError, match=r"unknown options \['context'\] for fcn-googlenet"):
        validate_config(dict(cfg, options={"context": "large"}), "x")


# ------------------------------------------------------------------------------------ runtime


def test_fused_backend_swaps_every_inception_conv_and_equals_reference(monkeypatch):
    from fastfcn.runtime import cpu_fast
    from fastfcn.runtime.backends import create_backend

    # oneDNN wins wherever it applies: the choice, and so the rounding, is the same on every run.
    def timer(name, fn, best=None):
        return (0.0 if name == "onednn" else 1.0), fn()

    monkeypatch.setattr(cpu_fast, "wall_timer", timer)
    m = small(width=0.125)
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        ref = m(x)
        b = create_backend("fused", m, torch.device("cpu"), "fp32")
        got = b(x, "logits")
    # Every conv step (6 per Inception block) runs through the planner; no dead-zone runner.
    assert set(b.planner.convs) == {s.name for s in m.conv_steps()} and len(b.planner.convs) == 58
    assert b.dead_zone is None and b.model.backbone_runner is None
    # 58 convs and the 4 stride-2 Pool steps (the planned max pool); an Inception block's 3x3/1
    # pad-1 pool is torch's (pool_impl takes no padding)
    layers = [e["layer"] for e in b.plan()]
    assert len(layers) == 62 and layers.count("maxpool") == 4
    # measured 1.6e-7 relative; a wrong branch order or a skipped conv is O(1)
    assert (got - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_segmenter_runs_it():
    seg = fastfcn.Segmenter(small(), backend="fused", precision="fp32")
    labels = seg.run(torch.randint(0, 256, (41, 29, 3), dtype=torch.uint8))
    assert labels.shape == (41, 29) and int(labels.max()) < 5


def test_dead_zone_is_small_and_not_planned():
    """Why the skip is off: the image-independent positions, planned over the chain before the
    first Inception block (after it every position depends on the image), are 120.7 MMAC of
    9,206 at 500x500 (1.3%): conv1 253^2 of 265^2 outputs, conv2/3x3_reduce 128^2 and conv2/3x3
    130^2 of 132^2."""
    from fastfcn.runtime.deadzone import DeadZoneForward, DeadZonePlan

    m = meta()
    with pytest.raises(ValueError, match=r"LRN steps; Inception\(name='inception_3a'\) is none"):
        DeadZoneForward(m)
    first = next(i for i, s in enumerate(m.backbone) if isinstance(s, Inception))
    plan = DeadZonePlan(m, m.backbone[:first], (500, 500))
    assert plan.steps[-1].dependent_fraction == 1.0  # pool2: every position reaches the image
    c = count_macs(m, (1, 3, 500, 500))
    macs = {layer.name: layer.macs for layer in c.layers}
    dep = {sp.step.name: sp.dependent_fraction for sp in plan.steps if isinstance(sp.step, Conv)}
    assert dep["conv1_7x7_s2"] == (253 / 265) ** 2 and dep["conv2_3x3"] == (130 / 132) ** 2
    skippable = sum(macs[n] * (1 - f) for n, f in dep.items())
    assert skippable / 1e6 == pytest.approx(120.7, abs=0.1)
    assert skippable / c.macs == pytest.approx(0.0131, abs=0.0001)


def test_training_batchnorm_wraps_every_backbone_conv_and_folds_back():
    from fastfcn.training.batchnorm import ConvBN, add_batchnorm, plain_copy

    m = small()
    wrapped = add_batchnorm(m)
    assert len(wrapped) == 57 and "inception_5b_pool_proj" in wrapped and "score_fr" not in wrapped
    x = torch.randn(2, 3, 33, 41, generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        m.train()(x)  # BatchNorm statistics from one batch
        want = m.eval()(x)
        plain = plain_copy(m)
        got = plain(x)
    assert not any(isinstance(c, ConvBN) for c in plain.children())
    assert list(plain.state_dict()) == list(small().state_dict())
    # measured 3.4e-7 relative (float32 rounding of the fold); an unfolded or lost BatchNorm is O(1)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
