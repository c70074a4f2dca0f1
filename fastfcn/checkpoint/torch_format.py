"""PyTorch files (torch.save): fastfcn's own dict, bare state dicts, torchfcn Trainer checkpoints.

Read with ``torch.load(weights_only=True)`` only, so no pickled code ever runs; a zip whose
members inflate past twice the file is refused before torch.load sees it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from .store import FORMAT_VERSION, atomic_write

_TORCH_SUFFIXES = (".pt", ".pth")
# torch.save writes a zip archive; the legacy (torch < 1.6) format starts with a pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def write_torch(path: Path, tensors: dict, config: dict) -> None:
    """fastfcn's dict (loadable with ``weights_only=True``) to ``path``, atomically."""
    obj = {"format": "fastfcn", "format_version": FORMAT_VERSION, "config": config, "state_dict": tensors}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
