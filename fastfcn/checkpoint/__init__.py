"""Checkpoints: save and load fastfcn models.

    fastfcn.save(model, "fcn8s.safetensors", class_names=[...], palette=[...])
    model = fastfcn.load("fcn8s.safetensors")          # eval mode, model.config restored

Formats
- ``.safetensors`` (native): the state dict plus one metadata entry, ``"fastfcn"``,
  a JSON object with arch, num_classes, width, options, class_names, palette,
  color_order, mean, std, input_scale, the fastfcn version and user metadata.
- ``.pt`` / ``.pth``: read with ``torch.load(weights_only=True)`` only, so no
  pickled code ever runs. Either fastfcn's own dict
  ``{"format": "fastfcn", "config": {...}, "state_dict": {...}}`` or a bare state
  dict in the Caffe-named layout of the reference nets and of the pytorch-fcn
  port (``conv1_1.weight``, ..., ``score_fr.weight``, ``upscore2.weight``, ...;
  a DataParallel ``module.`` or torch.compile ``_orig_mod.`` prefix is stripped).
- ``.caffemodel``: the original Caffe weights, decoded from the protobuf wire
  format here (no protobuf dependency); blobs map to modules by layer name.

Bare state dicts and caffemodels carry no config: the arch is inferred from the
keys (``fcn8s`` / ``fcn16s`` / ``fcn32s`` / ``fcn-alexnet`` / ``deconvnet`` /
``dilated-frontend`` / ``dilated-context`` / ``fcn-googlenet`` / ``siftflow-*`` by the ``_sem`` layers;
``pascalcontext-*`` for a VOC-layout FCN with 60 classes: see ``arch.infer_arch``),
num_classes from the last score layer(s), width from the channel counts. FCN-8s and
FCN-8s at-once have the same keys and shapes (at-once differs only by constant scales in the forward): such
files load as ``fcn8s`` unless the file says otherwise (a torchfcn Trainer
checkpoint's ``arch``, voc-fcn8s-atonce's Scale layers in a caffemodel) or
``arch="fcn8s-atonce"`` is given. Preprocessing defaults (mean, BGR, 0..255) are
the reference nets', from ModelConfig.

Layout (one concern a module): ``safetensors_format`` and ``torch_format`` read and write
their format, ``caffe`` decodes .caffemodel files and maps their layers, ``arch`` infers what
a bare state dict is, ``state`` builds the model and loads tensors into it, ``store`` writes
files atomically and holds the size checks, ``classifier`` initialises an FCN from an ImageNet
classifier (``init_from_classifier``: the paper's net surgery); this module ties them into
``save`` and ``load``.
The config itself is ``fastfcn.config.ModelConfig`` (``model.config``).

Trust: every size a file claims is checked before anything is allocated (see
``load`` and ``fastfcn.config``), and every failure is one CheckpointError line
naming the file. tests/test_fuzz_loaders.py holds the loaders to that.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..config import ModelConfig, validate_config
from ..errors import BackendUnavailableError, CheckpointError
from .arch import _infer_config, _strip_prefix, infer_arch
from .caffe import CaffeLayer, _caffe_arch, _caffe_name, _caffe_probe, _caffe_state, read_caffemodel
from .classifier import SurgeryReport, init_from_classifier, is_classifier_file
from .safetensors_format import _read_safetensors, write_safetensors
from .state import _build, _load_state, _unwrap
from .store import (
    FORMAT_VERSION,
    META_KEY,
    MODEL_SLACK,
    _check_model_size,
    _tensor_bytes,
    atomic_write,
    save_target,
)
from .torch_format import _LEGACY_TORCH_MAGIC, _TORCH_SUFFIXES, _ZIP_MAGIC, _read_torch, write_torch

_CONFIG_KEYS = ("arch", "num_classes", "width", "options")
_OVERRIDABLE = ("class_names", "palette", "color_order", "mean", "std", "input_scale")


# ----------------------------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike, **meta) -> Path:
    """Save ``model`` (a fastfcn model, or one wrapped in DataParallel, DistributedDataParallel
    or torch.compile) to ``path``.

    The suffix picks the format: ``.safetensors`` (native) or ``.pt`` / ``.pth``
    (fastfcn's dict, loadable with ``weights_only=True``). ``meta`` overrides the
    model's ``class_names`` (num_classes strings), ``palette`` (num_classes
    [R, G, B] in 0..255), ``mean`` / ``std`` (3 numbers, std > 0),
    ``color_order`` ("RGB" | "BGR"), ``input_scale`` (> 0); any other key is
    stored as user metadata (JSON-serialisable) under ``config["meta"]``.
    The file is written to a temporary name and renamed, so a crash never leaves
    a half-written checkpoint under ``path`` (see ``atomic_write``); an existing file keeps
    its permissions. A symlink is followed: the file it points to is replaced and the link
    kept. A directory, or a parent path that is a file, is a CheckpointError. Returns the path.
    """
    path = Path(path)
    save_target(path)  # a directory or a parent that is a file: refused before any work
    model = _unwrap(model)
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path}: save needs a fastfcn model with a .config dict; got {type(model).__name__}"
        )
    config = _config_for_save(config, meta, path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        write_safetensors(path, tensors, config)
    elif suffix in _TORCH_SUFFIXES:
        write_torch(path, tensors, config)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors, .pt or .pth"
        )
    return path


def _config_for_save(config: Mapping, meta: dict, path: Path) -> dict:
    from .. import __version__

    for k in _CONFIG_KEYS:
        if k in meta:
            raise CheckpointError(f"{path}: {k!r} is fixed by the model and cannot be given as metadata")
    out = {k: config[k] for k in _CONFIG_KEYS}
    out["options"] = dict(out["options"])
    for k in _OVERRIDABLE:
        out[k] = meta.pop(k) if k in meta else config.get(k)
    user = dict(config.get("meta") or {})
    user.update(meta)
    out["meta"] = user
    out["fastfcn_version"] = __version__
    out["format_version"] = FORMAT_VERSION
    out = validate_config(out, path)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata must be JSON-serialisable ({e})") from None
    return out


# ----------------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike, arch: str | None = None, *, strict: bool = True, map_location="cpu"
) -> nn.Module:
    """Load a checkpoint and return the model in eval mode on ``map_location``.

    The model is built with ``fastfcn.models.build`` from the file's config (or,
    for bare state dicts and caffemodels, from what the keys tell: see the
    module docstring); ``arch`` overrides the file's arch (e.g. ``"fcn8s-atonce"``).
    ``model.config`` (a ModelConfig) holds the file's class names, palette and preprocessing.
    With ``strict=False`` missing and unexpected keys are tolerated, wrong
    shapes never are. Raises CheckpointError naming the file and the problem.

    Nothing is built before every size the file claims has been checked: the config
    (``fastfcn.config.validate_config``), zip members' sizes, and the bytes of the model
    the config describes against the tensor bytes the file holds (``MODEL_SLACK`` more at
    most; tensors stored narrower than float32 counted at float32), so loading takes about
    twice the file's tensor bytes (three times for a float16 file). Weights that are not finite
    as the model holds them (NaN, inf, a float64 beyond float32's range) or complex are
    refused with the tensor's name.
    ``path`` may also be a built-in model's name (``"demo"``, see fastfcn.zoo). A
    ``map_location`` that is no device (ValueError) or a CUDA device this machine lacks
    (BackendUnavailableError) is refused before the file is read.
    """
    _check_device(map_location)
    path = _regular_file(path)
    kind, state, config, hint, layers = _read(path)
    held = _tensor_bytes(state, path) if kind != "caffe" else sum(b.nbytes for ly in layers for b in ly.blobs)
    inferred = config is None  # a bare state dict or caffemodel: the reference defaults apply
    if inferred:
        config = _infer_config_or_explain(state, arch or hint, path)
    elif arch is not None:
        config = dict(config, arch=arch)
    config = validate_config(config, path)
    _check_model_size(config, held, path)
    model = _build(config, path)
    if kind == "caffe":
        state = _caffe_state(layers, model)
    _load_state(model, state, path, strict=strict, fill_upsampling=inferred)
    model.config = _with_file_settings(model.config, config)
    model.eval()
    return model.to(map_location)


def _infer_config_or_explain(state: dict, arch: str | None, path: Path) -> dict:
    """_infer_config; a file that fits no FCN because it is an ImageNet classifier says so."""
    try:
        return _infer_config(state, arch, path)
    except CheckpointError as e:
        if not is_classifier_file(path):
            raise
        raise CheckpointError(
            f"{e}. The file is an ImageNet classifier, not an FCN: build the FCN and call "
            "fastfcn.init_from_classifier(model, path), or give it to fastfcn train --init"
        ) from None


def _check_device(map_location) -> None:
    """``map_location`` must be a device the model can be moved to here (None: left on the CPU,
    as model.to(None) leaves it)."""
    import torch

    if map_location is None:
        return
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"map_location must be a device such as 'cpu' or 'cuda:0'; got {map_location!r}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise BackendUnavailableError(
                f"map_location {map_location!r} names a CUDA device, but this machine has {count} "
                "usable CUDA device(s); load with map_location='cpu'"
            )


def _regular_file(path) -> Path:
    """``path`` (or a built-in model's name) as an existing, non-empty regular file."""
    from ..zoo import resolve

    path = Path(resolve(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    return path


def _read(path: Path):
    """(kind, state, config or None, arch hint or None, caffe layers or None) of a file.

    The hint is an arch the file names outside its keys (torchfcn's "arch", Caffe Scale
    layers); a caffemodel's state holds one probe tensor a layer (see caffe._caffe_probe),
    mapped onto the model once it is built."""
    size = path.stat().st_size
    kind = _detect_format(path)
    config = hint = layers = None
    if kind == "safetensors":
        state, config = _read_safetensors(path, size)
    elif kind == "torch":
        state, config, hint = _read_torch(path, size)
    else:
        layers = read_caffemodel(path)
        hint = _caffe_arch(layers, path)
        state = {f"{_caffe_name(ly.name)}.weight": _caffe_probe(ly) for ly in layers}
    return kind, _strip_prefix(state), config, hint, layers


def _with_file_settings(model_config: ModelConfig, config: dict) -> ModelConfig:
    """The built model's config with the file's preprocessing, names, palette and user metadata
    (a key the file leaves out or null keeps the model's default)."""
    changes = {k: config[k] for k in _OVERRIDABLE if config.get(k) is not None}
    if config.get("meta"):
        changes["meta"] = config["meta"]
    return dataclasses.replace(model_config, **changes)


def _detect_format(path: Path) -> str:
    """The format by content where it has a signature (torch's zip and legacy pickle: any
    suffix, so ``checkpoint.pth.tar`` works), else by suffix, else by the safetensors shape."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head[:4] == _ZIP_MAGIC or head == _LEGACY_TORCH_MAGIC:
        return "torch"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix == ".caffemodel":
        return "caffe"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path}: cannot tell the checkpoint format from suffix {path.suffix!r} or content; "
        "expected .safetensors, .pt, .pth or .caffemodel"
    )


__all__ = [
    "FORMAT_VERSION", "META_KEY", "MODEL_SLACK", "CaffeLayer", "SurgeryReport", "atomic_write",
    "infer_arch", "init_from_classifier", "is_classifier_file", "load", "read_caffemodel", "save",
    "save_target",
]  # fmt: skip
