"""fastfcn.save / fastfcn.load: native round trips, the pytorch-fcn layout, caffemodels, bad files."""

from __future__ import annotations

import json
import os
import struct
import warnings

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorm

import fastfcn
from fastfcn.checkpoint import infer_arch, read_caffemodel
from fastfcn.errors import CheckpointError
from fastfcn.kernels.structure import bilinear_weight
from fastfcn.models import available, build

W = 0.125
C = 5


def _input(n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # Small odd sizes keep the forwards cheap: FCNs pad by 100, DeconvNet runs at >= 224
    # and the dilated nets add a 186 px margin anyway.
    return torch.randn(n, 3, 5, 7, generator=g) * 50


def _model(arch: str, seed: int = 0, width: float = W, num_classes: int = C, **options):
    torch.manual_seed(seed)
    # Non-trivial running statistics, so that losing them would show.
    return randomize_batchnorm(build(arch, num_classes=num_classes, width=width, **options).eval())


_MODELS: dict[str, torch.nn.Module] = {}


def cached(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = _model(arch)
    return _MODELS[arch]


def _out(m, x):
    with torch.no_grad():
        return m(x)


def assert_same_weights(a, b):
    """Every state dict entry equal, bit for bit (num_batches_tracked aside: Caffe has none)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    diff = [k for k in sa if not k.endswith("num_batches_tracked") and not torch.equal(sa[k], sb[k])]
    assert not diff, f"weights differ: {diff}"


# ------------------------------------------------------------------------------------ native round trip


@pytest.mark.parametrize("arch", available())
def test_safetensors_round_trip_every_arch(tmp_path, arch):
    m = cached(arch)
    names = [f"thing{i}" for i in range(C)]
    palette = [[i * 40, 255 - i * 40, 7] for i in range(C)]
    path = fastfcn.save(m, tmp_path / f"{arch}.safetensors", class_names=names, palette=palette,
                        mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0], color_order="RGB", input_scale=1.0,
                        dataset="synthetic")  # fmt: skip
    loaded = fastfcn.load(path)
    assert not loaded.training
    assert type(loaded) is type(m)
    expected = dict(m.config, class_names=names, palette=palette, mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0],
                    color_order="RGB", input_scale=1.0)  # fmt: skip
    got = dict(loaded.config)
    assert got.pop("meta") == {"dataset": "synthetic"}
    assert got == expected
    assert_same_weights(m, loaded)
    x = _input()
    # Same weights, same ops, same process: bit-identical.
    assert torch.equal(_out(m, x), _out(loaded, x))
    # The saving model's own config is untouched by the metadata overrides.
    assert m.config["class_names"] != names


@pytest.mark.parametrize("arch", ["fcn8s-atonce", "deconvnet"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_round_trip(tmp_path, arch, suffix):
    m = cached(arch)
    path = fastfcn.save(m, tmp_path / f"model{suffix}")
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "fastfcn" and obj["config"]["arch"] == arch
    loaded = fastfcn.load(path)
    assert loaded.config == m.config  # at-once survives: the config says so
    assert_same_weights(m, loaded)


def test_safetensors_metadata_is_json_under_one_key(tmp_path):
    from safetensors import safe_open

    path = fastfcn.save(cached("fcn32s"), tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert set(meta) == {"fastfcn"}
    cfg = json.loads(meta["fastfcn"])
    assert cfg["arch"] == "fcn32s" and cfg["num_classes"] == C and cfg["width"] == W
    assert cfg["fastfcn_version"] == fastfcn.__version__
    assert cfg["mean"] == pytest.approx([104.00698793, 116.66876762, 122.67891434])


def test_options_round_trip(tmp_path):
    m = _model("dilated-context", context="basic", learnable_upsampling=True)
    loaded = fastfcn.load(fastfcn.save(m, tmp_path / "m.safetensors"))
    assert loaded.config["options"]["context"] == "basic"
    assert loaded.upscore.weight.requires_grad
    assert loaded.ctx_conv1_1.weight.shape[0] == C  # "basic": the module was built as such
    assert_same_weights(m, loaded)


def test_map_location_and_unknown_suffix_sniffed(tmp_path):
    path = fastfcn.save(cached("fcn16s"), tmp_path / "m.safetensors")
    renamed = tmp_path / "m.weights"
    os.replace(path, renamed)
    loaded = fastfcn.load(renamed, map_location=torch.device("cpu"))
    assert next(loaded.parameters()).device.type == "cpu"
    assert loaded.config["arch"] == "fcn16s"


@pytest.mark.parametrize(
    "meta, problem",
    [
        ({"class_names": ["a", "b"]}, "class_names has 2 entries"),
        ({"class_names": [1, 2, 3, 4, 5]}, "list of strings"),
        ({"palette": [[0, 0, 0]] * 4}, "palette has 4 colours"),
        ({"palette": [[0, 0, 256]] * C}, "0..255"),
        ({"std": [1.0, 0.0, 1.0]}, "std must be positive"),
        ({"mean": [1.0, 2.0]}, "mean must be 3 finite numbers"),
        ({"mean": [1.0, float("nan"), 2.0]}, "mean must be 3 finite numbers"),
        ({"color_order": "GRB"}, "color_order"),
        ({"input_scale": 0}, "input_scale"),
        ({"arch": "fcn8s"}, "fixed by the model"),
        ({"num_classes": 3}, "fixed by the model"),
        ({"note": object()}, "JSON-serialisable"),
    ],
)
def test_save_validates_metadata(tmp_path, meta, problem):
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match=problem):
        fastfcn.save(cached("fcn32s"), path, **meta)
    assert not path.exists()


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    path = fastfcn.save(cached("fcn32s"), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        fastfcn.save(cached("fcn16s"), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_rejects_unknown_suffix_and_non_models(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint suffix"):
        fastfcn.save(cached("fcn32s"), tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match="fastfcn model"):
        fastfcn.save(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")


# ------------------------------------------------------------------------ pytorch-fcn layout (bare dicts)


@pytest.mark.parametrize("arch", available())
def test_infer_arch_from_keys(arch):
    expected = "fcn8s" if arch == "fcn8s-atonce" else arch  # same keys: documented default
    assert infer_arch(cached(arch).state_dict()) == expected


@pytest.mark.parametrize("arch", ["fcn32s", "fcn16s", "fcn8s", "fcn-alexnet", "deconvnet", "dilated-context"])
def test_bare_state_dict_infers_arch_classes_width(tmp_path, arch):
    m = cached(arch)
    path = tmp_path / "bare.pth"
    torch.save(m.state_dict(), path)
    loaded = fastfcn.load(path)
    assert (loaded.config["arch"], loaded.config["num_classes"], loaded.config["width"]) == (arch, C, W)
    assert_same_weights(m, loaded)


@pytest.mark.parametrize("width", [0.25, 0.1, 0.3])
def test_width_inference_for_uneven_widths(tmp_path, width):
    m = build("fcn32s", num_classes=3, width=width)
    path = tmp_path / "bare.pt"
    torch.save(m.state_dict(), path)
    loaded = fastfcn.load(path)
    assert loaded.config["width"] == pytest.approx(width, abs=0.01)
    assert_same_weights(m, loaded)


def test_bare_atonce_needs_arch(tmp_path):
    m = cached("fcn8s-atonce")
    path = tmp_path / "bare.pth"
    torch.save(m.state_dict(), path)
    x = _input()
    as_plain = fastfcn.load(path)
    assert as_plain.config["arch"] == "fcn8s"
    # The at-once scales change the forward, so the default really is a different net ...
    want = _out(m, x)
    assert not torch.allclose(_out(as_plain, x), want)
    # ... and arch= picks the right one.
    assert torch.equal(_out(fastfcn.load(path, arch="fcn8s-atonce"), x), want)


def _pytorch_fcn_dict(m, drop_upscore=False, prefix=""):
    sd = m.state_dict()
    if drop_upscore:
        sd = {k: v for k, v in sd.items() if not k.startswith("upscore")}
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_pytorch_fcn_layout_with_upscore(tmp_path, prefix):
    m = _model("fcn8s", seed=3)
    with torch.no_grad():  # learned, non-bilinear intermediate upsampling must be read, not defaulted
        m.upscore2.weight.normal_(0, 0.1)
    path = tmp_path / "fcn8s_from_port.pth"
    torch.save(_pytorch_fcn_dict(m, prefix=prefix), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is defaulted here, so no warning
        loaded = fastfcn.load(path)
    assert_same_weights(m, loaded)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_pytorch_fcn_layout_without_upscore_gets_bilinear(tmp_path, prefix):
    m = cached("fcn8s")  # fixed bilinear upsampling, so the defaults reproduce it
    path = tmp_path / "fcn8s_no_upscore.pth"
    torch.save(_pytorch_fcn_dict(m, drop_upscore=True, prefix=prefix), path)
    with pytest.warns(UserWarning, match="upscore2.weight.*bilinear"):
        loaded = fastfcn.load(path)
    assert torch.equal(loaded.upscore8.weight, bilinear_weight(C, 16))
    assert not loaded.upscore8.weight.requires_grad
    assert_same_weights(m, loaded)


def test_training_wrapper_dict(tmp_path):
    m = cached("fcn16s")
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": _pytorch_fcn_dict(m, prefix="module.")}, path)
    assert fastfcn.load(path).config["arch"] == "fcn16s"


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path):
    sd = cached("fcn8s").state_dict()
    sd = {k: v for k, v in sd.items() if k != "conv3_2.weight"}
    sd["extra_layer.weight"] = torch.zeros(3)
    sd["score_pool3.weight"] = torch.zeros(C, 7, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        fastfcn.load(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys: conv3_2.weight" in msg
    assert "unexpected keys: extra_layer.weight" in msg
    assert "wrong shapes: score_pool3.weight: file (5, 7, 1, 1) vs model (5, 32, 1, 1)" in msg
    # strict=False tolerates the key sets, never wrong shapes.
    with pytest.raises(CheckpointError, match="wrong shapes"):
        fastfcn.load(path, strict=False)
    del sd["score_pool3.weight"]
    torch.save(sd, path)
    loaded = fastfcn.load(path, strict=False)
    assert loaded.config["arch"] == "fcn8s"


def test_state_dict_of_another_arch(tmp_path):
    path = tmp_path / "fcn8s.pth"
    torch.save(cached("fcn8s").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not fit fcn32s.*unexpected keys: score_pool4.weight"):
        fastfcn.load(path, arch="fcn32s")
    with pytest.raises(CheckpointError, match=r"does not fit fcn-alexnet.*missing keys: conv1.weight"):
        fastfcn.load(path, arch="fcn-alexnet")
    path2 = tmp_path / "deconvnet.pth"
    torch.save(cached("deconvnet").state_dict(), path2)
    with pytest.raises(CheckpointError, match="no 'score_fr.weight'"):
        fastfcn.load(path2, arch="fcn8s")


def test_wrong_class_count(tmp_path):
    # The metadata says 21 classes; the tensors hold 5.
    m = cached("fcn16s")
    path = fastfcn.save(m, tmp_path / "m.safetensors")
    from safetensors.torch import load_file, save_file

    cfg = json.loads(_safetensors_meta(path)["fastfcn"])
    cfg.update(num_classes=21, class_names=None, palette=None)
    save_file(load_file(str(path)), str(path), metadata={"fastfcn": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match=r"num_classes=21.*wrong shapes: score_fr.weight: file \(5,"):
        fastfcn.load(path)
    # A bare dict whose score layers disagree on the class count.
    sd = dict(m.state_dict())
    sd["score_pool4.weight"] = torch.zeros(7, sd["score_pool4.weight"].shape[1], 1, 1)
    sd["score_pool4.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"score_pool4.weight: file \(7, 64, 1, 1\) vs model \(5, 64"):
        fastfcn.load(tmp_path / "bare.pth")


def _safetensors_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------- caffemodel
# A minimal protobuf encoder for NetParameter / LayerParameter / V1LayerParameter / BlobProto.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wt: int) -> bytes:
    return _varint(field << 3 | wt)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _blob(t: torch.Tensor, packed=True, legacy=False, packed_dims=True, double=False, shape=None) -> bytes:
    a = t.detach().numpy().astype(np.float64 if double else np.float32)
    dims = list(shape if shape is not None else a.shape)
    if legacy:
        dims = [1] * (4 - len(dims)) + dims
        out = b"".join(_key(f, 0) + _varint(d) for f, d in zip((1, 2, 3, 4), dims))
    elif packed_dims:
        out = _ld(7, _ld(1, b"".join(_varint(d) for d in dims)))
    else:
        out = _ld(7, b"".join(_key(1, 0) + _varint(d) for d in dims))
    flat = a.reshape(-1)
    if double:
        out += _ld(8, flat.astype("<f8").tobytes())
    elif packed:
        out += _ld(5, flat.astype("<f4").tobytes())
    else:
        out += b"".join(_key(5, 5) + struct.pack("<f", x) for x in flat.tolist())
    return out


def _layer(name: str, ltype: str, blobs: list[bytes]) -> bytes:
    # bottom/top strings and a convolution_param (field 106) that the reader must skip.
    extra = _ld(3, b"data") + _ld(4, name.encode()) + _ld(106, _key(1, 0) + _varint(64))
    return _ld(1, name.encode()) + _ld(2, ltype.encode()) + extra + b"".join(_ld(7, b) for b in blobs)


def _v1_layer(name: str, type_enum: int, blobs: list[bytes]) -> bytes:
    return _ld(2, b"data") + _ld(4, name.encode()) + _key(5, 0) + _varint(type_enum) + b"".join(
        _ld(6, b) for b in blobs
    )


def _v0_layer(name: str, ltype: str, blobs: list[bytes]) -> bytes:
    return _ld(1, _ld(1, name.encode()) + _ld(2, ltype.encode()) + b"".join(_ld(50, b) for b in blobs))


def _net(layers: list[bytes], v1=False) -> bytes:
    field = 2 if v1 else 100
    return _ld(1, b"FCN") + _ld(3, b"data") + b"".join(_ld(field, ly) for ly in layers)


def _caffe_fcn(m, v1: bool) -> bytes:
    """An FCN state dict as a caffemodel, varying the encodings across layers."""
    layers = [_layer("data", "Input", []) if not v1 else _v1_layer("data", 5, [])]
    for i, (name, mod) in enumerate(m.named_children()):
        if not hasattr(mod, "weight"):
            layers.append(_layer(name, "ReLU", []) if not v1 else _v1_layer(name, 18, []))
            continue
        small = mod.weight.numel() < 2000
        w_kwargs = {"packed": not small, "legacy": v1 and i % 2 == 0, "packed_dims": i % 3 != 0,
                    "double": name == "score_fr"}  # fmt: skip
        if name == "fc7":
            w_kwargs["shape"] = mod.weight.shape[:2]  # InnerProduct-shaped (out, in)
        blobs = [_blob(mod.weight, **w_kwargs)]
        if getattr(mod, "bias", None) is not None:
            # Legacy Caffe biases are (1, 1, 1, C).
            blobs.append(_blob(mod.bias, packed=i % 2 == 1, legacy=v1))
        ltype = "Deconvolution" if isinstance(mod, torch.nn.ConvTranspose2d) else "Convolution"
        if v1 and name == "conv1_1":
            layers.append(_v0_layer(name, "conv", blobs))
        elif v1:
            layers.append(_v1_layer(name, 39 if ltype == "Deconvolution" else 4, blobs))
        else:
            layers.append(_layer(name, ltype, blobs))
    layers.append(_layer("loss", "SoftmaxWithLoss", []) if not v1 else _v1_layer("loss", 21, []))
    return _net(layers, v1=v1)


@pytest.mark.parametrize("v1", [False, True], ids=["layer", "v1-layers"])
def test_caffemodel_fcn8s(tmp_path, v1):
    m = _model("fcn8s", seed=5)
    with torch.no_grad():
        m.upscore2.weight.normal_(0, 0.1)
    path = tmp_path / "fcn8s.caffemodel"
    path.write_bytes(_caffe_fcn(m, v1))
    layers = read_caffemodel(path)
    assert [ly.name for ly in layers][:2] == ["conv1_1", "conv1_2"]
    assert tuple(layers[0].blobs[0].shape) == (8, 3, 3, 3)
    loaded = fastfcn.load(path)
    assert (loaded.config["arch"], loaded.config["num_classes"], loaded.config["width"]) == ("fcn8s", C, W)
    assert_same_weights(m, loaded)
    assert fastfcn.load(path, arch="fcn8s-atonce").config["arch"] == "fcn8s-atonce"


def test_caffemodel_deconvnet_batchnorm_scale_and_dashes(tmp_path):
    m = cached("deconvnet")
    factor = 4.0  # a power of two keeps mean * factor / factor exact
    layers = []
    for name, mod in m.named_children():
        caffe = {"fc6_deconv": "fc6-deconv", "fc6_deconv_bn": "fc6-deconv-bn", "seg_score": "seg-score",
                 "bn6": "bnfc6", "bn7": "bnfc7"}.get(name, name)  # fmt: skip
        if isinstance(mod, torch.nn.BatchNorm2d):
            stats = [_blob(mod.running_mean * factor), _blob(mod.running_var * factor),
                     _blob(torch.tensor([factor]))]  # fmt: skip
            layers.append(_layer(caffe, "BatchNorm", stats))
            layers.append(_layer(f"scale_{caffe}", "Scale", [_blob(mod.weight), _blob(mod.bias)]))
        elif hasattr(mod, "weight"):
            ltype = "Deconvolution" if isinstance(mod, torch.nn.ConvTranspose2d) else "Convolution"
            layers.append(_layer(caffe, ltype, [_blob(mod.weight), _blob(mod.bias)]))
    path = tmp_path / "deconvnet.caffemodel"
    path.write_bytes(_net(layers))
    loaded = fastfcn.load(path)
    assert loaded.config["arch"] == "deconvnet"
    assert_same_weights(m, loaded)


def test_caffemodel_batchnorm_without_scale_is_identity_affine(tmp_path):
    from fastfcn.checkpoint import CaffeLayer, _caffe_state

    m = cached("deconvnet")
    mean, var = torch.arange(8.0), torch.full((8,), 3.0)
    layers = [
        CaffeLayer("bn1_1", "BatchNorm", [mean, var, torch.tensor([0.0])]),
        CaffeLayer("bn1_2", "BatchNorm", [mean * 2, var * 2, torch.tensor([2.0])]),
    ]
    st = _caffe_state(layers, m)
    # Caffe: a zero scale factor means "no statistics yet" and scales by 0.
    assert torch.equal(st["bn1_1.running_mean"], torch.zeros(8))
    assert torch.equal(st["bn1_2.running_mean"], mean) and torch.equal(st["bn1_2.running_var"], var)
    assert torch.equal(st["bn1_2.weight"], torch.ones(8)) and torch.equal(st["bn1_2.bias"], torch.zeros(8))


def test_caffemodel_unexpected_layer_is_named(tmp_path):
    m = cached("fcn32s")
    raw = _caffe_fcn(m, v1=False) + _ld(100, _layer("mystery", "Convolution", [_blob(torch.zeros(2, 2))]))
    path = tmp_path / "x.caffemodel"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="unexpected keys: mystery.weight"):
        fastfcn.load(path)


# --------------------------------------------------------------------------------------------- bad files


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


SUFFIXES = [".safetensors", ".pt", ".caffemodel"]


def test_missing_file(tmp_path):
    for s in SUFFIXES:
        p = tmp_path / f"nope{s}"
        with pytest.raises(CheckpointError, match=f"{p}: no such file"):
            fastfcn.load(p)
    with pytest.raises(CheckpointError, match="not a regular file"):
        fastfcn.load(tmp_path)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_file(tmp_path, suffix):
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{p}: the file is empty"):
        fastfcn.load(p)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("keep", [0.5, 0.999, 5 / 1e6])
def test_truncated_file(tmp_path, suffix, keep):
    m = cached("fcn32s")
    p = tmp_path / f"m{suffix}"
    if suffix == ".caffemodel":
        p.write_bytes(_caffe_fcn(m, v1=False))
    else:
        fastfcn.save(m, p)
    data = p.read_bytes()
    p.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=f"{p}: .*(truncated|not a|corrupt)"):
        fastfcn.load(p)


@pytest.mark.parametrize("suffix", SUFFIXES + [".pth", ".bin"])
def test_png_renamed(tmp_path, suffix):
    p = tmp_path / f"photo{suffix}"
    p.write_bytes(_png_bytes())
    with pytest.raises(CheckpointError, match=f"{p}: .*(not a|cannot tell)"):
        fastfcn.load(p)


def test_text_renamed_caffemodel(tmp_path):
    p = tmp_path / "deploy.caffemodel"
    p.write_bytes(b'name: "FCN"\nlayer { name: "conv1_1" type: "Convolution" }\n')
    with pytest.raises(CheckpointError, match=f"{p}: not a valid caffemodel"):
        fastfcn.load(p)


def test_safetensors_without_our_metadata_loads_as_bare(tmp_path):
    from safetensors.torch import save_file

    m = cached("fcn16s")
    p = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
    assert fastfcn.load(p).config["arch"] == "fcn16s"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="cannot infer the architecture.*pass arch="):
        fastfcn.load(p)


def test_corrupt_metadata(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2)}, str(p), metadata={"fastfcn": "{not json"})
    with pytest.raises(CheckpointError, match="corrupt fastfcn metadata"):
        fastfcn.load(p)
    save_file({"a": torch.zeros(2)}, str(p), metadata={"fastfcn": json.dumps({"arch": "resnet"})})
    with pytest.raises(CheckpointError, match="unknown arch 'resnet'"):
        fastfcn.load(p)


class _Payload:
    """Unpickling this object calls builtins.open(marker, "w"): it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_malicious_pickle_is_refused_without_running(tmp_path, suffix):
    marker = tmp_path / "pwned"
    p = tmp_path / f"evil{suffix}"
    sd = dict(cached("fcn32s").state_dict())
    sd["payload"] = _Payload(marker)
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=f"{p}: refused.*nothing from it was run"):
        fastfcn.load(p)
    assert not marker.exists()
    # No error message tells the user to switch the safety off.
    with pytest.raises(CheckpointError) as e:
        fastfcn.load(p)
    assert "weights_only" not in str(e.value)
    assert not marker.exists()
    # The payload is live: an unsafe load of the same file does create the marker,
    # so the assertions above can fail.
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_torch_file_holding_a_non_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        fastfcn.load(p)
    torch.save({"a": torch.zeros(1), "b": 3}, p)
    with pytest.raises(CheckpointError, match="entry 'b' is a int"):
        fastfcn.load(p)


def test_saved_file_has_the_usual_mode_not_mkstemps_0600(tmp_path):
    import stat

    umask = os.umask(0o022)
    try:
        path = fastfcn.save(_model("fcn32s"), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
