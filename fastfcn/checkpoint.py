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
  a DataParallel ``module.`` prefix is stripped).
- ``.caffemodel``: the original Caffe weights, decoded from the protobuf wire
  format here (no protobuf dependency); blobs map to modules by layer name.

Bare state dicts and caffemodels carry no config: the arch is inferred from the
keys (``fcn8s`` / ``fcn16s`` / ``fcn32s`` / ``fcn-alexnet`` / ``deconvnet`` /
``dilated-frontend`` / ``dilated-context``), num_classes from the last score
layer, width from the channel counts. FCN-8s and FCN-8s at-once have the same
keys and shapes (at-once differs only by constant scales in the forward): such
files load as ``fcn8s`` unless ``arch="fcn8s-atonce"`` is given. Preprocessing
defaults (mean, BGR, 0..255) are the reference nets'.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

META_KEY = "fastfcn"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pt", ".pth")
_CONFIG_KEYS = ("arch", "num_classes", "width", "options")
_OVERRIDABLE = ("class_names", "palette", "color_order", "mean", "std", "input_scale")
# Header guard: a real safetensors header is a few kB; anything bigger is not one.
_MAX_HEADER = 100 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- save


def save(model: nn.Module, path: str | os.PathLike, **meta) -> Path:
    """Save ``model`` (a fastfcn model, or one wrapped in DataParallel) to ``path``.

    The suffix picks the format: ``.safetensors`` (native) or ``.pt`` / ``.pth``
    (fastfcn's dict, loadable with ``weights_only=True``). ``meta`` overrides the
    model's ``class_names`` (num_classes strings), ``palette`` (num_classes
    [R, G, B] in 0..255), ``mean`` / ``std`` (3 numbers, std > 0),
    ``color_order`` ("RGB" | "BGR"), ``input_scale`` (> 0); any other key is
    stored as user metadata (JSON-serialisable) under ``config["meta"]``.
    The file is written to a temporary name and renamed, so a crash never leaves
    a half-written checkpoint under ``path``. Returns the path.
    """
    path = Path(path)
    model = getattr(model, "module", model) if isinstance(model, nn.DataParallel) else model
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path}: save needs a fastfcn model with a .config dict; got {type(model).__name__}"
        )
    config = _config_for_save(config, meta, path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage; a state dict may alias (tied weights).
        tensors = {k: v.clone() for k, v in tensors.items()}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(config)}))
    elif suffix in _TORCH_SUFFIXES:
        obj = {"format": "fastfcn", "format_version": FORMAT_VERSION, "config": config, "state_dict": tensors}
        _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {path.suffix!r}; use .safetensors, .pt or .pth"
        )
    return path


def _config_for_save(config: Mapping, meta: dict, path: Path) -> dict:
    from . import __version__

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
    out = _validate_config(out, path)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata must be JSON-serialisable ({e})") from None
    return out


def _validate_config(c: dict, path) -> dict:
    """Check and normalise a config (from a model plus metadata, or from a file)."""
    from .models import available

    def bad(msg):
        raise CheckpointError(f"{path}: {msg}")

    if c.get("arch") not in available():
        bad(f"unknown arch {c.get('arch')!r}; expected one of {available()}")
    n = c.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        bad(f"num_classes must be a positive int; got {n!r}")
    w = c.get("width")
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w <= 4:
        bad(f"width must be a number in (0, 4]; got {w!r}")
    c["width"] = float(w)
    if not isinstance(c.get("options"), Mapping):
        bad(f"options must be a dict; got {c.get('options')!r}")
    names = c.get("class_names")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(s, str) for s in names):
            bad("class_names must be a list of strings")
        if len(names) != n:
            bad(f"class_names has {len(names)} entries; the model has num_classes={n}")
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
    for k in ("mean", "std"):
        v = c.get(k)
        if v is None:
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_finite_number, v))):
            bad(f"{k} must be 3 finite numbers (one per input channel); got {v!r}")
        if k == "std" and not all(x > 0 for x in v):
            bad(f"std must be positive; got {v!r}")
        c[k] = [float(x) for x in v]
    if c.get("color_order") is not None and c["color_order"] not in ("RGB", "BGR"):
        bad(f"color_order must be 'RGB' or 'BGR'; got {c['color_order']!r}")
    s = c.get("input_scale")
    if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool) or not s > 0):
        bad(f"input_scale must be a positive number; got {s!r}")
    if c.get("meta") is not None and not isinstance(c["meta"], Mapping):
        bad("meta must be a dict")
    return c


def _is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors' own writer) leave 0600; give the file the mode a plain
        # open() would (0666 minus the umask), so a shipped or shared checkpoint is readable.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike, arch: str | None = None, *, strict: bool = True, map_location="cpu"
) -> nn.Module:
    """Load a checkpoint and return the model in eval mode on ``map_location``.

    The model is built with ``fastfcn.models.build`` from the file's config (or,
    for bare state dicts and caffemodels, from what the keys tell: see the
    module docstring); ``arch`` overrides the file's arch (e.g. ``"fcn8s-atonce"``).
    ``model.config`` holds the file's class names, palette and preprocessing.
    With ``strict=False`` missing and unexpected keys are tolerated, wrong
    shapes never are. Raises CheckpointError naming the file and the problem.
    ``path`` may also be a built-in model's name (``"demo"``, see fastfcn.zoo).
    """
    from .zoo import resolve

    path = Path(resolve(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    kind = _detect_format(path)
    if kind == "safetensors":
        state, config = _read_safetensors(path, size)
    elif kind == "torch":
        state, config = _read_torch(path)
    else:
        layers = read_caffemodel(path)
        state, config = {f"{_caffe_name(ly.name)}.weight": _caffe_probe(ly) for ly in layers}, None
    state = _strip_prefix(state)
    fixed_defaults = False
    if config is None:
        config = _infer_config(state, arch, path)
        fixed_defaults = True
    else:
        config = _validate_config(dict(config), path)
        if arch is not None:
            config["arch"] = arch
    model = _build(config, path)
    if kind == "caffe":
        state = _caffe_state(layers, model)
    _load_state(model, state, path, strict=strict, fill_upsampling=fixed_defaults)
    for k in _OVERRIDABLE:
        if config.get(k) is not None:
            model.config[k] = config[k]
    if config.get("meta"):
        model.config["meta"] = dict(config["meta"])
    model.eval()
    return model.to(map_location)


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in _TORCH_SUFFIXES:
        return "torch"
    if suffix == ".caffemodel":
        return "caffe"
    # Unknown suffix: sniff. torch.save writes a zip archive; safetensors starts
    # with an 8-byte header length followed by '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path}: cannot tell the checkpoint format from suffix {path.suffix!r} or content; "
        "expected .safetensors, .pt, .pth or .caffemodel"
    )


def _read_safetensors(path: Path, size: int) -> tuple[dict, dict | None]:
    """Validate the header ourselves (clear messages for truncated or foreign files), then load."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > _MAX_HEADER:
            raise CheckpointError(
                f"{path}: not a safetensors file "
                f"(the first 8 bytes, {raw!r}, are not a plausible header length)"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated: header says {n} bytes, the file has {size - 8} after it"
            )
        header_bytes = f.read(n)
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry {k!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensor data needs {8 + n + end} bytes, the file has {size}"
        )
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and OSErrors
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    meta = header.get("__metadata__") or {}
    config = None
    if META_KEY in meta:
        try:
            config = json.loads(meta[META_KEY])
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt fastfcn metadata ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: corrupt fastfcn metadata (not a JSON object)")
    return state, config


def _read_torch(path: Path) -> tuple[dict, dict | None]:
    try:
        # weights_only: the unpickler only rebuilds tensors and plain containers;
        # any other global (os.system, a class's __reduce__) is refused, not run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = _torch_load_reason(e)
        if msg.startswith("it references the global"):
            raise CheckpointError(
                f"{path}: refused: the pickle references code or objects other than tensors and plain "
                f"containers; nothing from it was run ({msg})"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or wrong format: {msg})"
        ) from None
    if isinstance(obj, Mapping) and obj.get("format") == "fastfcn":
        state, config = obj.get("state_dict"), obj.get("config")
        if not isinstance(config, Mapping) or not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: fastfcn checkpoint without a config or state_dict")
        return _tensor_dict(state, path), dict(config)
    if isinstance(obj, Mapping):
        # Common wrappers of training scripts: {"state_dict": sd}, {"model_state_dict": sd}, {"model": sd}.
        for k in ("state_dict", "model_state_dict", "model"):
            if k in obj and isinstance(obj[k], Mapping) and obj[k]:
                return _tensor_dict(obj[k], path), None
        return _tensor_dict(obj, path), None
    raise CheckpointError(f"{path}: expected a state dict (name -> tensor); got {type(obj).__name__}")


def _torch_load_reason(e: Exception) -> str:
    """The informative part of a torch.load error, without its boilerplate (which
    suggests weights_only=False: advice a checkpoint loader must not pass on)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references the global {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if m:
        return m.group(1).strip()
    boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "Re-running",
              "(1)", "(2)")  # fmt: skip
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boiler)]
    text = (useful or [type(e).__name__])[0]
    return text if len(text) < 300 else text[:300] + "..."


def _tensor_dict(d: Mapping, path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a state dict (str -> tensor); entry {k!r} is a {type(v).__name__}"
            )
        out[k] = v
    if not out:
        raise CheckpointError(f"{path}: the state dict is empty")
    return out


def _strip_prefix(state: dict) -> dict:
    # DataParallel / DistributedDataParallel save every key under "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _shape(state: dict, key: str, dim: int = 0) -> int | None:
    v = state.get(key)
    return int(v.shape[dim]) if isinstance(v, torch.Tensor) and v.dim() > dim else None


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The arch a Caffe-named state dict belongs to, or None if the keys do not tell.

    fcn8s and fcn8s-atonce share every key; this returns "fcn8s" for both.
    """
    keys = {k.rsplit(".", 1)[0] for k in state}
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
    from .models import available

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
    num_classes = _shape(state, score)
    if num_classes is None:
        raise CheckpointError(f"{path}: no {score!r} to take the class count from (arch {arch}); keys: "
                              f"{_short(sorted(state))}")  # fmt: skip
    options: dict = {}
    if arch == "dilated-context":
        c = _shape(state, "ctx_conv1_1.weight")
        options["context"] = "basic" if c == num_classes else "large"
    return {"arch": arch, "num_classes": num_classes, "width": _infer_width(state, arch), "options": options}


def _infer_width(state: dict, arch: str) -> float:
    """The width whose scaled channel counts reproduce the file's.

    fc7 has 4096 * width channels (the finest resolution), conv1 64 or 96 * width;
    candidates are checked against both and the first consistent one wins.
    """
    from .models.common import scaled

    first, base, mult = ("conv1", 96, 2) if arch == "fcn-alexnet" else ("conv1_1", 64, 1)
    c1 = _shape(state, f"{first}.weight")
    c7 = _shape(state, "fc7.weight")
    cands = []
    if c7 is not None:
        cands.append(c7 / 4096)
    if c1 is not None:
        cands.append(c1 / base)
    for w in cands:
        ok1 = c1 is None or scaled(base, w, mult) == c1
        ok7 = c7 is None or scaled(4096, w) == c7
        if 0 < w <= 4 and ok1 and ok7:
            return w
    return cands[0] if cands and 0 < cands[0] <= 4 else 1.0


def _build(config: dict, path) -> nn.Module:
    from .models import build

    try:
        return build(config["arch"], config["num_classes"], config["width"], **config.get("options", {}))
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build the model the file describes: {e}") from None


def _short(items: list, n: int = 12) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _upsampling_keys(model: nn.Module) -> set[str]:
    head = getattr(model, "head", None)
    return {f"{s.upsample}.weight" for s in head.stages} if head is not None else set()


def _load_state(model: nn.Module, state: dict, path, strict: bool, fill_upsampling: bool) -> None:
    own = model.state_dict()
    # num_batches_tracked only counts training steps; Caffe and many ports lack it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    filled = []
    if fill_upsampling:
        # Some ports drop the fixed upsampling weights: the model keeps its bilinear init.
        filled = sorted(k for k in missing if k in _upsampling_keys(model))
        missing = [k for k in missing if k not in filled]
    arch = model.config["arch"]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_short(wrong, 8)}")
        raise CheckpointError(
            f"{path}: does not fit {arch} (num_classes={model.config['num_classes']}, "
            f"width={model.config['width']:g}): " + "; ".join(parts)
        )
    if filled:
        warnings.warn(
            f"{path}: no weights for {', '.join(filled)}; using the reference bilinear upsampling",
            stacklevel=3,
        )
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))


# ------------------------------------------------------------------------------------------- caffemodel
#
# A .caffemodel is a serialised NetParameter (caffe.proto). Only these fields are read:
#   NetParameter:      layer = 100 (LayerParameter), layers = 2 (V1LayerParameter, legacy)
#   LayerParameter:    name = 1, type = 2 (string), blobs = 7
#   V1LayerParameter:  layer = 1 (V0LayerParameter: name = 1, type = 2, blobs = 50), name = 4,
#                      type = 5 (enum), blobs = 6
#   BlobProto:         num/channels/height/width = 1..4 (legacy shape), data = 5 (float, packed or not),
#                      shape = 7 (BlobShape: dim = 1, int64, packed or not), double_data = 8
# Everything else (prototxt parameters, diffs, phase rules) is skipped by wire type.

_V1_TYPES = {4: "Convolution", 39: "Deconvolution", 14: "InnerProduct"}
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


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _WireError("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError("a varint is longer than 10 bytes")


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


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos, len(buf))
        out.append(v)
    return out


def _decode_blob(buf: memoryview) -> torch.Tensor:
    import numpy as np

    legacy = [None] * 4
    dims: list[int] | None = None
    chunks, dchunks = [], []
    for field, wt, v in _fields(buf):
        if field in (1, 2, 3, 4) and wt == 0:
            legacy[field - 1] = v
        elif field == 5:
            if wt == 2 and len(v) % 4:
                raise _WireError("packed float data whose length is not a multiple of 4")
            chunks.append(np.frombuffer(v, dtype="<f4"))
        elif field == 8:
            if wt == 2 and len(v) % 8:
                raise _WireError("packed double data whose length is not a multiple of 8")
            dchunks.append(np.frombuffer(v, dtype="<f8"))
        elif field == 7 and wt == 2:
            dims = []
            for f2, wt2, d in _fields(v):
                if f2 == 1:
                    dims.extend(_packed_varints(d) if wt2 == 2 else [d])
    if chunks and dchunks:
        raise _WireError("a blob with both float and double data")
    data = np.concatenate(chunks or dchunks) if (chunks or dchunks) else np.zeros(0, "<f4")
    data = data.astype(np.float32)  # a copy: the tensor must not alias the file buffer
    if dims is None and any(x is not None for x in legacy):
        dims = [x or 0 for x in legacy]
    if dims is None:
        dims = [data.size]
    if math.prod(dims) != data.size:
        raise _WireError(f"a blob of shape {tuple(dims)} holds {data.size} values")
    return torch.from_numpy(data.reshape(dims))


def read_caffemodel(path: str | os.PathLike) -> list[CaffeLayer]:
    """The layers with weights of a .caffemodel, in file order (new and V1/V0 layouts).

    Raises CheckpointError for files that are not a NetParameter or are cut short.
    """
    path = Path(path)
    try:
        buf = memoryview(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    if len(buf) == 0:
        raise CheckpointError(f"{path}: the file is empty")
    layers: list[CaffeLayer] = []
    try:
        for field, wt, v in _fields(buf):
            if wt != 2 or field not in (2, 100):
                continue
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
                elif f == type_f:
                    ltype = bytes(x).decode("utf-8", "replace") if w == 2 else _V1_TYPES.get(x, f"V1:{x}")
                elif f == blob_f and w == 2:
                    blobs.append(_decode_blob(x))
            if blobs:
                layers.append(CaffeLayer(name or f"layer{len(layers)}", ltype, blobs))
    except _WireError as e:
        raise CheckpointError(
            f"{path}: not a valid caffemodel (truncated or corrupt protobuf: {e})"
        ) from None
    if not layers:
        raise CheckpointError(
            f"{path}: no layers with weights found: not a caffemodel (a .prototxt holds no weights)"
        )
    return layers


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
        if n and w.numel() % n == 0 and w.shape[0] != n:
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
            factor = float(b[2].reshape(-1)[0]) if len(b) > 2 else 1.0
            inv = 0.0 if factor == 0 else 1.0 / factor
            state[f"{name}.running_mean"] = b[0] * inv
            state[f"{name}.running_var"] = b[1] * inv
            state[f"{name}.weight"] = torch.ones(b[0].numel())
            state[f"{name}.bias"] = torch.zeros(b[0].numel())
            last_bn = name
            continue
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
