"""Initialising an FCN from an ImageNet classifier: the paper's "net surgery".

    model = fastfcn.models.build("fcn32s", num_classes=21)
    report = fastfcn.init_from_classifier(model, "VGG_ILSVRC_16_layers.caffemodel")
    print(report.summary())   # copied 13 layers, reshaped 2 (fc6, fc7), skipped 1 (fc8), ...

The reference FCNs start from a classifier (fcn.berkeleyvision.org surgery.transplant): every
layer whose name the FCN shares is copied, the InnerProduct fc6 / fc7 are poured into the 7x7 /
1x1 convolutions of the same element count (the (out, C*H*W) rows flatten (C, H, W) in the
conv's order), what the FCN lacks (fc8, GoogLeNet's loss3/classifier and aux branches) is
dropped, the new score layers start at zero (the Caffe nets leave their weight_filler unset:
constant 0) and the upsampling deconvolutions bilinear. docs/facts.md ("ImageNet classifiers")
holds the layer names and shapes relied on here, with their sources.

Two kinds of file, told apart by content:
- a .caffemodel (``VGG_ILSVRC_16_layers``, ``bvlc_alexnet``, ``bvlc_googlenet``), read with
  ``checkpoint.caffe``; names map as for FCN files ('/' -> '_': ``loss3/classifier``).
- a torchvision state dict (.pth of ``torchvision.models.vgg16``: ``features.0.weight`` ...
  ``classifier.6.bias``), mapped by layer order onto the Caffe names. These are not the Caffe
  weights: torchvision's nets were trained on RGB in 0..1 normalised by the ImageNet mean
  (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), the Caffe nets on BGR 0..255 minus a
  mean. The model's config is therefore converted to that preprocessing (color_order RGB,
  input_scale 1, that mean and std), so inference and training feed the weights what they were
  trained on; the report says so. torchvision's ``alexnet`` is another net than bvlc_alexnet
  (64/192/384/256/256 channels, no groups, no LRN) and its ``googlenet`` has BatchNorm without
  conv biases and a 3x3 conv in the "5x5" branch: neither fits FCN-AlexNet / FCN-GoogLeNet, and
  both are refused with the Caffe file to use instead.

A file that does not fit (another net, another width) raises InputError naming the first layer
that differs and what the model expects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .caffe import _caffe_name, _fields, _stream_fields, _WireError, read_caffemodel
from .state import _all_finite, _check_real, _short, _unwrap, _upsampling_keys
from .torch_format import _LEGACY_TORCH_MAGIC, _ZIP_MAGIC, _torch_load_reason

# The 1000-way classifier layers (module names, '/' -> '_') of the three classifiers: never
# part of an FCN. A file holding one of them is a classifier (see is_classifier_file).
CLASSIFIER_OUTPUTS = ("fc8", "loss3_classifier")

# torchvision's ImageNet preprocessing (torchvision.models: ImageNet1K weights' transforms).
TORCHVISION_PREPROCESSING = {
    "color_order": "RGB", "input_scale": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
}  # fmt: skip

# torchvision.models.vgg16: the conv indices of ``features`` and the Linear indices of
# ``classifier``, in order, and the Caffe names they carry (VGG_ILSVRC_16_layers).
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_NAMES = tuple(f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1))
# torchvision.models.alexnet: features 0, 3, 6, 8, 10; classifier 1, 4, 6.
_ALEXNET_CONVS = (0, 3, 6, 8, 10)
_FC_NAMES = ("fc6", "fc7", "fc8")


@dataclass(frozen=True)
class SurgeryReport:
    """What ``init_from_classifier`` did, by layer (module) name.

    copied: layers whose weight and bias were copied as the file holds them; reshaped: layers
    filled from an InnerProduct of the same element count (fc6, fc7); skipped: file layers the
    FCN lacks (fc8, classifiers, aux branches); left_at_init: the model's layers with weights
    that the file does not give, of which ``zeroed`` (the score layers) were set to zero and
    ``bilinear`` (the upsampling deconvolutions) to the bilinear filter; the rest keep the
    model's own init (BatchNorm, DeconvNet's decoder, the dilated net's context). ``source``:
    "caffemodel" or "torchvision"; ``preprocessing``: the config changes made (torchvision)."""

    path: str
    source: str
    copied: tuple[str, ...]
    reshaped: tuple[str, ...]
    skipped: tuple[str, ...]
    left_at_init: tuple[str, ...]
    zeroed: tuple[str, ...]
    bilinear: tuple[str, ...]
    preprocessing: dict

    def summary(self) -> str:
        parts = [f"copied {len(self.copied)} layers"]
        for what, names in (("reshaped", self.reshaped), ("skipped", self.skipped)):
            if names:
                parts.append(f"{what} {len(names)} ({_short(list(names), 6)})")
        if self.left_at_init:
            left = _short(list(self.left_at_init), 6)
            parts.append(f"left {len(self.left_at_init)} at init ({left}; zeroed {len(self.zeroed)}, "
                         f"bilinear {len(self.bilinear)})")  # fmt: skip
        if self.preprocessing:
            parts.append("preprocessing set to torchvision's (RGB, 0..1, ImageNet mean/std)")
        return ", ".join(parts)


def init_from_classifier(model: nn.Module, path: str | os.PathLike) -> SurgeryReport:
    """Initialise ``model`` (a fastfcn model with an ImageNet backbone) in place from the
    classifier at ``path`` (.caffemodel or torchvision state dict); returns the report.

    Every file layer whose name the model shares is copied (weight, then bias) when the element
    counts match, InnerProduct weights reshaped into the conv (fc6: (4096, 512*7*7) -> (4096,
    512, 7, 7)); NYUDv2 late fusion's colour stream takes the names + "color". Raises InputError
    when no layer matches or a shared layer differs in size (the file is for another net or
    width), CheckpointError when the file cannot be read or holds NaN / inf; the model is left
    unchanged when it raises (every layer is checked before the first is copied).

    Cost: a 537 MB VGG16 caffemodel (V1 layout) into FCN-32s takes 3.5-4.1 s and 1.63 GiB peak
    RSS, the built model's 0.74 GiB included (AMD EPYC Zen 4, 2 cores, one thread): the file's
    0.5 GiB of tensors are decoded once, and fc6's 411 MB layer is briefly held twice, as bytes
    and as a tensor (checkpoint.caffe reads a layer at a time)."""
    path = Path(path)
    source, layers = read_classifier(path)
    model = _unwrap(model)
    modules = dict(model.named_modules())
    plan, skipped = [], []
    for name, blobs in layers.items():
        target = _target(modules, name)
        if target is None:
            skipped.append(name)
            continue
        plan.append((target, blobs, _fit(model, target, modules[target], blobs, path, source)))
    if not plan:
        raise InputError(
            f"{path}: no layer of this {source} matches {_what(model)}; expected a classifier with "
            f"its backbone's layer names ({_short(_weighted(modules), 6)}); the file has "
            f"{_short(list(layers), 6)}"
        )
    preprocessing = _preprocessing(model, source, path)
    copied, reshaped = [], []
    with torch.no_grad():
        for target, blobs, shaped in plan:
            m = modules[target]
            for param, blob in zip((m.weight, m.bias), blobs):
                param.copy_(blob.reshape(param.shape).to(param.dtype))
            (copied if not shaped else reshaped).append(target)
        done = {t for t, _, _ in plan}
        left = [n for n in _weighted(modules) if n not in done]
        zeroed, bilinear = _init_head(model, modules, left)
    if preprocessing:
        model.config = model.config.replace(**preprocessing)
    return SurgeryReport(str(path), source, tuple(copied), tuple(reshaped), tuple(skipped), tuple(left),
                         zeroed, bilinear, preprocessing)  # fmt: skip


def _what(model: nn.Module) -> str:
    c = getattr(model, "config", None)
    return f"{c['arch']} (width {c['width']:g})" if c is not None else type(model).__name__


def _weighted(modules: dict) -> list[str]:
    """Names of the modules with a weight of their own (convs, deconvs, BatchNorm)."""
    return [n for n, m in modules.items() if n and isinstance(getattr(m, "weight", None), torch.Tensor)]


def _target(modules: dict, name: str) -> str | None:
    for candidate in (name, name + "color"):
        m = modules.get(candidate)
        if type(m) is nn.Conv2d:  # the classifiers hold convs and InnerProducts only
            return candidate
    return None


def _fit(model, target: str, m: nn.Module, blobs: list[torch.Tensor], path, source: str) -> bool:
    """Whether the blobs need a reshape (an InnerProduct into a conv); InputError when their
    element counts differ from the module's weight and bias."""
    params = [m.weight] + ([m.bias] if m.bias is not None else [])
    if len(blobs) != len(params) or any(b.numel() != p.numel() for b, p in zip(blobs, params)):
        got = ", ".join(str(tuple(b.shape)) for b in blobs)
        want = ", ".join(str(tuple(p.shape)) for p in params)
        hint = _TORCHVISION_HINTS.get(source, "")
        raise InputError(
            f"{path}: layer {target!r} holds {got} but {_what(model)} expects {want}: the file is "
            f"a classifier of another net or width{hint}"
        )
    # Legacy Caffe blobs pad shapes with leading 1s ((1, 1, 1, C) biases): only a weight of
    # another shape once those are dropped (an InnerProduct's (out, in)) is a reshape.
    shape = tuple(blobs[0].shape)
    while len(shape) > m.weight.dim() and shape[0] == 1:
        shape = shape[1:]
    for b in blobs:
        _check_real(f"layer {target!r}", b, path)
    if not all(_all_finite(b, p.dtype) for b, p in zip(blobs, params)):
        raise CheckpointError(f"{path}: non-finite values (NaN or inf) in layer {target!r}; the weights "
                              "are corrupt")  # fmt: skip
    return shape != tuple(m.weight.shape)


_TORCHVISION_HINTS = {
    "torchvision alexnet": (
        " (torchvision's alexnet has 64/192/384/256/256 channels, no groups and no LRN: it is not "
        "bvlc_alexnet; FCN-AlexNet needs bvlc_alexnet.caffemodel)"
    ),
}


def _preprocessing(model: nn.Module, source: str, path) -> dict:
    """The config changes a torchvision file needs (none for a caffemodel: the Caffe nets take
    BGR 0..255 minus a mean, as the model's config already says)."""
    if not source.startswith("torchvision"):
        return {}
    inputs = tuple(getattr(model.config, "inputs", ("color",)) or ("color",))
    if inputs != ("color",):
        raise InputError(
            f"{path}: a torchvision classifier expects RGB 0..1 input normalised by the ImageNet "
            f"mean/std, which a net of inputs {list(inputs)} cannot be given; use the Caffe "
            "VGG_ILSVRC_16_layers.caffemodel (BGR 0..255 minus a mean) for this net"
        )
    return dict(TORCHVISION_PREPROCESSING)


def _init_head(model: nn.Module, modules: dict, left: list[str]) -> tuple[tuple, tuple]:
    """Score layers (the head's 1x1 convs named ``score*``) to zero, the upsampling
    deconvolutions to the bilinear filter, as the reference's net.py and surgery.interp do.
    Other head convs (DeconvNet's seg_score, the dilated net's final and its identity-initialised
    context) keep the model's init."""
    from ..kernels.structure import bilinear_weight

    zeroed = tuple(n for n in left if n in getattr(model, "head_convs", ()) and n.startswith("score"))
    for n in zeroed:
        nn.init.zeros_(modules[n].weight)
        if modules[n].bias is not None:
            nn.init.zeros_(modules[n].bias)
    ups = tuple(k.rsplit(".", 1)[0] for k in sorted(_upsampling_keys(model)))
    for n in ups:
        w = modules[n].weight
        w.copy_(bilinear_weight(w.shape[0], w.shape[-1], depthwise=modules[n].groups > 1, dtype=w.dtype))
    return zeroed, ups


# ------------------------------------------------------------------------------------ reading


def read_classifier(path: str | os.PathLike) -> tuple[str, dict[str, list[torch.Tensor]]]:
    """(source, {module name: [weight, bias]}) of a classifier file, in file order.

    source: "caffemodel", "torchvision vgg16" or "torchvision alexnet". CheckpointError when
    the file cannot be read, InputError for a torchvision net that fits no FCN here."""
    path = Path(path)
    if _is_torch(path):
        return _read_torchvision(path)
    # The classifiers hold Convolution and InnerProduct layers only; a layer the model has no
    # conv for is reported as skipped, whatever its type.
    return "caffemodel", {_caffe_name(ly.name): list(ly.blobs) for ly in read_caffemodel(path)}


def _is_torch(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    return head[:4] == _ZIP_MAGIC or head == _LEGACY_TORCH_MAGIC


def _load_torch(path: Path) -> dict:
    # Memory-mapped where torch can (a zip: torch.save since 1.6); the legacy format, which
    # torchvision's older weight files (vgg16-397923af.pth) are in, is read whole.
    with open(path, "rb") as f:
        mmap = f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read as a torch state dict: {_torch_load_reason(e)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict; got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


_FEATURE_CONV = re.compile(r"features\.(\d+)\.weight$")


def _read_torchvision(path: Path) -> tuple[str, dict[str, list[torch.Tensor]]]:
    state = _load_torch(path)
    if "inception3a.branch1.conv.weight" in state:
        raise InputError(
            f"{path}: torchvision's googlenet cannot initialise FCN-GoogLeNet: its convs have no "
            "bias but BatchNorm, and its '5x5' branch is a 3x3 conv; use bvlc_googlenet.caffemodel"
        )
    convs = sorted(int(m.group(1)) for k in state if (m := _FEATURE_CONV.match(k)) and state[k].dim() == 4)
    if any(k.startswith("features.") and k.endswith("running_mean") for k in state):
        raise InputError(f"{path}: a torchvision VGG with BatchNorm (vgg16_bn) fits no FCN here; "
                         "expected torchvision.models.vgg16 or a Caffe classifier")  # fmt: skip
    fcs = sorted({int(k.split(".")[1]) for k in state if re.match(r"classifier\.\d+\.weight$", k)})
    if tuple(convs) == _VGG16_CONVS and len(fcs) == 3:
        kind, names = "torchvision vgg16", _VGG16_NAMES
    elif tuple(convs) == _ALEXNET_CONVS and len(fcs) == 3:
        kind, names = "torchvision alexnet", tuple(f"conv{i}" for i in range(1, 6))
    else:
        raise InputError(
            f"{path}: not a torchvision vgg16 or alexnet state dict (features convs {convs}, "
            f"classifier linears {fcs}); expected keys features.0.weight ... classifier.6.bias"
        )
    out = {n: [state[f"features.{i}.weight"], state[f"features.{i}.bias"]] for n, i in zip(names, convs)}
    for n, i in zip(_FC_NAMES, fcs):
        out[n] = [state[f"classifier.{i}.weight"], state[f"classifier.{i}.bias"]]
    return kind, out


def is_classifier_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an ImageNet classifier rather than an FCN, by content: a torch
    file with torchvision's ``features.*`` / ``inception*`` keys, or a caffemodel with a 1000-way
    classifier layer (fc8, loss3/classifier) and no score layer. A file neither reader can
    parse is no classifier (fastfcn.load then says what is wrong with it)."""
    path = Path(path)
    if _is_torch(path):
        try:
            keys = _load_torch(path).keys()
        except CheckpointError:
            return False
        return "features.0.weight" in keys or "inception3a.branch1.conv.weight" in keys
    try:
        names = _caffe_layer_names(path)
    except (_WireError, OSError):
        return False
    return any(n in CLASSIFIER_OUTPUTS for n in names) and not any(n.startswith("score") for n in names)


def _caffe_layer_names(path: Path) -> list[str]:
    """The module names of a caffemodel's layers, without decoding a blob: 0.29 s for a 537 MB
    VGG16 file (page-cached, Zen 4), against 3.5 s for the full read that init_from_classifier
    then does once."""
    names = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        for field, _, v in _stream_fields(f, size, wanted=(2, 100)):
            name_f = 1 if field == 100 else 4
            if field == 2:
                inner = [x for fi, w, x in _fields(v) if fi == 1 and w == 2]
                if inner:
                    v, name_f = inner[0], 1
            for fi, w, x in _fields(v):
                if fi == name_f and w == 2:
                    names.append(_caffe_name(bytes(x).decode("utf-8", "replace")))
                    break
    return names
