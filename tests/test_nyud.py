"""The NYUDv2 nets (fcn.berkeleyvision.org nyud-fcn32s-{color,hha,color-d,color-hha}): names,
parameter counts, geometry, the fusion arithmetic, .caffemodel import with the reference layer
names, preprocessing per modality, the Segmenter's second input, the dead-zone skip per stream.

The parametrized suites (test_models, test_backbone, test_checkpoint, test_export,
test_fused_models) cover these archs too through fastfcn.models.available().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import caffe_blob, caffe_layer, caffe_net
from test_caffe_agreement import assert_float32_close, caffe_forward

import fastfcn
from fastfcn import models
from fastfcn.config import config_inputs, validate_config
from fastfcn.errors import CheckpointError, InputError, StreamError
from fastfcn.flops import count_macs
from fastfcn.runtime.backends import create_backend
from fastfcn.runtime.deadzone import DeadZoneForward
from fastfcn.runtime.preprocess import Preprocessor

NYUD = ["nyud-fcn32s-color", "nyud-fcn32s-hha", "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha"]
W = 1 / 16
CPU = torch.device("cpu")
# nyud_layers.py (fcn.berkeleyvision.org)
MEAN_BGR = (116.190, 97.203, 92.318)
MEAN_HHA = (132.431, 94.076, 118.477)
MEAN_LOGD = 7.844

_MODELS: dict = {}


def model(arch: str) -> torch.nn.Module:
    if arch not in _MODELS:
        torch.manual_seed(sum(map(ord, arch)))
        _MODELS[arch] = models.build(arch, width=W, num_classes=5).eval()
    return _MODELS[arch]


def images(n, h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def depths(n, h, w, seed=0) -> np.ndarray:
    """uint16 millimetres, 0.5 to 10 m: NYUDv2's range."""
    rng = np.random.default_rng(seed + 100)
    return rng.integers(500, 10000, (n, h, w), dtype=np.uint16)


def reference_input(color: np.ndarray, second: np.ndarray | None, arch: str) -> torch.Tensor:
    """nyud_layers.py, written out: colour RGB -> BGR minus mean_bgr; HHA minus mean_hha in the
    file's order; depth log(d) - 7.844; concatenated along channels (Concat(color, depth))."""
    if arch == "nyud-fcn32s-hha":
        x = color.astype(np.float64) - np.array(MEAN_HHA)
    else:
        x = color[..., ::-1].astype(np.float64) - np.array(MEAN_BGR)
    parts = [x.transpose(0, 3, 1, 2)]
    if arch == "nyud-fcn32s-color-d":
        parts.append((np.log(second.astype(np.float64)) - MEAN_LOGD)[:, None])
    elif arch == "nyud-fcn32s-color-hha":
        parts.append((second.astype(np.float64) - np.array(MEAN_HHA)).transpose(0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, 1))).float()


# ------------------------------------------------------------------------------------ names, counts


def test_build_names_defaults_and_config():
    want = {
        "nyud-fcn32s-color": (["color"], list(MEAN_BGR), "BGR", 3),
        "nyud-fcn32s-hha": (["hha"], list(MEAN_HHA), "BGR", 3),  # colour order: the colour modality's
        "nyud-fcn32s-color-d": (["color", "depth"], [*MEAN_BGR, MEAN_LOGD], "BGR", 4),
        "nyud-fcn32s-color-hha": (["color", "hha"], [*MEAN_BGR, *MEAN_HHA], "BGR", 6),
    }
    assert [a for a in models.available() if a.startswith("nyud")] == NYUD
    for arch, (inputs, mean, order, channels) in want.items():
        with torch.device("meta"):
            m = models.build(arch)
        assert m.num_classes == 40, arch  # the dataset's class count by default
        assert m.config["inputs"] == inputs and m.config["mean"] == pytest.approx(mean)
        assert m.config["color_order"] == order and m.in_channels == channels
        names = m.config["class_names"]
        assert names[:3] == ["wall", "floor", "cabinet"] and len(names) == 40
        assert models.input_modalities(arch) == tuple(inputs)
    with torch.device("meta"):
        assert models.build("fcn32s").num_classes == 21  # VOC's default unchanged


# Parameter counts from the reference prototxts' blob shapes (fixed upsampling included):
# VGG16's 13 convs hold 14,714,688 (the published count of VGG16 without its classifier);
# fc6 (4096 x 512 x 7 x 7 + 4096) 102,764,544; fc7 16,781,312; score_fr 4096 x 40 + 40 = 163,880;
# upscore 40 x 40 x 64 x 64 = 6,553,600. conv1_1_bgrd has 4 input channels: 576 weights more
# than conv1_1. Late fusion: two streams up to score_fr, one upscore. (VOC FCN-8s by the same
# sums: 134,489,759, FACTS.md's 134.49 M.)
STREAM = 14_714_688 + 102_764_544 + 16_781_312 + 163_880
PARAMS = {
    "nyud-fcn32s-color": STREAM + 6_553_600,  # 140,978,024
    "nyud-fcn32s-hha": STREAM + 6_553_600,
    "nyud-fcn32s-color-d": STREAM + 576 + 6_553_600,
    "nyud-fcn32s-color-hha": 2 * STREAM + 6_553_600,  # 275,402,448
}


@pytest.mark.parametrize("arch", NYUD)
def test_parameter_counts_are_the_reference_nets(arch):
    with torch.device("meta"):
        m = models.build(arch)
    assert models.parameter_count(m) == PARAMS[arch]


@pytest.mark.parametrize("arch", NYUD)
def test_output_is_input_size_at_every_side_1_to_64(arch):
    with torch.device("meta"):
        m = models.build(arch, width=1 / 64, num_classes=3).eval()
    for h in range(1, 65):
        y = m(torch.empty(1, m.in_channels, h, 65 - h, device="meta"))
        assert tuple(y.shape) == (1, 3, h, 65 - h), (arch, h)


def test_wrong_channel_count_is_refused_with_the_expected_one():
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\) \(color \+ depth concatenated\); got \(1, 3, 9,"):
        model("nyud-fcn32s-color-d")(torch.zeros(1, 3, 9, 9))
    with pytest.raises(ValueError, match=r"\(N, 6, H, W\)"):
        model("nyud-fcn32s-color-hha")(torch.zeros(1, 4, 9, 9))


# ------------------------------------------------------------------------------ fusion arithmetic


def test_late_fusion_is_the_mean_of_the_colour_and_hha_nets():
    """The reference initialises late fusion by transplanting a colour and an HHA net into the
    suffixed streams (surgery.transplant(..., suffix=...)). upscore is linear and has no bias,
    so the fused net's logits are 0.5 x colour net + 0.5 x HHA net exactly (up to rounding);
    a wrong coefficient, a swapped stream or a stream fed the other's channels breaks it."""
    color, hha = model("nyud-fcn32s-color"), model("nyud-fcn32s-hha")
    sd = {}
    for suffix, net in (("color", color), ("hha", hha)):
        for k, v in net.state_dict().items():
            name, p = k.rsplit(".", 1)
            if name != "upscore":
                sd[f"{name}{suffix}.{p}"] = v
    sd["upscore.weight"] = color.upscore.weight
    fused = models.build("nyud-fcn32s-color-hha", width=W, num_classes=5).eval()
    fused.load_state_dict(sd)
    x = torch.randn(2, 6, 29, 41, generator=torch.Generator().manual_seed(3)) * 60
    with torch.no_grad():
        got = fused(x)
        want = 0.5 * color(x[:, :3]) + 0.5 * hha(x[:, 3:])
        assert not torch.allclose(color(x[:, :3]), hha(x[:, 3:]))
    assert_float32_close(got, want)


def test_early_fusion_depth_is_the_fourth_channel():
    """conv1_1_bgrd with the colour net's conv1_1 on channels 0-2 and zeros on channel 3 is the
    colour net (whatever the depth); a weight on channel 3 makes depth matter."""
    color = model("nyud-fcn32s-color")
    early = models.build("nyud-fcn32s-color-d", width=W, num_classes=5).eval()
    sd = {("conv1_1_bgrd" + k[len("conv1_1"):] if k.startswith("conv1_1.") else k): v
          for k, v in color.state_dict().items()}  # fmt: skip
    w = sd["conv1_1_bgrd.weight"]
    sd["conv1_1_bgrd.weight"] = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
    early.load_state_dict(sd)
    x = torch.randn(1, 4, 23, 19, generator=torch.Generator().manual_seed(4)) * 60
    with torch.no_grad():
        assert_float32_close(early(x), color(x[:, :3]))
        early.conv1_1_bgrd.weight[:, 3] = 0.1
        assert not torch.allclose(early(x), color(x[:, :3]))


# ---------------------------------------------------------------------------------- caffemodel import


def _caffe_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    """A .caffemodel with one Convolution / Deconvolution layer per module, named as the file's
    keys say (the reference layer names), plus weightless layers the reader must skip."""
    layers = [caffe_layer("data", "Python", []), caffe_layer("relu1_1", "ReLU", [])]
    names = dict.fromkeys(k.rsplit(".", 1)[0] for k in sd)
    for name in names:
        blobs = [caffe_blob(sd[f"{name}.weight"])]
        if f"{name}.bias" in sd:
            blobs.append(caffe_blob(sd[f"{name}.bias"]))
        layers.append(caffe_layer(name, "Deconvolution" if name == "upscore" else "Convolution", blobs))
    layers.append(caffe_layer("score_fused", "Eltwise", []))
    return caffe_net(layers)


def _reference_forward(arch: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """test_caffe_agreement's independent FCN-32s forward per stream (plain torch ops)."""
    if arch == "nyud-fcn32s-color-hha":
        out = 0
        for i, s in enumerate(("color", "hha")):
            stream = {"upscore.weight": sd["upscore.weight"]}
            for k, v in sd.items():
                name, p = k.rsplit(".", 1)
                if name.endswith(s):
                    stream[f"{name[: -len(s)]}.{p}"] = v
            out = out + 0.5 * caffe_forward("fcn32s", stream, x[:, 3 * i : 3 * i + 3])
        return out
    plain = {k.replace("conv1_1_bgrd", "conv1_1"): v for k, v in sd.items()}
    return caffe_forward("fcn32s", plain, x)


@pytest.mark.parametrize("arch", NYUD)
def test_caffemodel_with_reference_layer_names_loads_and_matches(tmp_path, arch):
    torch.manual_seed(7)
    src = models.build(arch, width=W, num_classes=5).eval()
    with torch.no_grad():
        for p in src.parameters():
            if p.dim() == 4 and p.requires_grad:
                p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5)
    sd = src.state_dict()
    path = tmp_path / f"{arch}.caffemodel"
    path.write_bytes(_caffe_bytes(sd))
    # Early and late fusion have layer names of their own; the colour and HHA nets have VOC
    # FCN-32s's and are named.
    named = arch in ("nyud-fcn32s-color", "nyud-fcn32s-hha")
    loaded = fastfcn.load(path, arch=arch if named else None)
    assert (loaded.config["arch"], loaded.config["num_classes"], loaded.config["width"]) == (arch, 5, W)
    assert loaded.config["mean"] == src.config["mean"]
    x = torch.randn(2, src.in_channels, 31, 27, generator=torch.Generator().manual_seed(5)) * 60
    with torch.no_grad():
        assert_float32_close(loaded(x), _reference_forward(arch, sd, x))


def test_bare_state_dict_of_fusion_nets_infers_arch_and_width(tmp_path):
    for arch in ("nyud-fcn32s-color-d", "nyud-fcn32s-color-hha"):
        torch.save(model(arch).state_dict(), tmp_path / "bare.pth")
        m = fastfcn.load(tmp_path / "bare.pth")
        assert (m.config["arch"], m.config["num_classes"], m.config["width"]) == (arch, 5, W)


# ------------------------------------------------------------------------------------ config, files


def test_config_validator_takes_one_mean_per_input_channel():
    base = {"arch": "nyud-fcn32s-color-d", "num_classes": 40, "width": 1.0}
    c = validate_config(dict(base, mean=[1, 2, 3, 4], std=[1, 1, 1, 2]), "f")
    assert config_inputs(c) == ("color", "depth") and c["mean"] == [1.0, 2.0, 3.0, 4.0]
    assert validate_config(dict(base, inputs=["color", "depth"]), "f")["inputs"] == ["color", "depth"]
    with pytest.raises(CheckpointError, match=r"mean must be 4 finite numbers .*\['color', 'depth'\]"):
        validate_config(dict(base, mean=[1, 2, 3]), "f")
    with pytest.raises(CheckpointError, match=r"inputs \['color', 'hha'\] do not fit nyud-fcn32s-color-d"):
        validate_config(dict(base, inputs=["color", "hha"]), "f")
    with pytest.raises(CheckpointError, match="unknown input modalities"):
        validate_config(dict(base, inputs=["color", "sonar"]), "f")
    for bad in ([[]], "color", [], ["color", "depth", "hha"]):  # a list of 1 or 2 names, nothing else
        with pytest.raises(CheckpointError, match="inputs must be a list of 1 or 2 modality names"):
            validate_config(dict(base, inputs=bad), "f")
    # Files of the VOC nets, written before the key existed, are colour images.
    voc = validate_config({"arch": "fcn8s", "num_classes": 21, "width": 1.0}, "f")
    assert "inputs" not in voc and config_inputs(voc) == ("color",)
    with pytest.raises(CheckpointError, match="mean must be 3"):
        validate_config({"arch": "fcn8s", "num_classes": 21, "width": 1.0, "mean": [1, 2, 3, 4]}, "f")


# -------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("arch", NYUD)
def test_preprocessing_per_modality_matches_nyud_layers(arch):
    pre = Preprocessor(model(arch).config, CPU)
    color = images(2, 9, 13)
    second = {"nyud-fcn32s-color-d": depths(2, 9, 13),
              "nyud-fcn32s-color-hha": images(2, 9, 13, seed=9)}.get(arch)  # fmt: skip
    got = pre(torch.from_numpy(color), None if second is None else torch.from_numpy(second))
    want = reference_input(color, second, arch)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * 255)


def test_depth_that_is_not_positive_is_refused_not_nan():
    pre = Preprocessor(model("nyud-fcn32s-color-d").config, CPU)
    d = torch.full((1, 5, 5), 2000.0)
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        d2 = d.clone()
        d2[0, 2, 3] = bad
        with pytest.raises(InputError, match="1 of 25 pixels that are <= 0 or not finite"):
            pre(torch.zeros(1, 5, 5, 3, dtype=torch.uint8), d2)


# --------------------------------------------------------------------------------- Segmenter, run()


def _segmenter(arch, backend="torch", **kw):
    return fastfcn.Segmenter(model(arch), backend=backend, device="cpu", precision="fp32", **kw)


@pytest.mark.parametrize("arch,keyword", [("nyud-fcn32s-color-d", "depth"), ("nyud-fcn32s-color-hha", "hha")])
def test_run_with_second_input_in_every_form(arch, keyword):
    seg = _segmenter(arch)
    make = depths if keyword == "depth" else (lambda n, h, w, seed=0: images(n, h, w, seed + 50))
    color, second = images(2, 21, 17), make(2, 21, 17)
    m = model(arch)
    with torch.no_grad():
        want = m(reference_input(color, second, arch))
    got = seg.run(color, "logits", **{keyword: second})
    assert got.shape == (2, 5, 21, 17)
    assert (got - want).abs().max() <= 1e-5 * (want.max() - want.min())
    one = seg.run(color[1], "logits", **{keyword: second[1]})
    torch.testing.assert_close(one, got[1], rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a list of mixed sizes, each with its own second input
    c2, s2 = images(1, 13, 11, seed=4), make(1, 13, 11, seed=4)
    outs = seg.run([color[0], c2[0]], "labels", **{keyword: [second[0], s2[0]]})
    assert [tuple(o.shape) for o in outs] == [(21, 17), (13, 11)]
    assert torch.equal(outs[0], got[0].argmax(0).to(torch.uint8))
    # preprocessed float input holds both modalities' channels
    pre = seg.run(reference_input(color, second, arch), "logits", preprocessed=True)
    assert (pre - want).abs().max() <= 1e-5 * (want.max() - want.min())
    # tiled: both modalities split alike
    tiled = seg.run(color[0], "logits", tile=(16, 16), overlap=8, **{keyword: second[0]})
    assert tiled.shape == (5, 21, 17)


def test_big_endian_arrays_are_read_by_value():
    # Raw big-endian arrays (a 16-bit PGM opened by PIL as I;16B and turned into an array, FITS,
    # np.fromfile(">u2")) hold the same millimetres: torch.from_numpy refused them.
    seg = _segmenter("nyud-fcn32s-color-d")
    color, d = images(1, 15, 12), depths(1, 15, 12)
    want = seg.run(color[0], "logits", depth=d[0])
    for dtype in (">u2", ">i4", ">f4"):
        torch.testing.assert_close(seg.run(color[0], "logits", depth=d[0].astype(dtype)), want, msg=dtype)
    x = reference_input(color, d, "nyud-fcn32s-color-d").numpy()
    pre = seg.run(x.astype(">f4"), "logits", preprocessed=True)
    torch.testing.assert_close(pre, seg.run(x, "logits", preprocessed=True), rtol=0, atol=0)


def test_depth_png_files(tmp_path):
    from PIL import Image

    seg = _segmenter("nyud-fcn32s-color-d")
    color, d = images(1, 15, 12), depths(1, 15, 12)
    Image.fromarray(color[0]).save(tmp_path / "img.png")
    Image.fromarray(d[0]).save(tmp_path / "depth.png")  # uint16 -> a 16-bit greyscale PNG
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    got = seg.run(tmp_path / "img.png", "logits", depth=tmp_path / "depth.png")
    torch.testing.assert_close(got, seg.run(color[0], "logits", depth=d[0]))
    Image.fromarray((d[0] // 40).astype(np.uint8)).save(tmp_path / "depth8.png")
    with pytest.raises(InputError, match="depth8.png: a depth image must be one channel of 16 or 32 bits"):
        seg.run(color[0], depth=tmp_path / "depth8.png")


def test_second_input_errors_say_what_is_expected():
    seg = _segmenter("nyud-fcn32s-color-d")
    color, d = images(2, 9, 9), depths(2, 9, 9)
    with pytest.raises(InputError, match=r"takes a second input, depth: run\(images, depth=depth_maps\)"):
        seg.run(color)
    with pytest.raises(InputError, match=r"takes a second input, depth: .*\(got hha=\)"):
        seg.run(color, hha=color)
    with pytest.raises(InputError, match=r"is \(2, 9, 8\) \(N, H, W\) but its images are \(2, 9, 9\)"):
        seg.run(color, depth=d[:, :, :8])
    with pytest.raises(InputError, match="must be a list as long"):
        seg.run([color[0], color[1]], depth=[d[0]])
    with pytest.raises(InputError, match="8-bit depth holds no millimetres"):
        seg.run(color, depth=d.astype(np.uint8))
    with pytest.raises(InputError, match="<= 0 or not finite"):
        seg.run(color, depth=np.zeros((2, 9, 9), np.uint16))
    with pytest.raises(InputError, match="preprocessed=True the float batch holds every modality"):
        seg.run(torch.zeros(2, 4, 9, 9) - 1, preprocessed=True, depth=d)
    with pytest.raises(InputError, match="a float batch is preprocessed input, all 4 channels"):
        seg.run(torch.zeros(2, 4, 9, 9) - 1, depth=d)
    with pytest.raises(StreamError, match=r"frame 0 is one ndarray; .* must be a pair \(image, depth\)"):
        next(iter(seg.stream([color[0]])))
    voc = fastfcn.Segmenter(models.build("fcn32s", width=W, num_classes=3).eval(), backend="torch",
                            device="cpu")  # fmt: skip
    with pytest.raises(InputError, match="fcn32s takes one input"):
        voc.run(color, depth=d)


def test_a_truncated_pil_depth_image_is_an_input_error(tmp_path):
    from PIL import Image

    path = tmp_path / "d.png"
    Image.fromarray(depths(1, 9, 9)[0].astype(np.uint16)).save(path)
    path.write_bytes(path.read_bytes()[:-40])  # the pixel data cut short: PIL fails only on load
    seg = _segmenter("nyud-fcn32s-color-d")
    with Image.open(path) as im:
        with pytest.raises(InputError, match="cannot be decoded"):
            seg.run(images(1, 9, 9)[0], depth=im)


# ------------------------------------------------------------------------------- dead zone, flops


def test_fused_late_fusion_skips_the_dead_zone_of_both_streams():
    m = model("nyud-fcn32s-color-hha")
    x = torch.randn(2, 6, 37, 29, generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        ref = m(x)
    on = create_backend("fused", m, CPU, "fp32")
    off = create_backend("fused", m, CPU, "fp32", skip_dead_zone=False)
    assert set(on.dead_zone) == {"color", "hha"}
    assert all(isinstance(r, DeadZoneForward) for r in on.dead_zone.values())
    assert [s.name for s in on.dead_zone["hha"].steps if hasattr(s, "name")][0] == "conv1_1hha"
    with torch.no_grad():
        a, b = on(x, "logits"), off(x, "logits")
    for got in (a, b):
        assert (got - ref).abs().max() <= 1e-4 * (ref.max() - ref.min())
    assert len(on.dead_zone["color"].cache) == len(on.dead_zone["hha"].cache) == 1


def test_cuda_backbone_install_covers_both_streams(monkeypatch):
    """The fused backend's CUDA convolutions (cuda_fast.install) go into every stream's convs and
    fc6; run here on the CPU with torch's eager candidates, as test_gpu_readiness does."""
    from fastfcn.runtime import cuda_fast

    monkeypatch.delattr(torch, "cudnn_convolution_relu", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # eager candidates only: the interpreter is slow
    m = models.build("nyud-fcn32s-color-hha", width=W, num_classes=5).eval().requires_grad_(False)
    keys = list(m.state_dict())
    x = torch.randn(1, 6, 30, 26) * 50
    with torch.inference_mode():
        want = m(x)
        done = cuda_fast.install(m)
        got = m(x)
    assert list(m.state_dict()) == keys
    assert {"fc6color", "fc6hha"} <= set(done) and sum(n.startswith("conv") for n in done) == 26
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_flops_skip_counts_both_streams():
    with torch.device("meta"):
        color, late = models.build("nyud-fcn32s-color").eval(), models.build("nyud-fcn32s-color-hha").eval()
    c, f = count_macs(color, (1, 3, 240, 320)), count_macs(late, (1, 6, 240, 320))
    # Two whole streams, one head: twice the colour net's work less one upscore.
    up = next(layer.macs for layer in c.layers if layer.name.startswith("upscore"))
    assert f.macs == 2 * c.macs - up
    assert f.computed_macs == 2 * c.computed_macs - up < f.macs


# ------------------------------------------------------------------------------------------- CLI


def test_segment_cli_matches_depth_files_by_name(tmp_path, capsys):
    from PIL import Image

    from fastfcn.cli import main

    m = model("nyud-fcn32s-color-d")
    ckpt = fastfcn.save(m, tmp_path / "colord.safetensors")
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "depth" / "sub").mkdir(parents=True)
    color, d = images(2, 19, 23), depths(2, 19, 23)
    for i, rel in enumerate(("img_5001", "sub/img_5002")):
        Image.fromarray(color[i]).save(tmp_path / "images" / f"{rel}.jpg", quality=100)
        Image.fromarray(d[i]).save(tmp_path / "depth" / f"{rel}.png")
    out = tmp_path / "out"
    args = ["segment", str(ckpt), str(tmp_path / "images"), "--recursive", "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--quiet", "--batch-size", "2"]  # fmt: skip
    assert main(args + ["--depth", str(tmp_path / "depth")]) == 0
    seg = _segmenter("nyud-fcn32s-color-d")
    for rel in ("img_5001", "sub/img_5002"):
        labels = np.asarray(Image.open(out / "labels" / f"{rel}.png"))
        img = np.array(Image.open(tmp_path / "images" / f"{rel}.jpg").convert("RGB"))
        dep = np.array(Image.open(tmp_path / "depth" / f"{rel}.png"), dtype=np.float32)
        assert np.array_equal(labels, seg.run(img, depth=dep).numpy()), rel
    # no --depth: refused before anything runs; a missing depth file: that image is skipped
    capsys.readouterr()
    assert main(args) == 1  # an InputError: one line on stderr, exit status 1
    assert "nyud-fcn32s-color-d takes color images and depth: pass --depth DIR" in capsys.readouterr().err
    (tmp_path / "depth" / "sub" / "img_5002.png").unlink()
    assert main(args + ["--depth", str(tmp_path / "depth")]) == 1
    assert "its depth file must be" in capsys.readouterr().err
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "color + depth" in text and "116.19, 97.203, 92.318, 7.844" in text


def test_exported_fusion_net_runs_with_its_second_input_in_onnxruntime(exported):
    """The exported graph keeps one input, the modalities concatenated (4 channels); the
    Segmenter reads the modalities from its metadata and feeds depth the same way."""
    pytest.importorskip("onnxruntime")
    m, path = exported("nyud-fcn32s-color-d")  # shared with test_export (one export per session)
    seg = fastfcn.Segmenter(path, device="cpu")
    assert seg.backend == "onnxruntime" and config_inputs(seg.config) == ("color", "depth")
    color, d = images(2, 17, 22, seed=8), depths(2, 17, 22, seed=8)
    with torch.no_grad():
        want = m(reference_input(color, d, "nyud-fcn32s-color-d"))
    got = seg.run(color, "logits", depth=d)
    assert got.shape == want.shape == (2, 40, 17, 22)
    assert (got - want).abs().max() <= 1e-5 * (want.max() - want.min())
    with pytest.raises(InputError, match="takes a second input, depth"):
        seg.run(color)


def test_crf_on_a_two_input_net_is_refused_when_built():
    pytest.importorskip("pydensecrf", reason="pydensecrf2 not installed (pip install fastfcn[crf])")
    with pytest.raises(ValueError, match="postprocess=.crf. reads one colour image; this nyud-fcn32s-color"):
        _segmenter("nyud-fcn32s-color-d", postprocess="crf")


def test_match_file_with_one_index_lists_each_folder_once(tmp_path, monkeypatch):
    """segment and eval pair many images with one StemIndex: each folder is listed once (listing
    it again per image is quadratic: 11.9 s for 3,000 images), with the same pairs and errors."""
    import os
    from pathlib import Path

    from fastfcn.paths import StemIndex, match_file

    img, depth = tmp_path / "img", tmp_path / "depth"
    for d in (img / "a", depth / "a"):
        d.mkdir(parents=True)
    names = [f"a/im{i}" for i in range(5)] + ["top"]
    for n in names:
        (img / f"{n}.jpg").touch()
        (depth / f"{n}.png").touch()
    (depth / "a" / "im4.tif").touch()  # two files for a/im4: ambiguous
    scans = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(Path(p)) or real(p))
    index = StemIndex()
    got = [match_file(img / f"{n}.jpg", img, depth, "depth", index) for n in names if n != "a/im4"]
    assert got == [depth / f"{n}.png" for n in names if n != "a/im4"]
    with pytest.raises(InputError, match=r"found several \(im4.png, im4.tif\)"):
        match_file(img / "a" / "im4.jpg", img, depth, "depth", index)
    with pytest.raises(InputError, match="found none"):
        match_file(img / "a" / "gone.jpg", img, depth, "depth", index)
    assert sorted(scans) == [depth, depth / "a"]  # each folder once for all seven lookups
