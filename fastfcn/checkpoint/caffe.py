"""Caffe .caffemodel files: the protobuf wire reader and the mapping of layers onto a model.

    layers = read_caffemodel("fcn8s-heavy-pascal.caffemodel")   # [CaffeLayer(name, type, blobs)]
    state = caffe_state(layers, model)                          # model's state-dict keys -> tensors

A .caffemodel is a serialised NetParameter (caffe.proto). Only these fields are read:
  NetParameter:      layer = 100 (LayerParameter), layers = 2 (V1LayerParameter, legacy)
  LayerParameter:    name = 1, type = 2 (string), blobs = 7
  V1LayerParameter:  layer = 1 (V0LayerParameter: name = 1, type = 2, blobs = 50), name = 4,
                     type = 5 (enum), blobs = 6
  BlobProto:         num/channels/height/width = 1..4 (legacy shape), data = 5 (float, packed or not),
                     shape = 7 (BlobShape: dim = 1, int64, packed or not), double_data = 8
Everything else (prototxt parameters, diffs, phase rules) is skipped by wire type; no protobuf
dependency.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

_V1_TYPES = {4: "Convolution", 39: "Deconvolution", 14: "InnerProduct"}


# The at-once FCN-8s's Scale layers (one fixed blob each) and the constant each must hold:
# they are fastfcn.heads' Tap.input_scale of "fcn8s-atonce", applied in the forward.
_ATONCE_SCALES = {"scale_pool4": 0.01, "scale_pool3": 0.0001}


# A blob dimension above this is no real weight (fc6 of a width-4 VGG FCN has 16384 rows).
_MAX_BLOB_DIM = 2**31 - 1


# Caffe names of the DeconvNet release whose module name differs by more than '-' -> '_'.
_CAFFE_ALIASES = {"bnfc6": "bn6", "bnfc7": "bn7", "ctx_upsample": "upscore"}


class CaffeLayer:
    """One layer with weights: name (as in the file), type, blobs: list of float32 tensors
    shaped as the file says ((N, C, H, W) for legacy blobs)."""

    def __init__(self, name: str, type: str, blobs: list[torch.Tensor]):
        self.name, self.type, self.blobs = name, type, blobs

    def __repr__(self) -> str:
        return f"CaffeLayer({self.name!r}, {self.type!r}, {[tuple(b.shape) for b in self.blobs]})"


class _WireError(Exception):
    pass


def _read_varint(byte_at, pos: int, where: str) -> tuple[int, int]:
    """A protobuf varint from ``byte_at(pos) -> int | None`` (None past the end of ``where``)."""
    result = shift = 0
    while True:
        b = byte_at(pos)
        if b is None:
            raise _WireError(f"a varint runs past the end of {where}")
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError("a varint is longer than 10 bytes")


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    return _read_varint(lambda p: buf[p] if p < end else None, pos, "its message")


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) of one message: int for varints,
    a memoryview for length-delimited and fixed 32/64-bit values."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _WireError("field number 0")
        if wt == 0:
            value, pos = _varint(buf, pos, end)
        elif wt == 1 or wt == 5:
            n = 8 if wt == 1 else 4
            if pos + n > end:
                raise _WireError("a fixed-size value runs past the end of its message")
            value, pos = buf[pos:pos + n], pos + n
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _WireError(f"a field of {n} bytes runs past the end of its message")
            value, pos = buf[pos:pos + n], pos + n
        else:
            # Groups (3, 4) are not used by caffe.proto; 6 and 7 do not exist.
            raise _WireError(f"wire type {wt} (field {field})")
        yield field, wt, value


def _stream_fields(f, size: int, wanted: tuple[int, ...]):
    """_fields over a whole file, read a field at a time: the length-delimited fields in
    ``wanted`` (layers) are read one at a time and everything else is skipped by seeking, so
    the file is never in memory at once (reading it whole put a 39 MiB caffemodel's
    load at a 2.5x peak of its tensor bytes)."""

    def byte_at(pos):  # the file is read in order: pos is always the next byte
        byte = f.read(1) if pos < size else b""
        return byte[0] if byte else None

    def varint(pos):
        return _read_varint(byte_at, pos, "the file")

    pos = 0
    while pos < size:
        key, pos = varint(pos)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise _WireError("field number 0")
        if wt == 0:
            _, pos = varint(pos)
            continue
        if wt == 1 or wt == 5:
            n = 8 if wt == 1 else 4
        elif wt == 2:
            n, pos = varint(pos)
        else:
            raise _WireError(f"wire type {wt} (field {field})")
        if pos + n > size:
            raise _WireError(f"a field of {n} bytes runs past the end of the file")
        if wt == 2 and field in wanted:
            yield field, wt, memoryview(f.read(n))
        else:
            f.seek(n, os.SEEK_CUR)
        pos += n


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos, len(buf))
        out.append(v)
    return out


def _decode_blob(buf: memoryview) -> torch.Tensor:
    """A BlobProto as a float32 tensor of the shape it declares (BlobShape, else legacy N/C/H/W)."""
    import numpy as np

    legacy, dims, chunks, dchunks = _blob_fields(buf)
    if chunks and dchunks:
        raise _WireError("a blob with both float and double data")
    # One copy (the tensor must not alias the file buffer), not a concatenation and then a cast:
    # two transient copies of fc6 took a 135 MiB caffemodel's read to 2.6x its size.
    src = chunks or dchunks
    if not src:
        data = np.zeros(0, np.float32)
    elif len(src) == 1:
        data = src[0].astype(np.float32)
    else:
        data = np.concatenate(src).astype(np.float32, copy=False)
    if dims is None and any(x is not None for x in legacy):
        dims = [x or 0 for x in legacy]
    if dims is None:
        dims = [data.size]
    if len(dims) > 8 or any(d > _MAX_BLOB_DIM for d in dims):
        raise _WireError(f"a blob of shape {tuple(dims)}: more than 8 dims or a dim over {_MAX_BLOB_DIM}")
    if math.prod(dims) != data.size:
        raise _WireError(f"a blob of shape {tuple(dims)} holds {data.size} values")
    return torch.from_numpy(data.reshape(dims))


def _blob_fields(buf: memoryview):
    """(legacy [num, channels, height, width], shape dims or None, float chunks, double chunks)
    of a BlobProto; the chunks are numpy views of ``buf``."""
    import numpy as np

    legacy = [None] * 4
    dims: list[int] | None = None
    chunks, dchunks = [], []
    for field, wt, v in _fields(buf):
        if field in (1, 2, 3, 4) and wt == 0:
            legacy[field - 1] = v
        elif field in (5, 8):
            # float data: packed (wire type 2) or one fixed32 each; double data: fixed64.
            size, fixed = (4, 5) if field == 5 else (8, 1)
            if wt not in (2, fixed) or len(v) % size:
                raise _WireError(f"blob data (field {field}) of wire type {wt}; expected whole "
                                 f"{'floats' if size == 4 else 'doubles'}")  # fmt: skip
            (chunks if field == 5 else dchunks).append(np.frombuffer(v, dtype=f"<f{size}"))
        elif field == 7 and wt == 2:
            dims = []
            for f2, wt2, d in _fields(v):
                if f2 == 1 and wt2 not in (0, 2):
                    raise _WireError(f"a blob dim of wire type {wt2}; expected a varint")
                if f2 == 1:
                    dims.extend(_packed_varints(d) if wt2 == 2 else [d])
    return legacy, dims, chunks, dchunks


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers with weights of a .caffemodel, in file order (new and V1/V0 layouts).

    Raises CheckpointError for files that are not a NetParameter or are cut short.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    with f:
        if size == 0:
            raise CheckpointError(f"{path}: the file is empty")
        return _read_layers(f, size, path)


def _read_layers(f, size: int, path: Path) -> list[CaffeLayer]:
    layers: list[CaffeLayer] = []
    try:
        for field, wt, v in _stream_fields(f, size, wanted=(2, 100)):
            layer = _decode_layer(field, v, len(layers)) if wt == 2 else None
            if layer is not None:
                _check_caffe_layer(layer)
                layers.append(layer)
    except _WireError as e:
        raise CheckpointError(
            f"{path}: not a valid caffemodel (truncated or corrupt protobuf: {e})"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if not layers:
        raise CheckpointError(
            f"{path}: no layers with weights found: not a caffemodel (a .prototxt holds no weights)"
        )
    return layers


def _decode_layer(field: int, v: memoryview, index: int) -> CaffeLayer | None:
    """One NetParameter layer (field 100) or legacy V1/V0 layer (field 2); None without blobs."""
    if field == 100:
        name_f, type_f, blob_f = 1, 2, 7
    else:
        name_f, type_f, blob_f = 4, 5, 6
        # V0 nets nest the real layer in field 1 of the V1 message.
        inner = [x for f, w, x in _fields(v) if f == 1 and w == 2]
        if inner:
            v, name_f, type_f, blob_f = inner[0], 1, 2, 50
    name, ltype, blobs = None, "", []
    for f, w, x in _fields(v):
        if f == name_f and w == 2:
            name = bytes(x).decode("utf-8", "replace")
        elif f == type_f and w == 2:
            ltype = bytes(x).decode("utf-8", "replace")
        elif f == type_f and w == 0:
            ltype = _V1_TYPES.get(x, f"V1:{x}")
        elif f == blob_f and w == 2:
            blobs.append(_decode_blob(x))
    return CaffeLayer(name or f"layer{index}", ltype, blobs) if blobs else None


def _check_caffe_layer(layer: CaffeLayer) -> None:
    b = layer.blobs
    if layer.type == "BatchNorm":
        if len(b) < 2 or b[0].numel() != b[1].numel() or (len(b) > 2 and b[2].numel() != 1):
            raise _WireError(
                f"BatchNorm layer {layer.name!r} has blobs {[tuple(x.shape) for x in b]}; expected "
                "mean (C), variance (C) and a scale factor (1)"
            )


def _caffe_arch(layers: list[CaffeLayer], path) -> str | None:
    """'fcn8s-atonce' when the file has the at-once net's Scale layers (whose constants are
    checked: the model applies 0.01 and 0.0001, a file with others would be silently wrong)."""
    found = {ly.name: ly for ly in layers if ly.type == "Scale" and ly.name in _ATONCE_SCALES}
    for name, ly in found.items():
        want = _ATONCE_SCALES[name]
        got = ly.blobs[0].reshape(-1).tolist() if ly.blobs[0].numel() <= 8 else ["..."]
        if len(got) != 1 or not math.isclose(got[0], want, rel_tol=1e-6):
            raise CheckpointError(
                f"{path}: Scale layer {name!r} holds {got}; fcn8s-atonce applies the constant {want:g}"
            )
    return "fcn8s-atonce" if found else None


def _caffe_name(name: str) -> str:
    name = name.replace("-", "_").replace("/", "_")
    return _CAFFE_ALIASES.get(name, name)


def _caffe_probe(layer: CaffeLayer) -> torch.Tensor:
    """The layer's weight with its output channels first, for inferring arch, classes and width.

    Legacy blobs put InnerProduct weights at (1, 1, out, in); the bias count is the
    output count in every layout.
    """
    w = layer.blobs[0]
    if len(layer.blobs) > 1 and layer.type != "BatchNorm":
        n = layer.blobs[1].numel()
        if n and w.numel() and w.numel() % n == 0 and w.shape[0] != n:
            return w.reshape(n, -1)
    return w


def _caffe_state(layers: list[CaffeLayer], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map Caffe layers onto ``model``'s state dict keys (shapes fitted by reshape where
    the element count matches: legacy 4-D biases, InnerProduct weights as 1x1 or kxk convs).

    Conv / Deconvolution / InnerProduct: blob 0 -> weight, blob 1 -> bias (Caffe
    Deconvolution and ConvTranspose2d share the (in, out, kh, kw) layout).
    BatchNorm: blobs mean, variance, scale factor -> running_mean / running_var
    (divided by the factor, as Caffe does); the Scale layer right after it gives
    weight and bias (gamma = 1, beta = 0 without one). A layer named like a
    BatchNorm module with other types (the "BN" layer of the DeconvNet/SegNet
    Caffe forks) gives scale, shift[, mean, variance].
    """
    modules = dict(model.named_modules())
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    last_bn = None
    for layer in layers:
        name, b = _caffe_name(layer.name), layer.blobs
        if layer.type == "BatchNorm":
            factor = float(b[2].reshape(-1)[0]) if len(b) > 2 and b[2].numel() else 1.0
            inv = 0.0 if factor == 0 else 1.0 / factor
            state[f"{name}.running_mean"] = b[0] * inv
            state[f"{name}.running_var"] = b[1] * inv
            state[f"{name}.weight"] = torch.ones(b[0].numel())
            state[f"{name}.bias"] = torch.zeros(b[0].numel())
            last_bn = name
            continue
        if layer.type == "Scale" and last_bn is None and layer.name in _ATONCE_SCALES:
            continue  # a constant of the at-once head, checked by _caffe_arch
        if layer.type == "Scale" and last_bn is not None:
            name = last_bn
        last_bn = None
        if layer.type == "Scale" or isinstance(modules.get(name), nn.BatchNorm2d):
            keys = ("weight", "bias", "running_mean", "running_var")
        else:
            keys = ("weight", "bias")
        for i, t in enumerate(b):
            state[f"{name}.{keys[i]}" if i < len(keys) else f"{name}.blob{i}"] = t
    for k, t in state.items():
        if k in own and t.shape != own[k].shape and t.numel() == own[k].numel():
            state[k] = t.reshape(own[k].shape)
    return state
