"""The native format: safetensors, its metadata entry ``"fastfcn"`` holding the config JSON.

The header is checked here (clear messages for truncated or foreign files, every tensor's
extent against the file size) before safetensors reads anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import loads_json
from ..errors import CheckpointError
from .store import META_KEY, atomic_write

# Header guard: a real safetensors header is a few kB (plus at most 4 MiB of fastfcn metadata);
# anything bigger is not one.
_MAX_HEADER = 16 * 1024 * 1024


def write_safetensors(path: Path, tensors: dict, config: dict) -> None:
    """``tensors`` and ``config`` (as JSON under META_KEY) to ``path``, atomically."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage; a state dict may alias (tied weights).
    tensors = {k: v.clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(config)}))


_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def _read_safetensors(path: Path, size: int) -> tuple[dict, dict | None]:
    """(state, config or None): the header validated first, then safetensors loads the tensors."""
    header = _read_header(path, size)
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


def _read_header(path: Path, size: int) -> dict:
    """The JSON header, with its length and every entry's extent checked against the file."""
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
    return header


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
