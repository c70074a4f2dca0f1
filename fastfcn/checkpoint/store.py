"""Writing checkpoint files safely, and the size checks every loader runs before building.

    atomic_write(path, lambda tmp: write(tmp))   # path is the old file or the complete new one
    check_model_size(config, held_bytes, path)   # refuses a config that describes more than the file holds
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import model_bytes
from ..errors import CheckpointError
from ..paths import atomic_path

META_KEY = "fastfcn"  # the safetensors metadata entry holding the config JSON
FORMAT_VERSION = 1  # of fastfcn's own layout (the config keys, the .pt dict)


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

    ``fastfcn.paths.atomic_path`` (durable) names, fsyncs and renames the temporary file and
    removes it on any failure; an existing file keeps its permission bits, a new one gets
    0666 minus the umask, like a plain open(). A symlink is followed (see save_target).
    """
    path = save_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write there ({e.strerror or e})") from None
    with atomic_path(path, durable=True) as tmp:
        write(str(tmp))


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
            f"{held / 2**20:.1f} MiB of tensors (at float32); refusing to build it (the config, or the "
            "tensor shapes it was inferred from, do not match the weights the file carries)"
        )


def _tensor_bytes(state: Mapping[str, torch.Tensor], path) -> int:
    """Bytes of the distinct storages behind ``state``, counted at float32 (the models' dtype)
    where stored narrower: a float16 / bfloat16 file holds half the bytes of the model it loads
    into (FCN-32s width 0.5: 68 of 135 MiB) and must not look like one that describes more than
    it holds. Refuses tensors that claim more elements than their storage holds (stride-0 or
    overlapping views: an 'expanded' tensor of 1e12 elements can sit on 4 bytes and would be
    materialised by any copy)."""
    seen: dict[int, int] = {}
    for k, t in state.items():
        st = t.untyped_storage()
        # A view of part of a storage (a slice) is fine: its size is bounded by real memory.
        if t.numel() * t.element_size() > st.nbytes():
            raise CheckpointError(
                f"{path}: tensor {k!r} of shape {tuple(t.shape)} claims more elements than its storage "
                f"holds ({st.nbytes()} bytes); expected a plain contiguous tensor"
            )
        widened = st.nbytes() * max(1, 4 // t.element_size())
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), widened)
    return sum(seen.values())
