"""The model config every file carries: one frozen dataclass, one validator, one set of
defaults, and the limits loaders check first.

    cfg = ModelConfig("fcn8s", 21)                            # the reference net's preprocessing
    cfg = ModelConfig.from_dict(raw, "fcn8s.safetensors")     # validated, or CheckpointError
    config = validate_config(raw_dict, "fcn8s.safetensors")   # the validator alone: a normalised dict
    obj = loads_json(text, "fcn8s.onnx", "fastfcn metadata")  # length and depth bounded

A config (``model.config``, a checkpoint's metadata, an ONNX file's ``fastfcn.config``)
holds arch, num_classes, width, options, mean, std, color_order, input_scale,
class_names, palette and optional user ``meta``. Models, checkpoints, export, the runtime's
and training's preprocessing read the defaults here (ARCH_OPTIONS, ARCH_MEAN, ModelConfig's
field defaults, ``preprocessing`` for partial dicts). Checkpoints, ONNX metadata and
ModelConfig itself go through the same ``validate_config``, so a file is refused with the
same sentence whichever way it arrives, and before anything is built from it.

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

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from .errors import CheckpointError, InputError
from .modalities import DEFAULT_INPUTS, MODALITIES, check_inputs, input_channels

MAX_CLASSES = 4096
MAX_WIDTH = 4.0
MAX_METADATA_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_CLASS_NAME_CHARS = 256
MAX_ABS_MEAN = 1e4
STD_RANGE = (1e-4, 1e4)
INPUT_SCALE_RANGE = (1e-4, 1e6)

# The options each family's constructor takes, with their defaults (what a model built with
# none of them records in its config).
_FCN_OPTIONS = {"learnable_upsampling": False, "dropout": 0.5}
ARCH_OPTIONS = {
    "fcn32s": _FCN_OPTIONS, "fcn16s": _FCN_OPTIONS, "fcn8s": _FCN_OPTIONS, "fcn8s-atonce": _FCN_OPTIONS,
    "fcn-alexnet": _FCN_OPTIONS, "deconvnet": {"dropout": 0.5}, "dilated-frontend": _FCN_OPTIONS,
    "dilated-context": {**_FCN_OPTIONS, "context": "large"},
    # GoogLeNet's own dropout ratio before its classifier (pool5/drop_7x7_s1), models/googlenet.py
    "fcn-googlenet": {**_FCN_OPTIONS, "dropout": 0.4},
    # SIFT Flow: num_classes counts both heads' channels, geometric_classes the second head's
    # (models/multihead.py); PASCAL-Context: the VOC nets' options.
    **{f"siftflow-{a}": {**_FCN_OPTIONS, "geometric_classes": 3} for a in ("fcn32s", "fcn16s", "fcn8s")},
    **{f"pascalcontext-{a}": _FCN_OPTIONS for a in ("fcn32s", "fcn16s", "fcn8s")},
    "nyud-fcn32s-color": _FCN_OPTIONS, "nyud-fcn32s-hha": _FCN_OPTIONS, "nyud-fcn32s-color-d": _FCN_OPTIONS,
    "nyud-fcn32s-color-hha": _FCN_OPTIONS,
}  # fmt: skip

# Preprocessing of the reference nets (FACTS.md): Caffe-trained, they take BGR, unscaled
# (0..255), minus the training set's mean in BGR order, std 1.
VOC_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
DILATED_MEAN_BGR = (102.93, 111.36, 116.52)
# bvlc_googlenet's train_val.prototxt mean_value (FCN-GoogLeNet, models/googlenet.py)
GOOGLENET_MEAN_BGR = (104.0, 117.0, 123.0)
SIFTFLOW_MEAN_BGR = (114.578, 115.294, 108.353)  # fcn.berkeleyvision.org siftflow_layers.py
SIFTFLOW_ARCHS = ("siftflow-fcn32s", "siftflow-fcn16s", "siftflow-fcn8s")
PASCAL_CONTEXT_ARCHS = ("pascalcontext-fcn32s", "pascalcontext-fcn16s", "pascalcontext-fcn8s")
# NYUDv2 (fcn.berkeleyvision.org nyud_layers.py): colour BGR, HHA in the file's order, log depth
# of millimetres (exp(7.844) = 2.55 m).
NYUD_MEAN_BGR = (116.190, 97.203, 92.318)
NYUD_MEAN_HHA = (132.431, 94.076, 118.477)
NYUD_MEAN_LOGD = 7.844
ARCH_MEAN = {
    "fcn32s": VOC_MEAN_BGR, "fcn16s": VOC_MEAN_BGR, "fcn8s": VOC_MEAN_BGR, "fcn8s-atonce": VOC_MEAN_BGR,
    "fcn-alexnet": VOC_MEAN_BGR, "deconvnet": VOC_MEAN_BGR, "dilated-frontend": DILATED_MEAN_BGR,
    "dilated-context": DILATED_MEAN_BGR, "fcn-googlenet": GOOGLENET_MEAN_BGR,
    **dict.fromkeys(SIFTFLOW_ARCHS, SIFTFLOW_MEAN_BGR),
    **dict.fromkeys(PASCAL_CONTEXT_ARCHS, VOC_MEAN_BGR),  # pascalcontext_layers.py: the VOC mean
    "nyud-fcn32s-color": NYUD_MEAN_BGR, "nyud-fcn32s-hha": NYUD_MEAN_HHA,
    "nyud-fcn32s-color-d": (*NYUD_MEAN_BGR, NYUD_MEAN_LOGD),
    "nyud-fcn32s-color-hha": (*NYUD_MEAN_BGR, *NYUD_MEAN_HHA),
}  # fmt: skip
# The input modalities of each arch, in channel order (fastfcn.modalities); the others take one
# colour image.
ARCH_INPUTS = {
    "nyud-fcn32s-hha": ("hha",), "nyud-fcn32s-color-d": ("color", "depth"),
    "nyud-fcn32s-color-hha": ("color", "hha"),
}  # fmt: skip
# The 40-class task of Gupta, Arbelaez, Malik (CVPR 2013) that nyud_layers.py trains on (its
# labels 1..40 shifted to 0..39, void 0 -> 255).
NYUD_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# SIFT Flow (data/sift-flow/classes.txt of the reference repository, ids shifted down by one as
# siftflow_layers.py does): the 33 semantic classes, then the 3 geometric ones (models/multihead.py).
SIFTFLOW_SEMANTIC = (
    "awning", "balcony", "bird", "boat", "bridge", "building", "bus", "car", "cow", "crosswalk",
    "desert", "door", "fence", "field", "grass", "moon", "mountain", "person", "plant", "pole",
    "river", "road", "rock", "sand", "sea", "sidewalk", "sign", "sky", "staircase", "streetlight",
    "sun", "tree", "window",
)  # fmt: skip
SIFTFLOW_GEOMETRIC = ("sky", "horizontal", "vertical")
# data/pascal-context/classes-59.txt of the reference repository, 0 = background.
PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor", "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "clothes", "computer",
    "cup", "door", "fence", "floor", "flower", "food", "grass", "ground", "keyboard", "light",
    "mountain", "mouse", "curtain", "platform", "sign", "plate", "road", "rock", "shelves", "sidewalk",
    "sky", "snow", "bedcloth", "track", "tree", "truck", "wall", "water", "window", "wood",
)  # fmt: skip
# The dataset's class names of each arch (VOC where not listed), used at that class count only.
ARCH_CLASS_NAMES = {
    **dict.fromkeys(SIFTFLOW_ARCHS, SIFTFLOW_SEMANTIC + SIFTFLOW_GEOMETRIC),
    **dict.fromkeys(PASCAL_CONTEXT_ARCHS, PASCAL_CONTEXT_CLASSES),
    **dict.fromkeys(("nyud-fcn32s-color", "nyud-fcn32s-hha", "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha"),
                    NYUD_CLASSES),
}


def default_class_names(arch: str, n: int) -> tuple[str, ...] | list[str]:
    """The arch's dataset names when it has ``n`` classes, else ``class_<i>`` (none invented)."""
    names = ARCH_CLASS_NAMES.get(arch, VOC_CLASSES)
    return names if n == len(names) else [f"class_{i}" for i in range(n)]


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), n entries of (R, G, B)."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


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
    g = c["options"].get("geometric_classes")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or not 1 <= g < n):
        bad(f"options.geometric_classes must be an int in 1..num_classes-1 = 1..{n - 1} (num_classes "
            f"counts both heads' classes); got {g!r}")
    _validate_labels(c, n, bad)
    _validate_inputs(c, arch, bad)
    _validate_preprocessing(c, bad)
    if c.get("meta") is not None and not isinstance(c["meta"], Mapping):
        bad("meta must be a dict")
    return c


def _validate_labels(c: dict, n: int, bad) -> None:
    """class_names and palette: one entry per class (lists in ``c`` afterwards)."""
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


def arch_inputs(arch: str) -> tuple[str, ...]:
    """The input modalities ``arch`` takes, in channel order (("color",) unless ARCH_INPUTS says)."""
    return ARCH_INPUTS.get(arch, DEFAULT_INPUTS)


def _validate_inputs(c: dict, arch: str, bad) -> None:
    """``inputs`` (the modalities, fastfcn.modalities), where a config names them, must be the
    arch's; one that does not (every file: the arch fixes them) is left so (``config_inputs``
    reads the arch's)."""
    want = list(arch_inputs(arch))
    inputs = c.get("inputs")
    if inputs is None:
        return
    why = check_inputs(inputs)
    if why is not None:
        bad(why)
    if list(inputs) != want:
        bad(f"inputs {list(inputs)} do not fit {arch}, which takes {want}")
    c["inputs"] = list(inputs)


def _validate_preprocessing(c: dict, bad) -> None:
    inputs = list(config_inputs(c))
    n = input_channels(inputs)
    of = "" if inputs == list(DEFAULT_INPUTS) else f" of {inputs}"
    for k in ("mean", "std"):
        v = c.get(k)
        if v is None:
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == n and all(map(_is_finite_number, v))):
            bad(f"{k} must be {n} finite numbers (one per input channel{of}); got {v!r}")
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


@dataclass(frozen=True, eq=False)
class ModelConfig(Mapping):
    """What a model is and how its input is prepared: the one set of defaults and one validator.

        cfg = ModelConfig("fcn8s", 21)                          # every other field: the reference net's
        cfg = ModelConfig.from_dict(raw, "fcn8s.safetensors")   # a file's JSON; CheckpointError names it
        cfg = dataclasses.replace(cfg, color_order="RGB")       # overrides are validated too
        cfg.to_dict()                                           # the JSON form files store

    Defaults (None means "the arch's"): width 1.0; options those of ARCH_OPTIONS; mean the
    arch's training-set mean (ARCH_MEAN, BGR; one number per input channel); std 1 per channel;
    color_order "BGR" (the colour modality's; an HHA image keeps its file's order); input_scale
    255 (0..255 unscaled, the Caffe convention); class_names the dataset's at its class count (VOC
    21, SIFT Flow 33 + 3, NYUDv2 40, PASCAL-Context 60: default_class_names), else ``class_<i>``;
    palette the VOC colour map; inputs the arch's modalities (ARCH_INPUTS); meta (user metadata) none.
    Frozen: sequences are tuples, options and meta read-only mappings. As a Mapping it reads
    like the dict it replaces (``cfg["mean"]`` is a list, as ``to_dict`` gives it).
    """

    arch: str
    num_classes: int
    width: float = 1.0
    options: Mapping[str, Any] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    color_order: str = "BGR"
    input_scale: float = 255.0
    class_names: tuple[str, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    inputs: tuple[str, ...] | None = None
    meta: Mapping[str, Any] | None = None

    def __post_init__(self):
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        c = validate_config(self._with_defaults(raw), "ModelConfig")
        if c.get("mean") is None:  # an arch added to fastfcn.models but not to ARCH_MEAN
            raise CheckpointError(f"ModelConfig: arch {c['arch']!r} has no default mean (ARCH_MEAN); "
                                  "expected mean=(3 numbers)")  # fmt: skip
        frozen = {
            "width": c["width"], "options": MappingProxyType(c["options"]), "mean": tuple(c["mean"]),
            "std": tuple(c["std"]), "input_scale": float(c["input_scale"]), "inputs": config_inputs(c),
            "class_names": tuple(c["class_names"]), "palette": tuple(tuple(p) for p in c["palette"]),
            "meta": None if c.get("meta") is None else MappingProxyType(copy.deepcopy(dict(c["meta"]))),
        }  # fmt: skip
        for k, v in frozen.items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _with_defaults(c: dict) -> dict:
        """``c`` with each None replaced by its arch's default (c's arch and num_classes unchecked)."""
        arch, n = c["arch"], c["num_classes"]
        if not (isinstance(arch, str) and isinstance(n, int) and 0 < n <= MAX_CLASSES):
            return c  # the validator names what is wrong
        c = dict(c)
        if arch in ARCH_OPTIONS and (isinstance(c["options"], Mapping) or c["options"] is None):
            c["options"] = {**ARCH_OPTIONS[arch], **(c["options"] or {})}
        if c["mean"] is None:
            c["mean"] = ARCH_MEAN.get(arch)
        if c["std"] is None:
            inputs = c["inputs"] if isinstance(c["inputs"], (list, tuple)) else arch_inputs(arch)
            c["std"] = (1.0,) * input_channels([m for m in inputs if m in MODALITIES])
        if c["class_names"] is None:
            c["class_names"] = default_class_names(arch, n)
        if c["palette"] is None:
            c["palette"] = voc_palette(n)
        return c

    @classmethod
    def from_dict(cls, d: Mapping, source) -> ModelConfig:
        """A config from a file's JSON object; every problem is a CheckpointError starting with
        ``source``. Missing or null keys take the defaults; other keys (the file's own:
        fastfcn_version, format_version, an ONNX file's export) are not the model's and are
        dropped, as loading always did."""
        c = validate_config(d, source)
        return cls(**{k: v for k, v in c.items() if k in _KEYS})

    def to_dict(self) -> dict:
        """The plain-JSON form (lists, dicts), keys in the order ``model.config`` always had;
        ``meta`` only when set."""
        return {k: self[k] for k in self}

    def replace(self, **changes) -> ModelConfig:
        """``dataclasses.replace``: a validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    # Mapping: reads like the dict it replaces, in the JSON form.
    def __getitem__(self, key: str):
        if key not in _KEYS or (key == "meta" and self.meta is None):
            raise KeyError(key)
        return _plain(getattr(self, key))

    def __iter__(self):
        # ``inputs`` is the arch's (the validator holds them to it), so files need not store it:
        # a config saved before the key existed and one saved now are the same JSON.
        return (k for k in _KEYS if (k != "meta" or self.meta is not None) and k != "inputs")

    def __len__(self) -> int:
        return len(_KEYS) - 1 - (self.meta is None)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.to_dict() == dict(other)

    __hash__ = None

    # Immutable: a copy is the object itself; pickles (Ray actors, whole-model torch.save)
    # carry the plain dict, since a mappingproxy does not pickle.
    def __copy__(self) -> ModelConfig:
        return self

    def __deepcopy__(self, memo) -> ModelConfig:
        return self

    def __reduce__(self):
        return _from_plain, (self.to_dict(),)


_KEYS = tuple(f.name for f in fields(ModelConfig))  # the order model.config's dict always had


def _from_plain(d: dict) -> ModelConfig:
    return ModelConfig(**d)


def _plain(v):
    """A frozen value in its JSON form: tuples -> lists, mappings -> dicts (copies)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def config_inputs(config: Mapping) -> tuple[str, ...]:
    """The modalities of a config's model: its ``inputs``, else its arch's, else one colour image."""
    inputs = config.get("inputs")
    return tuple(inputs) if inputs is not None else arch_inputs(config.get("arch"))


def preprocessing(config: Mapping) -> tuple[bool, float, tuple, tuple]:
    """(bgr, input_scale, mean, std) of a config; a key a partial dict lacks (or holds as None)
    takes ModelConfig's default, the mean its arch's, std 1 per input channel. InputError when
    neither mean nor a known arch is given, or the colour order is neither RGB nor BGR."""
    get = config.get
    mean = get("mean") if get("mean") is not None else ARCH_MEAN.get(get("arch"))
    if mean is None:
        raise InputError(f"the config has no mean and arch {get('arch')!r} has none by default; "
                         "expected mean=[one number per input channel]")  # fmt: skip
    default = {f.name: f.default for f in fields(ModelConfig)}
    default["std"] = (1.0,) * input_channels(config_inputs(config))
    keys = ("color_order", "input_scale", "std")
    order, scale, std = (default[k] if get(k) is None else get(k) for k in keys)
    if str(order).upper() not in ("RGB", "BGR"):
        raise InputError(f"config color_order must be 'RGB' or 'BGR'; got {order!r}")
    return str(order).upper() == "BGR", float(scale), tuple(map(float, mean)), tuple(map(float, std))


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
    "ARCH_CLASS_NAMES", "ARCH_INPUTS", "ARCH_MEAN", "ARCH_OPTIONS", "NYUD_CLASSES", "PASCAL_CONTEXT_ARCHS",
    "PASCAL_CONTEXT_CLASSES", "SIFTFLOW_ARCHS",
    "SIFTFLOW_GEOMETRIC", "SIFTFLOW_SEMANTIC", "VOC_CLASSES", "ModelConfig", "arch_inputs", "config_inputs",
    "default_class_names", "preprocessing", "voc_palette",
    "MAX_CLASSES", "MAX_JSON_DEPTH", "MAX_METADATA_BYTES", "MAX_WIDTH", "json_depth", "loads_json",
    "model_bytes", "validate_config",
]  # fmt: skip
