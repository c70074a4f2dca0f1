"""What a bare state dict is: its arch, class count and width, read from the Caffe-named keys.

    infer_arch(state)                       # "fcn8s", "deconvnet", ... or None
    infer_config(state, None, path)         # {"arch", "num_classes", "width", "options"}

FCN-8s and FCN-8s at-once share every key and shape (at-once differs only by constant scales
in the forward): infer_arch returns "fcn8s" for both; the loader takes the file's hint or the
caller's ``arch=``. SIFT Flow nets by their ``_sem`` / ``_geo`` layers; PASCAL-Context nets by
their 60 classes on the VOC keys (see infer_arch).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import PASCAL_CONTEXT_CLASSES
from ..errors import CheckpointError
from .state import _short

# DataParallel / DistributedDataParallel save every key under "module.", torch.compile's wrapper
# under "_orig_mod."; either may wrap the other.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefix(state: dict) -> dict:
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape(state: dict, key: str, dim: int = 0) -> int | None:
    v = state.get(key)
    return int(v.shape[dim]) if isinstance(v, torch.Tensor) and v.dim() > dim else None


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The arch a Caffe-named state dict belongs to, or None if the keys do not tell.

    fcn8s and fcn8s-atonce share every key; this returns "fcn8s" for both. SIFT Flow nets are
    told by their ``_sem`` / ``_geo`` head layers. PASCAL-Context nets have the VOC nets' keys:
    a VOC-layout FCN-32s/16s/8s whose score_fr has exactly 60 outputs (PASCAL-Context's 59
    classes + background) is taken as ``pascalcontext-*`` (the same network either way; the
    name only records the dataset and gives its class names); any other count stays VOC.
    A config in the file, or ``arch=``, always wins over this guess.
    """
    from ..models.nyud import ARCH_KEYS

    keys = {k.rsplit(".", 1)[0] for k in state}
    for key, nyud_arch in ARCH_KEYS.items():  # early / late fusion's own layer names
        if key in keys:
            return nyud_arch
    if "conv1_7x7_s2" in keys or "inception_5b_1x1" in keys:
        return "fcn-googlenet"
    if "score_fr_sem" in keys or "score_fr_geo" in keys:
        if "score_pool3_sem" in keys or "upscore8_sem" in keys or "upscore_pool4_sem" in keys:
            return "siftflow-fcn8s"
        if "score_pool4_sem" in keys or "upscore16_sem" in keys:
            return "siftflow-fcn16s"
        return "siftflow-fcn32s"
    arch = _infer_voc_arch(keys)
    # PASCAL-Context's class count (59 + background): a bare VOC-layout FCN with it is taken as one.
    classes = _shape(state, "score_fr.weight")
    if arch in ("fcn32s", "fcn16s", "fcn8s") and classes == len(PASCAL_CONTEXT_CLASSES):
        return f"pascalcontext-{arch}"
    return arch



def _infer_voc_arch(keys: set[str]) -> str | None:
    """infer_arch of the one-headed families, by layer names only."""
    if "seg_score" in keys or "fc6_deconv" in keys:
        return "deconvnet"
    if "final" in keys and "conv1_1" in keys:
        return "dilated-context" if any(k.startswith("ctx_") for k in keys) else "dilated-frontend"
    if "score_fr" in keys or "fc7" in keys:
        if "conv1" in keys and "conv1_1" not in keys:
            return "fcn-alexnet"
        if "score_pool3" in keys or "upscore8" in keys or "upscore_pool4" in keys:
            return "fcn8s"
        if "score_pool4" in keys or "upscore16" in keys:
            return "fcn16s"
        if "conv1_1" in keys:
            return "fcn32s"
    return None


def _infer_config(state: dict, arch: str | None, path) -> dict:
    from ..models import available

    guessed = infer_arch(state)
    if arch is None:
        if guessed is None:
            raise CheckpointError(
                f"{path}: cannot infer the architecture from the keys "
                f"(first keys: {sorted(state)[:6]}); pass arch= one of {available()}"
            )
        arch = guessed
    if arch not in available():
        raise CheckpointError(f"{path}: unknown arch {arch!r}; expected one of {available()}")
    score = {"deconvnet": "seg_score.weight", "dilated-frontend": "final.weight",
             "dilated-context": "final.weight"}.get(arch, "score_fr.weight")  # fmt: skip
    options: dict = {}
    if arch.startswith("siftflow-"):
        # Both heads' channels; the geometric head's share goes to the options (models/multihead.py).
        score, geo = "score_fr_sem.weight", _shape(state, "score_fr_geo.weight")
        if geo is None:
            raise CheckpointError(f"{path}: no 'score_fr_geo.weight' to take the geometric class count "
                                  f"from (arch {arch}); keys: {_short(sorted(state))}")  # fmt: skip
        options["geometric_classes"] = geo
    from ..models.nyud import ARCHS as NYUD_ARCHS
    from ..models.nyud import score_layer

    if arch in NYUD_ARCHS:
        score = f"{score_layer(arch)}.weight"
    num_classes = _shape(state, score)
    if num_classes is None:
        raise CheckpointError(f"{path}: no {score!r} to take the class count from (arch {arch}); keys: "
                              f"{_short(sorted(state))}")  # fmt: skip
    num_classes += options.get("geometric_classes", 0)
    if arch == "dilated-context":
        c = _shape(state, "ctx_conv1_1.weight")
        options["context"] = "basic" if c == num_classes else "large"
    return {"arch": arch, "num_classes": num_classes, "width": _infer_width(state, arch), "options": options}


def _infer_width(state: dict, arch: str) -> float:
    """The width whose scaled channel counts reproduce the file's.

    fc7 has 4096 * width channels (the finest resolution; FCN-GoogLeNet: inception_5b/3x3,
    384 * width), conv1 64 or 96 * width;
    candidates are checked against both and the first consistent one wins.
    """
    from ..models.common import scaled
    from ..models.nyud import ARCHS as NYUD_ARCHS
    from ..models.nyud import first_conv

    first, base, mult = {"fcn-alexnet": ("conv1", 96, 2), "fcn-googlenet": ("conv1_7x7_s2", 64, 1)}.get(
        arch, ("conv1_1", 64, 1)
    )
    # FCN-GoogLeNet has no fc7: its widest layer, inception_5b/3x3 (384), takes its place.
    fine, fine_base = ("inception_5b_3x3", 384) if arch == "fcn-googlenet" else ("fc7", 4096)
    if arch in NYUD_ARCHS:  # early fusion's conv1_1_bgrd; late fusion's colour stream
        first, fine = first_conv(arch), "fc7color" if arch == "nyud-fcn32s-color-hha" else "fc7"
    c1 = _shape(state, f"{first}.weight")
    c7 = _shape(state, f"{fine}.weight")
    cands = []
    if c7 is not None:
        cands.append(c7 / fine_base)
    if c1 is not None:
        cands.append(c1 / base)
    for w in cands:
        ok1 = c1 is None or scaled(base, w, mult) == c1
        ok7 = c7 is None or scaled(fine_base, w) == c7
        if 0 < w <= 4 and ok1 and ok7:
            return w
    return cands[0] if cands and 0 < cands[0] <= 4 else 1.0
