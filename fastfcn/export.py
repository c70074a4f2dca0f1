"""ONNX export of a model's reference forward.

    fastfcn.export_onnx("fcn8s.safetensors", "fcn8s.onnx")            # dynamic N, H, W
    meta = fastfcn.export.read_onnx_metadata("fcn8s.onnx")             # arch, mean, palette, ...

The graph has one input ``input``: float32 (N, 3, H, W), already preprocessed
(colour order, mean/std and scale from the metadata; a model of several input modalities,
NYUDv2 early / late fusion, takes them concatenated: (N, 4, H, W) / (N, 6, H, W), the
channel count the config's ``inputs`` give), and one output
``logits``: float32 (N, C, H, W). With ``dynamic=True`` (the default) N, H and W
are symbolic (``batch``, ``height``, ``width``) and the graph is correct at every
size, not only the traced one: it is exported with torch.export
(``torch.onnx.export(dynamo=True)``) on symbolic shapes, so the crop offsets,
DeconvNet's pad to a multiple of 32 and the dilated net's reflect padding are
shape arithmetic in the graph rather than constants of the traced size.

DeconvNet's max-unpooling: PyTorch's pooling indices are flat within each (N, C)
plane while ONNX MaxPool/MaxUnpool indices are flat over the whole N*C*H*W
tensor. The exporter emits MaxPool's indices converted to per-plane (a second
1x1 MaxPool supplies each plane's offset, which is subtracted) and the unpooling
as torch's own decomposition, a ScatterND into a zero map, so the graph contains
no ONNX MaxUnpool node at all: it agrees with PyTorch at every batch size and
size, and runs on providers that have no MaxUnpool kernel (ONNX Runtime's CUDA
provider has none).

The model's config (arch, classes, width, options, mean, std, colour order,
input scale, class names, palette) and the fastfcn version go into the ONNX
model's ``metadata_props`` (key ``fastfcn.config``, JSON, the same schema as a
checkpoint's), and the export settings under ``fastfcn.export``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, config_inputs, loads_json, validate_config
from .errors import CheckpointError, FastFCNError
from .modalities import input_channels

META_KEY = "fastfcn.config"
EXPORT_KEY = "fastfcn.export"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PRECISIONS = ("fp32", "fp16")
# Traced example for dynamic export: batch 2 and odd sides, because torch.export
# specialises a dimension whose example value is 0 or 1 and would freeze it, and DeconvNet
# needs sides over 224 so that its fc6 map (1x1 at 224) is not 1 at the traced size.
_TRACE_SHAPE = (2, 3, 259, 291)


class _Graph(nn.Module):
    """What is exported: float32 (N, 3, H, W) -> float32 (N, C, H, W) logits.

    For fp16 the weights and every layer run in float16; the casts at both ends
    keep the graph's interface float32, so callers feed and read the same dtype
    whatever the precision.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x.to(self.dtype))
        return y.float()


def _resolve_model(model_or_checkpoint, arch: str | None) -> nn.Module:
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    elif isinstance(model_or_checkpoint, (str, os.PathLike)):
        from .zoo import resolve

        src = Path(resolve(model_or_checkpoint))
        if src.suffix.lower() == ".onnx":
            raise CheckpointError(f"{src}: already an ONNX model; export needs a checkpoint or a model")
        from .checkpoint import load

        model = load(src, arch=arch)
    else:
        raise TypeError(
            "export_onnx needs a fastfcn model or a checkpoint path; got "
            f"{type(model_or_checkpoint).__name__}"
        )
    if not isinstance(getattr(model, "config", None), ModelConfig) or not hasattr(model, "set_impl"):
        raise TypeError(
            f"export_onnx needs a fastfcn model (from fastfcn.models); got {type(model).__name__}"
        )
    return model


def _config_json(model: nn.Module) -> str:
    from . import __version__

    config = model.config.to_dict()
    config["fastfcn_version"] = __version__
    return json.dumps(config, allow_nan=False)


@contextlib.contextmanager
def _quiet():
    # torch.export and onnxscript log per-node chatter (missing torchvision ops, empty
    # attribute lists) that says nothing about this model; real failures still raise.
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
             "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


_REGISTRIES: dict = {}


@contextlib.contextmanager
def _cached_registry():
    """Reuse torch.onnx's table of aten -> ONNX translations across exports in one process.

    torch.onnx rebuilds it from onnxscript on every call: 12.6 of 50 s in a profiled export
    of a width-0.125 FCN-32s. The table is read-only during export. Private API: when it is
    not there (other torch versions), exports simply run uncached.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    cls = _registration.ONNXRegistry
    original = cls.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def from_torchlib(klass, *args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in _REGISTRIES:
            _REGISTRIES[key] = original.__func__(klass, *args, **kwargs)
        return _REGISTRIES[key]

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _name_dims(model_proto, static: bool) -> None:
    """Give the graph's symbolic dims readable names: batch, height, width (input and output)."""
    if static:
        return
    inp = model_proto.graph.input[0].type.tensor_type.shape.dim
    rename = {inp[i].dim_param: name for i, name in ((0, "batch"), (2, "height"), (3, "width"))
              if inp[i].dim_param}

    def fix(value_info):
        for d in value_info.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]

    for vi in list(model_proto.graph.input) + list(model_proto.graph.value_info):
        fix(vi)
    out = model_proto.graph.output[0].type.tensor_type.shape.dim
    # The output's H and W are symbolic expressions of the input's (DeconvNet: a crop of the
    # padded map); they always equal the input's H and W.
    for i, name in ((0, "batch"), (2, "height"), (3, "width")):
        if not out[i].HasField("dim_value"):
            out[i].dim_param = name


def export_onnx(
    model_or_checkpoint,
    path: str | os.PathLike,
    *,
    dynamic: bool = True,
    opset: int | None = None,
    precision: str = "fp32",
    arch: str | None = None,
    input_size: tuple[int, int] = (500, 500),
    batch_size: int = 1,
) -> Path:
    """Export the reference forward of a model (or of a checkpoint file) to ONNX at ``path``.

    Graph: ``input`` float32 (N, 3, H, W), preprocessed -> ``logits`` float32 (N, C, H, W).
    dynamic: symbolic N, H, W (any size runs); False fixes them to ``batch_size`` x
    ``input_size`` = (H, W). opset: the ONNX opset (None: the exporter's default, 18 or later).
    precision: "fp32", or "fp16" (weights and compute float16, interface still float32; see
    the README for the measured agreement). arch: passed to ``fastfcn.load`` for checkpoints
    that do not record it. The model is not modified (a copy is exported, in eval mode).
    Returns the path. Raises FastFCNError when the exporter fails, with its reason.
    """
    import onnx

    from . import __version__

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(
            f"opset must be an int >= 18 (the torch.export-based exporter's minimum); got {opset!r}"
        )
    if not dynamic:
        if len(input_size) != 2 or any(int(v) != v or v < 1 for v in input_size) or batch_size < 1:
            raise ValueError(f"static export needs input_size (H, W) >= 1 and batch_size >= 1; "
                             f"got {input_size!r}, {batch_size!r}")
    path = Path(path)
    model = _resolve_model(model_or_checkpoint, arch)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    # A copy on the CPU, so the caller's model keeps its device, dtype, impl and train flag.
    graph_model = copy.deepcopy(model).to("cpu", dtype).eval().set_impl("reference")
    for p in graph_model.parameters():
        p.requires_grad_(False)
    wrapper = _Graph(graph_model, dtype).eval()
    channels = input_channels(config_inputs(model.config))
    if dynamic:
        example = torch.zeros(_TRACE_SHAPE[0], channels, *_TRACE_SHAPE[2:])
        auto = torch.export.Dim.AUTO
        dynamic_shapes = {"x": {0: auto, 2: auto, 3: auto}}
    else:
        example = torch.zeros(int(batch_size), channels, int(input_size[0]), int(input_size[1]))
        dynamic_shapes = None
    try:
        with _quiet(), _cached_registry(), torch.no_grad():
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as e:  # the exporter's own failures come in many types; keep the reason
        raise FastFCNError(
            f"ONNX export of {model.config.get('arch')} failed ({type(e).__name__}: {str(e).strip()[:500]})"
        ) from e
    proto = program.model_proto
    _name_dims(proto, static=not dynamic)
    meta = {p.key: p.value for p in proto.metadata_props}
    meta[META_KEY] = _config_json(model)
    static_shape = [int(batch_size), channels, int(input_size[0]), int(input_size[1])]
    meta[EXPORT_KEY] = json.dumps({
        "precision": precision, "dynamic": bool(dynamic),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "input": INPUT_NAME, "output": OUTPUT_NAME, "fastfcn_version": __version__,
        "input_shape": None if dynamic else static_shape,
    })
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name, proto.producer_version = "fastfcn", __version__
    onnx.checker.check_model(proto, full_check=False)
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return path


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The config an ONNX file exported by fastfcn carries, as a dict.

    Keys: those of ``model.config`` (arch, num_classes, width, options, mean, std,
    color_order, input_scale, class_names, palette), ``fastfcn_version``, and ``export``:
    {precision, dynamic, opset, input, output, input_shape}. The config goes through the
    checkpoints' validator (``fastfcn.config.validate_config``) and the graph's signature
    is checked against it: one float32 input (N, 3, H, W) and one float32 output
    (N, num_classes, H, W), with N, H, W symbolic when the export was dynamic and as
    recorded when it was not. Raises CheckpointError when the file is not ONNX, was not
    exported by fastfcn, or its metadata is invalid or does not describe its graph.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        # The weights are not needed: skip the external data and read the protobuf once.
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    _check_external_data(proto, path)
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise CheckpointError(
            f"{path}: no fastfcn metadata (metadata_props key {META_KEY!r}); export it with "
            "fastfcn.export_onnx or `fastfcn export` so preprocessing and classes are known"
        )
    config = loads_json(props[META_KEY], path)
    export = loads_json(props.get(EXPORT_KEY, "{}"), path, "fastfcn export metadata")
    if not isinstance(config, dict) or not isinstance(export, dict):
        raise CheckpointError(f"{path}: corrupt fastfcn metadata (not a JSON object)")
    version = config.pop("fastfcn_version", None)
    config = validate_config(config, path)
    export = _validate_export(export, path, input_channels(config_inputs(config)))
    _check_signature(proto.graph, config, export, path)
    if version is not None:
        config["fastfcn_version"] = str(version)
    config["export"] = export
    return config


def _graph_tensors(graph):
    """Every TensorProto of a graph or function: initializers (sparse ones' values and indices)
    and the tensors of node attributes (Constant), subgraphs (If, Loop) included."""
    yield from getattr(graph, "initializer", ())
    sparse = list(getattr(graph, "sparse_initializer", ()))
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                sparse.append(attr.sparse_tensor)
            sparse += attr.sparse_tensors
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_tensors(g)
    for sp in sparse:
        yield from (sp.values, sp.indices)


def _check_external_data(proto, path) -> None:
    """Refuse external data that lies outside the model's folder (an absolute path, or one that
    climbs out with ".."): the runtimes read whatever file the model names."""
    import itertools
    import posixpath

    for t in itertools.chain.from_iterable(_graph_tensors(g) for g in (proto.graph, *proto.functions)):
        if t.data_location != t.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        norm = posixpath.normpath(loc.replace("\\", "/"))
        if not loc or norm.startswith(("/", "../")) or norm == ".." or (len(loc) > 1 and loc[1] == ":"):
            raise CheckpointError(
                f"{path}: tensor {t.name!r} keeps its data in {loc!r}, outside the model's folder; "
                "expected a file name relative to the .onnx file's folder"
            )


def _validate_export(e: dict, path, channels: int = 3) -> dict:
    def bad(msg):
        raise CheckpointError(f"{path}: corrupt fastfcn export metadata ({msg})")

    if e.get("precision", "fp32") not in PRECISIONS:
        bad(f"precision must be one of {PRECISIONS}; got {e.get('precision')!r}")
    if not isinstance(e.get("dynamic", True), bool):
        bad(f"dynamic must be true or false; got {e.get('dynamic')!r}")
    for k in ("input", "output"):
        if k in e and not isinstance(e[k], str):
            bad(f"{k} must be a tensor name; got {e[k]!r}")
    op = e.get("opset")
    if op is not None and (isinstance(op, bool) or not isinstance(op, int) or not 1 <= op <= 1000):
        bad(f"opset must be an int; got {op!r}")
    shape = e.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 4 and shape[1] == channels
        and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 2**31 - 1 for d in shape)
    ):  # fmt: skip
        bad(f"input_shape must be [N, {channels}, H, W] with positive ints; got {shape!r}")
    if e.get("dynamic") is False and shape is None:
        bad("a static export must record its input_shape")
    return e


def _check_signature(graph, config: dict, export: dict, path) -> None:
    """The graph's one input and one output against what the metadata says."""
    import onnx

    weights = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in weights]
    outputs = list(graph.output)

    def bad(msg):
        raise CheckpointError(f"{path}: the graph does not match its fastfcn metadata: {msg}")

    if len(inputs) != 1 or len(outputs) != 1:
        bad(f"it has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")

    def dims(vi, what):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or t.elem_type != onnx.TensorProto.FLOAT:
            bad(f"{what} {vi.name!r} is not a float32 tensor")
        if not t.HasField("shape") or len(t.shape.dim) != 4:
            bad(f"{what} {vi.name!r} is not 4-D (N, C, H, W)")
        return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]

    n_in, c_in, h_in, w_in = dims(inputs[0], "input")
    n_out, c_out, h_out, w_out = dims(outputs[0], "output")
    for k, vi in (("input", inputs[0]), ("output", outputs[0])):
        if k in export and export[k] != vi.name:
            bad(f"the {k} is named {vi.name!r}; the metadata says {export[k]!r}")
    channels = input_channels(config_inputs(config))
    if c_in != channels:
        got = c_in if c_in is not None else "a symbolic number of"
        bad(f"the input has {got} channels; expected {channels} (inputs {config_inputs(config)})")
    if c_out != config["num_classes"]:
        got = c_out if c_out is not None else "a symbolic number of"
        bad(f"the output has {got} channels; the metadata says num_classes={config['num_classes']}")
    shape = export.get("input_shape")
    if export.get("dynamic") is True:
        fixed = [d for d in (n_in, h_in, w_in) if d is not None]
        if fixed:
            bad(f"the export is recorded as dynamic but the input has fixed dims {fixed}")
    elif export.get("dynamic") is False and [n_in, channels, h_in, w_in] != shape:
        bad(f"the input is {[n_in, c_in, h_in, w_in]}; the metadata says {shape}")
    for name, i, o in (("N", n_in, n_out), ("H", h_in, h_out), ("W", w_in, w_out)):
        if i is not None and o is not None and i != o:
            bad(f"the output's {name} is {o} for an input {name} of {i}; expected equal")


__all__ = ["export_onnx", "read_onnx_metadata"]
