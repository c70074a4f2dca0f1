"""The model config every file carries: one validator and the limits loaders check first.

    config = validate_config(raw_dict, "fcn8s.safetensors")   # normalised copy, or CheckpointError
    obj = loads_json(text, "fcn8s.onnx", "fastfcn metadata")  # length and depth bounded

A config (``model.config``, a checkpoint's metadata, an ONNX file's ``fastfcn.config``)
holds arch, num_classes, width, options, mean, std, color_order, input_scale,
class_names, palette and optional user ``meta``. Checkpoints and ONNX metadata go through
the same ``validate_config``, so a file is refused with the same sentence whichever
way it arrives, and before anything is built from it.

Limits (every size a file claims is checked against them before allocation):
- ``MAX_CLASSES`` = 4096: far above the label sets in use (VOC 21, ADE20K scene parsing
  150, COCO-Stuff 182); a bare state dict may claim any count through a zero-element
  tensor's shape, and 5e7 classes ended in a raw MemoryError while building.
- ``MAX_WIDTH`` = 4: what the models accept. Width 4 is an 8.6 GB FCN-8s (fc6 alone,
  16384 x 2048 x 7 x 7 floats, is 6.6 GB), so width is never trusted alone: ``model_bytes``
  gives the exact bytes of the model a config builds (built on the meta device, where
  nothing is allocated) and loaders compare it with the tensor bytes the file holds.
- ``MAX_METADATA_BYTES`` = 4 MiB of JSON: 4096 class names of 256 characters and a
  palette fit in 1.2 MB.
- ``MAX_JSON_DEPTH`` = 32: a config nests 3 deep (palette entries, user meta below that).
- mean within +-1e4, std in [1e-4, 1e4], input_scale in [1e-4, 1e6]: a NaN mean or a
  1e-30 std turns every input into inf/NaN and every label into 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from .errors import CheckpointError
from .modalities import check_inputs, input_channels

MAX_CLASSES = 4096
MAX_WIDTH = 4.0
MAX_METADATA_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_CLASS_NAME_CHARS = 256
MAX_ABS_MEAN = 1e4
STD_RANGE = (1e-4, 1e4)
INPUT_SCALE_RANGE = (1e-4, 1e6)

# The options each family's constructor takes, and what each may hold.
_FCN_OPTIONS = ("learnable_upsampling", "dropout")
ARCH_OPTIONS = {
    "fcn32s": _FCN_OPTIONS, "fcn16s": _FCN_OPTIONS, "fcn8s": _FCN_OPTIONS, "fcn8s-atonce": _FCN_OPTIONS,
    "fcn-alexnet": _FCN_OPTIONS, "deconvnet": ("dropout",), "dilated-frontend": _FCN_OPTIONS,
    "dilated-context": (*_FCN_OPTIONS, "context"),
    "nyud-fcn32s-color": _FCN_OPTIONS, "nyud-fcn32s-hha": _FCN_OPTIONS, "nyud-fcn32s-color-d": _FCN_OPTIONS,
    "nyud-fcn32s-color-hha": _FCN_OPTIONS,
}  # fmt: skip


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_finite_number(x) -> bool:
    return _is_number(x) and math.isfinite(x)


MAX_CONFIG_VALUES = 1_000_000


def json_depth(obj, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON or unpickled containers (a scalar is 0), without
    recursion. Stops at ``limit + 1`` levels or MAX_CONFIG_VALUES values, returning
    ``limit + 1``: a pickled config can be self-referential (a list holding itself)."""
    depth, stack, seen = 0, [(obj, 0)], 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = list(o.values())
        if isinstance(o, (list, tuple)):
            depth = max(depth, d + 1)
            seen += len(o)
            if depth > limit or seen > MAX_CONFIG_VALUES:
                return limit + 1
            stack.extend((v, d + 1) for v in o)
    return depth


def loads_json(text, source, what: str = "fastfcn metadata", max_bytes: int = MAX_METADATA_BYTES):
    """``json.loads`` of a file's text with its length and nesting bounded.

    Raises CheckpointError naming ``source`` and ``what`` for text over ``max_bytes``,
    invalid JSON, or nesting deeper than MAX_JSON_DEPTH (checked after parsing: the C
    parser itself stops at Python's recursion limit, which is caught here).
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise CheckpointError(f"{source}: corrupt {what} (expected JSON text, got {type(text).__name__})")
    if len(text) > max_bytes:
        raise CheckpointError(f"{source}: {what} is {len(text)} bytes; at most {max_bytes} are accepted")
    deep = f"{source}: corrupt {what} (nested deeper than {MAX_JSON_DEPTH} levels)"
    try:
        obj = json.loads(text)
    except RecursionError:  # json's C parser stops at Python's recursion limit
        raise CheckpointError(deep) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: corrupt {what} ({e})") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise CheckpointError(deep)
    return obj


def validate_config(c: Mapping, source) -> dict:
    """Check and normalise a config; returns a new dict (width, mean, std as floats).

    ``source`` (a path or a description) starts every CheckpointError message.
    """
    from .models import available

    def bad(msg):
        raise CheckpointError(f"{source}: {msg}")

    if not isinstance(c, Mapping):
        bad(f"the config must be a JSON object; got {type(c).__name__}")
    if json_depth(c) > MAX_JSON_DEPTH:
        bad(f"the config nests deeper than {MAX_JSON_DEPTH} levels or holds over {MAX_CONFIG_VALUES} values")
    c = dict(c)
    arch = c.get("arch")
    if not isinstance(arch, str) or arch not in available():
        bad(f"unknown arch {arch!r}; expected one of {available()}")
    n = c.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CLASSES:
        bad(f"num_classes must be an int in 1..{MAX_CLASSES}; got {n!r}")
    w = c.get("width")
    if not _is_number(w) or not 0 < w <= MAX_WIDTH:
        bad(f"width must be a number in (0, {MAX_WIDTH:g}]; got {w!r}")
    c["width"] = float(w)
    c["options"] = _validate_options(c.get("options"), arch, bad)
    names = c.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names):
            bad("class_names must be a list of strings")
        if len(names) != n:
            bad(f"class_names has {len(names)} entries; the model has num_classes={n}")
        if any(len(s) > MAX_CLASS_NAME_CHARS for s in names):
            bad(f"class_names must be at most {MAX_CLASS_NAME_CHARS} characters each")
        c["class_names"] = list(names)
    pal = c.get("palette")
    if pal is not None:
        ok = isinstance(pal, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in p)
            for p in pal
        )  # fmt: skip
        if not ok:
            bad("palette must be a list of [R, G, B] with integers in 0..255")
        if len(pal) != n:
            bad(f"palette has {len(pal)} colours; the model has num_classes={n}")
        c["palette"] = [list(p) for p in pal]
    _validate_inputs(c, arch, bad)
    _validate_preprocessing(c, bad)
    if c.get("meta") is not None and not isinstance(c["meta"], Mapping):
        bad("meta must be a dict")
    return c


def _validate_options(opts, arch: str, bad) -> dict:
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        bad(f"options must be a dict; got {opts!r}")
    allowed = ARCH_OPTIONS[arch]
    unknown = sorted(str(k) for k in opts if k not in allowed)
    if unknown:
        bad(f"unknown options {unknown} for {arch}; expected some of {list(allowed)}")
    if "learnable_upsampling" in opts and not isinstance(opts["learnable_upsampling"], bool):
        bad(f"options.learnable_upsampling must be true or false; got {opts['learnable_upsampling']!r}")
    if "dropout" in opts and not (_is_finite_number(opts["dropout"]) and 0 <= opts["dropout"] <= 1):
        bad(f"options.dropout must be a number in [0, 1]; got {opts['dropout']!r}")
    if "context" in opts and opts["context"] not in ("basic", "large"):
        bad(f"options.context must be 'basic' or 'large'; got {opts['context']!r}")
    return dict(opts)


def _validate_inputs(c: dict, arch: str, bad) -> None:
    """``inputs`` (the modalities, fastfcn.modalities): the arch fixes them, so a config that does
    not say (every file written before the key existed) gets the arch's."""
    from .models import input_modalities

    want = list(input_modalities(arch))
    inputs = c.get("inputs")
    if inputs is None:
        c["inputs"] = want
        return
    why = check_inputs(inputs)
    if why is not None:
        bad(why)
    if list(inputs) != want:
        bad(f"inputs {list(inputs)} do not fit {arch}, which takes {want}")
    c["inputs"] = list(inputs)


def _validate_preprocessing(c: dict, bad) -> None:
    n = input_channels(c["inputs"])
    for k in ("mean", "std"):
        v = c.get(k)
        if v is None:
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == n and all(map(_is_finite_number, v))):
            bad(f"{k} must be {n} finite numbers (one per input channel of {c['inputs']}); got {v!r}")
        if k == "mean" and not all(abs(x) <= MAX_ABS_MEAN for x in v):
            bad(f"mean must be within +-{MAX_ABS_MEAN:g}; got {v!r}")
        lo, hi = STD_RANGE
        if k == "std" and not all(lo <= x <= hi for x in v):
            bad(f"std must be positive, in [{lo:g}, {hi:g}]; got {v!r}")
        c[k] = [float(x) for x in v]
    if c.get("color_order") is not None and c["color_order"] not in ("RGB", "BGR"):
        bad(f"color_order must be 'RGB' or 'BGR'; got {c['color_order']!r}")
    s = c.get("input_scale")
    lo, hi = INPUT_SCALE_RANGE
    if s is not None and not (_is_finite_number(s) and lo <= s <= hi):
        bad(f"input_scale must be a positive number in [{lo:g}, {hi:g}]; got {s!r}")


def model_bytes(config: Mapping) -> int:
    """Bytes of every parameter and buffer of the model ``config`` (validated) builds.

    Built on the meta device: exact for every family without allocating anything
    (a width-4, 4096-class FCN-8s, 28 GB, is counted in 0.04 s once fastfcn.models is imported).
    """
    import torch

    from .models import build

    with torch.device("meta"):
        m = build(config["arch"], config["num_classes"], config["width"], **config.get("options", {}))
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


__all__ = [
    "MAX_CLASSES", "MAX_JSON_DEPTH", "MAX_METADATA_BYTES", "MAX_WIDTH", "json_depth", "loads_json",
    "model_bytes", "validate_config",
]  # fmt: skip
