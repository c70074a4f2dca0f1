"""Model zoo geometry, reference constants, parameter counts, BatchNorm folding."""

import pytest
import torch
from helpers import randomize_batchnorm

from fastfcn import models
from fastfcn.heads import HEADS
from fastfcn.kernels.structure import bilinear_1d, bilinear_kernel, weight_kind
from fastfcn.models.deconvnet import padded_size
from fastfcn.models.dilated import reflect_pad

FCN_ARCHS = ["fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce", "fcn-alexnet"]


def meta_model(arch, **kw):
    with torch.device("meta"):
        return models.build(arch, width=1 / 64, **kw).eval()


@pytest.mark.parametrize("arch", FCN_ARCHS)
def test_fcn_output_is_exactly_input_size_for_every_side_1_to_96(arch):
    # Every op of the net acts on H and W independently, so pairing each H in 1..96 with
    # W = 97 - H covers every height and every width. On the meta device only shapes are
    # computed; the head's crop raises if its window does not fit the upsampled map.
    m = meta_model(arch, num_classes=5)
    for h in range(1, 97):
        w = 97 - h
        y = m(torch.empty(1, 3, h, w, device="meta"))
        assert tuple(y.shape) == (1, 5, h, w), (arch, h, w)


@pytest.mark.parametrize("arch", models.available())
@pytest.mark.parametrize("size", [(1, 1), (37, 53)])
def test_every_arch_computes_logits_of_input_size(arch, size):
    torch.manual_seed(0)
    m = models.build(arch, num_classes=5, width=0.0625).eval()
    c = m.in_channels  # 3; NYUDv2 early fusion 4, late fusion 6
    with torch.no_grad():
        y = m(torch.randn(2, c, *size))
        labels = m(torch.randn(2, c, *size), output="labels")
    assert y.shape == (2, 5, *size)
    assert torch.isfinite(y).all()
    # Two-headed nets (SIFT Flow): one label map per head (models/multihead.py).
    heads = models.output_heads(m.config)
    assert labels.shape == ((2, len(heads), *size) if heads else (2, *size)) and labels.dtype == torch.uint8


@pytest.mark.parametrize("arch", ["deconvnet", "dilated-frontend", "dilated-context"])
def test_strided_nets_handle_sides_that_are_not_multiples_of_the_stride(arch):
    m = meta_model(arch, num_classes=4)
    for h in list(range(1, 20)) + [223, 224, 225, 257, 300]:
        y = m(torch.empty(1, 3, h, 300 - h + 1, device="meta"))
        assert tuple(y.shape) == (1, 4, h, 300 - h + 1)


def test_deconvnet_padded_size():
    assert [padded_size(h) for h in (1, 224, 225, 256, 257)] == [224, 224, 256, 256, 288]


def test_crop_offsets_and_kernels_are_the_reference_ones():
    def table(arch):
        return [(s.upsample, s.kernel, s.stride, s.offset) for s in HEADS[arch].stages]

    assert table("fcn32s") == [("upscore", 64, 32, 19)]
    assert table("fcn16s") == [("upscore2", 4, 2, 5), ("upscore16", 32, 16, 27)]
    for arch in ("fcn8s", "fcn8s-atonce"):
        assert table(arch) == [("upscore2", 4, 2, 5), ("upscore_pool4", 4, 2, 9), ("upscore8", 16, 8, 31)]
    assert table("fcn-alexnet") == [("upscore", 63, 32, 18)]
    assert table("dilated") == [("upscore", 16, 8, 4)]


def test_atonce_scales_pool4_and_pool3_before_their_score_layers():
    torch.manual_seed(1)
    plain = models.build("fcn8s", width=0.0625, num_classes=3).eval()
    atonce = models.build("fcn8s-atonce", width=0.0625, num_classes=3).eval()
    atonce.load_state_dict(plain.state_dict())
    seen = {}

    def grab(key):
        return lambda mod, inp: seen.__setitem__(key, inp[0].clone())

    for name, m in (("plain", plain), ("atonce", atonce)):
        m.score_pool4.register_forward_pre_hook(grab(name + "4"))
        m.score_pool3.register_forward_pre_hook(grab(name + "3"))
    x = torch.randn(1, 3, 40, 30)
    with torch.no_grad():
        plain(x), atonce(x)
    assert seen["plain4"].abs().max() > 0
    torch.testing.assert_close(seen["atonce4"], seen["plain4"] * 0.01, rtol=0, atol=0)
    torch.testing.assert_close(seen["atonce3"], seen["plain3"] * 0.0001, rtol=0, atol=0)


def test_bilinear_formula():
    assert bilinear_1d(4).tolist() == [0.25, 0.75, 0.75, 0.25]
    assert bilinear_1d(3).tolist() == [0.5, 1.0, 0.5]
    f63 = bilinear_1d(63)
    assert f63[31] == 1 and f63[0] == pytest.approx(1 / 32) and torch.equal(f63, f63.flip(0))
    f16 = bilinear_1d(16)
    assert f16.tolist() == [(2 * i + 1) / 16 for i in range(8)] + [(15 - 2 * i) / 16 for i in range(8)]
    k = bilinear_kernel(4)
    assert k[1, 2] == 0.75 * 0.75 and k[0, 3] == 0.25 * 0.25


def test_upsampling_weights_are_bilinear_on_the_diagonal_and_fixed():
    m = models.build("fcn8s", width=0.0625, num_classes=4)
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        w = getattr(m, name).weight
        assert not w.requires_grad
        assert weight_kind(w) == "bilinear"
        assert getattr(m, name).bias is None
    learn = models.build("fcn8s", width=0.0625, num_classes=4, learnable_upsampling=True)
    assert learn.upscore2.weight.requires_grad
    assert weight_kind(models.build("dilated-frontend", width=0.0625).upscore.weight) == "bilinear"


def test_pooling_is_ceil_mode_as_in_caffe():
    # 7 -> ceil(6/2)+1 = 4 with Caffe's rounding; floor would give 3.
    m = models.build("fcn32s", width=0.0625, num_classes=2).eval()
    sizes = []
    m.conv2_1.register_forward_pre_hook(lambda mod, inp: sizes.append(inp[0].shape[-1]))
    with torch.no_grad():
        m(torch.randn(1, 3, 5, 5))
    assert sizes == [(5 + 198 + 1) // 2]  # conv1 output 203 is odd: ceil gives 102


@pytest.mark.parametrize(
    "arch,count", [("fcn8s", 134_489_759), ("fcn16s", 134_815_994), ("fcn32s", 136_152_917)]
)
def test_parameter_counts_of_the_paper_nets(arch, count):
    with torch.device("meta"):
        m = models.build(arch)
    assert models.parameter_count(m) == count


def test_state_dict_keys_are_caffe_layer_names():
    keys = set(models.build("fcn8s", width=0.0625).state_dict())
    expected = {f"conv{b}_{i}.{p}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)
                for p in ("weight", "bias")}  # fmt: skip
    expected |= {f"{n}.{p}" for n in ("fc6", "fc7", "score_fr", "score_pool4", "score_pool3")
                 for p in ("weight", "bias")}  # fmt: skip
    expected |= {"upscore2.weight", "upscore_pool4.weight", "upscore8.weight"}
    assert keys == expected
    assert {"upscore2.weight", "upscore16.weight"} <= set(models.build("fcn16s", width=0.0625).state_dict())
    assert "upscore.weight" in models.build("fcn32s", width=0.0625).state_dict()


def test_batchnorm_folding_is_exact_to_float32_rounding():
    torch.manual_seed(2)
    m = randomize_batchnorm(models.build("deconvnet", width=0.0625, num_classes=5)).eval()
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        before = m(x)
        models.fold_batchnorm(m)
        after = m(x)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    # Folding reorders one multiply-add per layer; over ~20 layers the float32 error stays
    # within ~1e-5 of the logits' range (measured 2e-6), while a wrong fold is off by O(1).
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-5 * scale


def test_context_module_identity_init_passes_scores_through():
    torch.manual_seed(3)
    m = models.build("dilated-context", width=0.0625, num_classes=4, context="basic").eval()
    front = models.build("dilated-frontend", width=0.0625, num_classes=4).eval()
    front.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ctx_")})
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        a, b = m(x), front(x)
    # Identity convs with ReLU keep the positive part of the front end's scores.
    assert a.shape == b.shape
    torch.testing.assert_close(a, torch.nn.functional.conv_transpose2d(
        torch.relu(_frontend_scores(front, x)), front.upscore.weight, stride=8, groups=4
    )[:, :, 4:28, 4:36])


def _frontend_scores(front, x):
    scores = {}
    h = front.final.register_forward_hook(lambda mod, i, o: scores.__setitem__("s", o))
    with torch.no_grad():
        front(x)
    h.remove()
    return scores["s"]


def test_large_context_channels():
    m = models.build("dilated-context", width=0.0625, num_classes=3, context="large")
    outs = [getattr(m, n).out_channels for n in ("ctx_conv1_1", "ctx_conv1_2", "ctx_conv2_1", "ctx_conv3_1",
                                                 "ctx_conv4_1", "ctx_conv5_1", "ctx_fc1")]  # fmt: skip
    assert outs == [6, 6, 12, 24, 48, 96, 96] and m.ctx_final.out_channels == 3
    assert [getattr(m, n).dilation[0] for n in ("ctx_conv1_1", "ctx_conv2_1", "ctx_conv5_1")] == [1, 2, 16]


def test_reflect_pad_matches_torch_and_handles_wide_margins():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    want = torch.nn.functional.pad(x, (3, 2, 2, 1), "reflect")
    torch.testing.assert_close(reflect_pad(x, 2, 1, 3, 2), want)
    y = reflect_pad(x, 7, 7, 9, 9)
    assert y.shape == (1, 1, 17, 22)
    assert torch.equal(y[0, 0, 7:10, 9:13], x[0, 0])
    one = reflect_pad(torch.ones(1, 1, 1, 1), 3, 3, 3, 3)
    assert one.shape == (1, 1, 7, 7) and one.eq(1).all()


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch"):
        models.build("fcn4s")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("fcn8s", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        models.build("fcn8s", width=-1)
    with pytest.raises(ValueError, match="context"):
        models.build("dilated-context", context="huge")
    with pytest.raises(ValueError, match="bad options"):
        models.build("fcn8s", colour=True)
    m = models.build("fcn8s", width=0.0625)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="float"):
        m(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
