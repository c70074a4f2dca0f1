"""Helpers shared by the test files (tests/ is on sys.path under pytest's default import mode)."""

import struct

import numpy as np
import torch


def cpu_twin_available() -> bool:
    """Whether the C++ twins (fastfcn.kernels.cpu) are built and loadable here."""
    return cpu_twin_problem() is None


def cpu_twin_problem() -> str | None:
    """Why the C++ twins cannot be used here, or None when they can."""
    try:
        from fastfcn.kernels import cpu

        return None if cpu.available() else "fastfcn.kernels.cpu.available() is False"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@torch.no_grad()
def randomize_batchnorm(model, mean=0.5, var=(0.5, 2.0), weight=(0.5, 1.5), bias=0.2, affine=True):
    """Give every BatchNorm2d non-trivial statistics (uniform in the given ranges), so that
    losing, mis-folding or mis-exporting them shows. Returns the model."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-mean, mean)
            mod.running_var.uniform_(*var)
            if affine:
                mod.weight.uniform_(*weight)
                mod.bias.uniform_(-bias, bias)
    return model


@torch.no_grad()
def rgbd_net(arch: str, width: float = 1 / 16, num_classes: int = 5):
    """A width-reduced NYUDv2 fusion net (nyud-fcn32s-color-d / -color-hha) whose labels depend
    on both inputs, for tests of pairing: He-initialised convolutions with zero biases (the
    default init's labels are one class whatever the input), the depth channel's conv1_1 weights
    x30 (log depth spans a few units, colour minus its mean about a hundred). On 8 random 24x32
    frames, giving each frame its neighbour's second input changed the labels of 5 (depth) and
    6 (HHA), its neighbour's colour 7 and 5 (measured on the CPU, torch backend, fp32)."""
    from fastfcn import models

    torch.manual_seed(sum(map(ord, arch)))
    model = models.build(arch, width=width, num_classes=num_classes).eval()
    for name, p in model.named_parameters():
        if name.startswith("upscore"):
            continue  # the fixed bilinear upsampling
        if p.dim() == 4:
            torch.nn.init.kaiming_normal_(p)
        else:
            p.zero_()
    if arch == "nyud-fcn32s-color-d":
        model.conv1_1_bgrd.weight[:, 3] *= 30
    return model


# .caffemodel bytes for tests: a minimal protobuf encoder for NetParameter, LayerParameter,
# V1LayerParameter and BlobProto.


def pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_key(field: int, wt: int) -> bytes:
    return pb_varint(field << 3 | wt)


def pb_ld(field: int, payload: bytes) -> bytes:
    return pb_key(field, 2) + pb_varint(len(payload)) + payload


def caffe_blob(
    t: torch.Tensor, packed=True, legacy=False, packed_dims=True, double=False, shape=None
) -> bytes:
    a = t.detach().numpy().astype(np.float64 if double else np.float32)
    dims = list(shape if shape is not None else a.shape)
    if legacy:
        dims = [1] * (4 - len(dims)) + dims
        out = b"".join(pb_key(f, 0) + pb_varint(d) for f, d in zip((1, 2, 3, 4), dims))
    elif packed_dims:
        out = pb_ld(7, pb_ld(1, b"".join(pb_varint(d) for d in dims)))
    else:
        out = pb_ld(7, b"".join(pb_key(1, 0) + pb_varint(d) for d in dims))
    flat = a.reshape(-1)
    if double:
        out += pb_ld(8, flat.astype("<f8").tobytes())
    elif packed:
        out += pb_ld(5, flat.astype("<f4").tobytes())
    else:
        out += b"".join(pb_key(5, 5) + struct.pack("<f", x) for x in flat.tolist())
    return out


def caffe_layer(name: str, ltype: str, blobs: list[bytes]) -> bytes:
    # bottom/top strings and a convolution_param (field 106) that the reader must skip.
    extra = pb_ld(3, b"data") + pb_ld(4, name.encode()) + pb_ld(106, pb_key(1, 0) + pb_varint(64))
    return pb_ld(1, name.encode()) + pb_ld(2, ltype.encode()) + extra + b"".join(pb_ld(7, b) for b in blobs)


def caffe_v1_layer(name: str, type_enum: int, blobs: list[bytes]) -> bytes:
    return (
        pb_ld(2, b"data")
        + pb_ld(4, name.encode())
        + pb_key(5, 0)
        + pb_varint(type_enum)
        + b"".join(pb_ld(6, b) for b in blobs)
    )


def caffe_v0_layer(name: str, ltype: str, blobs: list[bytes]) -> bytes:
    return pb_ld(
        1, pb_ld(1, name.encode()) + pb_ld(2, ltype.encode()) + b"".join(pb_ld(50, b) for b in blobs)
    )


def caffe_net(layers: list[bytes], v1=False) -> bytes:
    field = 2 if v1 else 100
    return pb_ld(1, b"FCN") + pb_ld(3, b"data") + b"".join(pb_ld(field, ly) for ly in layers)


def caffe_fcn(m, v1: bool) -> bytes:
    """An FCN state dict as a caffemodel, varying the encodings across layers."""
    layers = [caffe_layer("data", "Input", []) if not v1 else caffe_v1_layer("data", 5, [])]
    for i, (name, mod) in enumerate(m.named_children()):
        if not hasattr(mod, "weight"):
            layers.append(caffe_layer(name, "ReLU", []) if not v1 else caffe_v1_layer(name, 18, []))
            continue
        small = mod.weight.numel() < 2000
        w_kwargs = {"packed": not small, "legacy": v1 and i % 2 == 0, "packed_dims": i % 3 != 0,
                    "double": name == "score_fr"}  # fmt: skip
        if name == "fc7":
            w_kwargs["shape"] = mod.weight.shape[:2]  # InnerProduct-shaped (out, in)
        blobs = [caffe_blob(mod.weight, **w_kwargs)]
        if getattr(mod, "bias", None) is not None:
            # Legacy Caffe biases are (1, 1, 1, C).
            blobs.append(caffe_blob(mod.bias, packed=i % 2 == 1, legacy=v1))
        ltype = "Deconvolution" if isinstance(mod, torch.nn.ConvTranspose2d) else "Convolution"
        if v1 and name == "conv1_1":
            layers.append(caffe_v0_layer(name, "conv", blobs))
        elif v1:
            layers.append(caffe_v1_layer(name, 39 if ltype == "Deconvolution" else 4, blobs))
        else:
            layers.append(caffe_layer(name, ltype, blobs))
    layers.append(caffe_layer("loss", "SoftmaxWithLoss", []) if not v1 else caffe_v1_layer("loss", 21, []))
    return caffe_net(layers, v1=v1)


def tiny_onnx(path, config, *, channels=None, stride=1, input_dims=None, output_dims=None, export=None):
    """A one-node fastfcn-style ONNX file: ``input`` float32 (N, 3, H, W) -> 1x1 conv ->
    ``logits`` (N, channels, H / stride, W / stride), with ``config`` (a dict, or raw text)
    under ``fastfcn.config`` and ``export`` (dict or text) under ``fastfcn.export``.
    input_dims / output_dims override the declared shapes (default: symbolic N, H, W)."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = channels if channels is not None else config["num_classes"]
    w = numpy_helper.from_array(np.linspace(-1, 1, c * 3, dtype=np.float32).reshape(c, 3, 1, 1), "w")
    node = helper.make_node("Conv", ["input", "w"], ["logits"], strides=[stride, stride])
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                        input_dims or ["batch", 3, "height", "width"])  # fmt: skip
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                        output_dims or ["batch", c, "height", "width"])  # fmt: skip
    model = helper.make_model(helper.make_graph([node], "g", [inp], [out], [w]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    model.ir_version = 8
    if export is None:
        export = {"precision": "fp32", "dynamic": True, "opset": 18, "input": "input", "output": "logits",
                  "input_shape": None}  # fmt: skip
    for key, value in (("fastfcn.config", config), ("fastfcn.export", export)):
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(model, str(path))
    return path


EXPORT_WIDTH = 0.125


def export_model(arch: str, width: float = EXPORT_WIDTH):
    """The seeded model the ONNX tests export: width 0.125, seed 0, eval mode; DeconvNet with
    non-trivial BatchNorm statistics, so that the exported BatchNorm is really tested."""
    from fastfcn import models

    torch.manual_seed(0)
    m = models.build(arch, width=width).eval()
    if arch == "deconvnet":
        randomize_batchnorm(m, affine=False)
    return m
