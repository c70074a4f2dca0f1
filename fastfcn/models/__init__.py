"""The model zoo: nn.Modules with the exact reference geometry.

    model = fastfcn.models.build("fcn8s", num_classes=21, width=1.0)
    logits = model(x)          # x: (N, 3, H, W) preprocessed -> (N, C, H, W)
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..config import ARCH_CLASS_NAMES, VOC_CLASSES, arch_inputs, voc_palette
from .common import SegmentationModel, fold_batchnorm
from .deconvnet import DeconvNet
from .dilated import DilatedNet
from .fcn import FCN, FCNAlexNet
from .googlenet import FCNGoogLeNet
from .multihead import SIFTFLOW_ARCHS, output_heads
from .nyud import NYUDFCN32s, NYUDLateFusion
from .pascalcontext import PASCAL_CONTEXT_ARCHS, PascalContextFCN
from .siftflow import SiftFlowFCN

_BUILDERS = {
    "fcn32s": lambda **kw: FCN("fcn32s", **kw),
    "fcn16s": lambda **kw: FCN("fcn16s", **kw),
    "fcn8s": lambda **kw: FCN("fcn8s", **kw),
    "fcn8s-atonce": lambda **kw: FCN("fcn8s-atonce", **kw),
    "fcn-alexnet": lambda **kw: FCNAlexNet(**kw),
    "deconvnet": lambda **kw: DeconvNet(**kw),
    "dilated-frontend": lambda **kw: DilatedNet(context=None, **kw),
    "dilated-context": lambda **kw: DilatedNet(**{"context": "large", **kw}),
    "fcn-googlenet": lambda **kw: FCNGoogLeNet(**kw),
    **{a: partial(SiftFlowFCN, a) for a in SIFTFLOW_ARCHS},
    **{a: partial(PascalContextFCN, a) for a in PASCAL_CONTEXT_ARCHS},
    "nyud-fcn32s-color": lambda **kw: NYUDFCN32s("nyud-fcn32s-color", **kw),
    "nyud-fcn32s-hha": lambda **kw: NYUDFCN32s("nyud-fcn32s-hha", **kw),
    "nyud-fcn32s-color-d": lambda **kw: NYUDFCN32s("nyud-fcn32s-color-d", **kw),
    "nyud-fcn32s-color-hha": lambda **kw: NYUDLateFusion(**kw),
}
# num_classes when build() is given none: the dataset's (config.ARCH_CLASS_NAMES: VOC 21; SIFT
# Flow 33 semantic + 3 geometric, both heads' channels; PASCAL-Context 59 + background).
DEFAULT_CLASSES = {a: len(ARCH_CLASS_NAMES.get(a, VOC_CLASSES)) for a in _BUILDERS}


def available() -> list[str]:
    """The architecture names `build` accepts."""
    return list(_BUILDERS)


def build(arch: str, num_classes: int | None = None, width: float = 1.0, **options) -> SegmentationModel:
    """Build an architecture by name (in train mode, like any new nn.Module).

    arch: one of available(); num_classes: None for the dataset's (DEFAULT_CLASSES: 21 for
    the VOC nets, 36 = 33 + 3 for SIFT Flow, 40 for NYUDv2, 60 for PASCAL-Context); width scales every
    channel count (1.0 is the paper's net); options: learnable_upsampling (FCN, FCN-GoogLeNet,
    dilated),
    dropout, context="basic" | "large" (dilated-context, default "large"), geometric_classes
    (SIFT Flow: the geometric head's share of num_classes, default 3).
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {available()}")
    if num_classes is None:
        num_classes = DEFAULT_CLASSES[arch]
    if arch == "dilated-context" and options.get("context", "large") is None:
        raise ValueError("dilated-context needs context='basic' or 'large'; use dilated-frontend for none")
    try:
        if num_classes is not None:
            options["num_classes"] = num_classes
        return _BUILDERS[arch](width=width, **options)
    except TypeError as e:
        raise ValueError(f"bad options for {arch}: {e}") from None


def input_modalities(arch: str) -> tuple[str, ...]:
    """The input modalities ``arch`` takes, in channel order (fastfcn.modalities): ("color",) for
    the VOC nets; NYUDv2: ("hha",), ("color", "depth"), ("color", "hha")."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {available()}")
    return arch_inputs(arch)


def parameter_count(model: nn.Module) -> int:
    """All parameters, fixed upsampling weights included."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DEFAULT_CLASSES", "FCN", "DeconvNet", "DilatedNet", "FCNAlexNet", "FCNGoogLeNet", "NYUDFCN32s",
    "NYUDLateFusion", "PascalContextFCN", "SegmentationModel", "SiftFlowFCN", "available", "build",
    "fold_batchnorm", "input_modalities", "output_heads", "parameter_count", "voc_palette",
]  # fmt: skip
