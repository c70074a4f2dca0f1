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
files load as ``fcn8s`` unless the file says otherwise (a torchfcn Trainer
checkpoint's ``arch``, voc-fcn8s-atonce's Scale layers in a caffemodel) or
``arch="fcn8s-atonce"`` is given. Preprocessing defaults (mean, BGR, 0..255) are
the reference nets'.

Trust: every size a file claims is checked before anything is allocated (see
``load`` and ``fastfcn.config``), and every failure is one CheckpointError line
naming the file. tests/test_fuzz_loaders.py holds the loaders to that.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import loads_json, model_bytes, validate_config
from .errors import CheckpointError

META_KEY = "fastfcn"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pt", ".pth")
_CONFIG_KEYS = ("arch", "num_classes", "width", "options")
_OVERRIDABLE = ("class_names", "palette", "color_order", "mean", "std", "input_scale")
# Header guard: a real safetensors header is a few kB (plus at most 4 MiB of fastfcn metadata);
# anything bigger is not one.
_MAX_HEADER = 16 * 1024 * 1024


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
    a half-written checkpoint under ``path`` (see ``atomic_write``); an existing file keeps
    its permissions. A symlink is followed: the file it points to is replaced and the link
    kept. A directory, or a parent path that is a file, is a CheckpointError. Returns the path.
    """
    path = Path(path)
    save_target(path)  # a directory or a parent that is a file: refused before any work
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
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(config)}))
    elif suffix in _TORCH_SUFFIXES:
        obj = {"format": "fastfcn", "format_version": FORMAT_VERSION, "config": config, "state_dict": tensors}
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
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
    out = validate_config(out, path)
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata must be JSON-serialisable ({e})") from None
    return out


def save_target(path: Path) -> Path:
    """The file ``save`` writes for ``path``: a symlink is followed (its target is replaced,
    the link stays); a directory, or a parent that is not a directory, is a CheckpointError."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise CheckpointError(
            f"{path}: is a directory; give a file name such as {path / 'model.safetensors'}"
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{path}: cannot create it: {parent} is a file, not a directory")
            break
    return target


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp_name)`` and a rename, so ``path`` is either the old
    file or the complete new one.

    The temporary file is ``.<name>.<random>.tmp`` in the same directory (unique per call,
    so concurrent saves never share one) and is removed when ``write`` or anything after it
    fails, KeyboardInterrupt included; only a SIGKILL or power loss can leave one behind,
    and it never replaces ``path``. An existing file keeps its permission bits; a new one
    gets 0666 minus the umask, like a plain open(). A symlink is followed (see save_target).
    """
    path = save_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    try:
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            # mkstemp (and safetensors' own writer) leave 0600; a new checkpoint gets the mode
            # a plain open() would give, so a shipped or shared checkpoint is readable.
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
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

    Nothing is built before every size the file claims has been checked: the config
    (``fastfcn.config.validate_config``), zip members' sizes, and the bytes of the model
    the config describes against the tensor bytes the file holds (``MODEL_SLACK`` more at
    most), so loading takes about twice the file's tensor bytes. Non-finite weights are
    refused with the tensor's name.
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
    hint = None  # an arch the file names outside its keys (torchfcn's "arch", Caffe Scale layers)
    if kind == "safetensors":
        state, config = _read_safetensors(path, size)
    elif kind == "torch":
        state, config, hint = _read_torch(path, size)
    else:
        layers = read_caffemodel(path)
        hint = _caffe_arch(layers, path)
        state = {f"{_caffe_name(ly.name)}.weight": _caffe_probe(ly) for ly in layers}
        config = None
    state = _strip_prefix(state)
    held = _tensor_bytes(state, path) if kind != "caffe" else sum(b.nbytes for ly in layers for b in ly.blobs)
    fixed_defaults = False
    if config is None:
        config = _infer_config(state, arch or hint, path)
        fixed_defaults = True
    elif arch is not None:
        config = dict(config, arch=arch)
    config = validate_config(config, path)
    _check_model_size(config, held, path)
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


# A model may be this much bigger than the tensors its file holds: what a bare state dict may
# lack and the model fills in (the fixed bilinear upsampling weights: 0.5 MB for a 21-class
# FCN-8s, 23 MB at 150 classes) and num_batches_tracked counters.
MODEL_SLACK = 64 * 1024 * 1024


def _check_model_size(config: dict, held: int, path) -> None:
    need = model_bytes(config)
    if need > held + MODEL_SLACK:
        raise CheckpointError(
            f"{path}: the file describes a {config['arch']} of width {config['width']:g} with "
            f"{config['num_classes']} classes ({need / 2**20:.1f} MiB of weights) but holds only "
            f"{held / 2**20:.1f} MiB of tensors; refusing to build it (the config, or the tensor "
            "shapes it was inferred from, do not match the weights the file carries)"
        )


def _tensor_bytes(state: Mapping[str, torch.Tensor], path) -> int:
    """Bytes of the distinct storages behind ``state``; refuses tensors that claim more
    elements than their storage holds (stride-0 or overlapping views: an 'expanded'
    tensor of 1e12 elements can sit on 4 bytes and would be materialised by any copy)."""
    seen: dict[int, int] = {}
    for k, t in state.items():
        st = t.untyped_storage()
        # A view of part of a storage (a slice) is fine: its size is bounded by real memory.
        if t.numel() * t.element_size() > st.nbytes():
            raise CheckpointError(
                f"{path}: tensor {k!r} of shape {tuple(t.shape)} claims more elements than its storage "
                f"holds ({st.nbytes()} bytes); expected a plain contiguous tensor"
            )
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


# torch.save writes a zip archive; the legacy (torch < 1.6) format starts with a pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


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


_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


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
    header = loads_json(header_bytes, path, "safetensors header", max_bytes=_MAX_HEADER)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    end = max((_check_st_entry(k, v, path) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensor data needs {8 + n + end} bytes, the file has {size}"
        )
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
        )
    config = loads_json(meta[META_KEY], path) if META_KEY in meta else None
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"{path}: corrupt fastfcn metadata (not a JSON object)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and OSErrors
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None
    return state, config


def _check_st_entry(name: str, v, path) -> int:
    """One tensor entry of a safetensors header: returns its end offset."""

    def bad(why):
        raise CheckpointError(f"{path}: corrupt safetensors header entry {name!r} ({why})")

    if not isinstance(v, dict):
        bad("not an object")
    dtype, shape, offs = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if not isinstance(dtype, str):
        bad(f"dtype {dtype!r}; expected a name such as 'F32'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):  # fmt: skip
        bad(f"shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offs, list) and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
            and offs[0] <= offs[1]):  # fmt: skip
        bad(f"data_offsets {offs!r}; expected [begin, end] integers with 0 <= begin <= end")
    # Dtypes outside the table (sub-byte and newer float formats) are left to safetensors' own check.
    if dtype in _ST_DTYPES and math.prod(shape) * _ST_DTYPES[dtype] != offs[1] - offs[0]:
        bad(f"shape {shape} of {dtype} does not fill its {offs[1] - offs[0]} bytes")
    return offs[1]


# torchfcn's Trainer records the model class in checkpoint["arch"].
_TORCHFCN_ARCHS = {"FCN32s": "fcn32s", "FCN16s": "fcn16s", "FCN8s": "fcn8s", "FCN8sAtOnce": "fcn8s-atonce"}


def _read_torch(path: Path, size: int) -> tuple[dict, dict | None, str | None]:
    """(state, config or None, arch hint or None) of a torch.save file."""
    _check_zip_sizes(path, size)
    try:
        # weights_only: the unpickler only rebuilds tensors and plain containers (plus numpy
        # scalars and dtypes, which training scripts store as metrics); any other global
        # (os.system, a class's __reduce__) is refused, not run.
        with torch.serialization.safe_globals(_numpy_safe_globals()):
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
        return _tensor_dict(state, path), dict(config), None
    if isinstance(obj, Mapping):
        hint = _TORCHFCN_ARCHS.get(obj.get("arch")) if isinstance(obj.get("arch"), str) else None
        # Common wrappers of training scripts: {"state_dict": sd}, {"model_state_dict": sd}, {"model": sd}.
        for k in ("state_dict", "model_state_dict", "model"):
            if k in obj and isinstance(obj[k], Mapping) and obj[k]:
                return _tensor_dict(obj[k], path), None, hint
        return _tensor_dict(obj, path), None, None
    raise CheckpointError(f"{path}: expected a state dict (name -> tensor); got {type(obj).__name__}")


def _check_zip_sizes(path: Path, size: int) -> None:
    """Refuse a zip whose members inflate past twice the file before torch.load reads it.

    torch.save stores members uncompressed (their sizes sum to the file's, less the zip
    directory), so a compressed archive that grows past 2x + 1 MiB is a zip bomb: one of
    3 MB inflated to 3.3 GB inside torch.load.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # legacy format, or damaged: torch.load names the problem
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt zip archive: {e})"
        ) from None
    if total > 2 * size + 2**20:
        raise CheckpointError(
            f"{path}: refused: its zip members inflate to {total} bytes from a {size}-byte file "
            "(torch.save stores them uncompressed; expected at most twice the file size)"
        )


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes, under the names numpy 1 (numpy.core) and 2 (numpy._core)
    pickle them with: torchfcn's Trainer stores best_mean_iu as a numpy.float64."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    dtypes = {type(np.dtype(c)) for c in np.typecodes["All"]}
    return [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
        *dtypes,
    ]


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
        if v.layout is not torch.strided or v.is_quantized or v.is_nested or v.device.type != "cpu":
            raise CheckpointError(
                f"{path}: tensor {k!r} is a {v.layout} {v.dtype} tensor on {v.device}; "
                "expected plain dense tensors"
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
    from .models.nyud import ARCH_KEYS

    keys = {k.rsplit(".", 1)[0] for k in state}
    for key, nyud_arch in ARCH_KEYS.items():  # early / late fusion's own layer names
        if key in keys:
            return nyud_arch
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
    from .models.nyud import ARCHS as NYUD_ARCHS
    from .models.nyud import score_layer

    if arch in NYUD_ARCHS:
        score = f"{score_layer(arch)}.weight"
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
    from .models.nyud import ARCHS as NYUD_ARCHS
    from .models.nyud import first_conv

    fc7 = "fc7"
    if arch in NYUD_ARCHS:
        first, fc7 = first_conv(arch), "fc7color" if arch == "nyud-fcn32s-color-hha" else "fc7"
    c1 = _shape(state, f"{first}.weight")
    c7 = _shape(state, f"{fc7}.weight")
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


def _all_finite(t: torch.Tensor, chunk: int = 2**20) -> bool:
    """Whether a tensor holds no NaN or inf, checked a chunk at a time: torch.isfinite of a
    float tensor allocates a float copy (abs) and a bool map of the whole tensor, which put
    loading a 135 MiB FCN-32s (width 0.5) at 3.1x its tensor bytes of peak RSS instead of 2.1x."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)  # a view for the usual contiguous tensor; a copy of a (bounded) slice else
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


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
    bad = [k for k in own if k in state and not _all_finite(state[k])]
    if bad:
        raise CheckpointError(
            f"{path}: non-finite values (NaN or inf) in {_short(bad)}; the weights are corrupt"
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
            if wt != 2:
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
                elif f == type_f and w == 2:
                    ltype = bytes(x).decode("utf-8", "replace")
                elif f == type_f and w == 0:
                    ltype = _V1_TYPES.get(x, f"V1:{x}")
                elif f == blob_f and w == 2:
                    blobs.append(_decode_blob(x))
            if blobs:
                layers.append(CaffeLayer(name or f"layer{len(layers)}", ltype, blobs))
                _check_caffe_layer(layers[-1])
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
