"""Building the model a file describes and loading its tensors into it, checked."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import CheckpointError


def _unwrap(model):
    """The model inside DataParallel / DistributedDataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, which put their own prefix on every state-dict key."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _build(config: dict, path) -> nn.Module:
    from ..models import build

    try:
        return build(config["arch"], config["num_classes"], config["width"], **config.get("options", {}))
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build the model the file describes: {e}") from None


def _short(items: list, n: int = 12) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _all_finite(t: torch.Tensor, dtype: torch.dtype | None = None, chunk: int = 2**20) -> bool:
    """Whether a tensor holds no NaN or inf once cast to ``dtype`` (the parameter's; None: as it
    is): a float64 1e39 is finite in the file and inf in a float32 model. Checked a chunk at a
    time: torch.isfinite of a float tensor allocates a float copy (abs) and a bool map of the
    whole tensor, which put loading a 135 MiB FCN-32s (width 0.5) at 3.1x its tensor bytes of
    peak RSS instead of 2.1x."""
    if not t.is_floating_point():
        return True
    cast = dtype if dtype is not None and dtype.is_floating_point else t.dtype

    def finite(part: torch.Tensor) -> bool:
        part = part.to(cast)
        if part.element_size() == 1:  # torch has no isfinite for the float8 dtypes
            part = part.float()
        return bool(torch.isfinite(part).all())

    flat = t.reshape(-1)  # a view for the usual contiguous tensor; a copy of a (bounded) slice else
    return all(finite(flat[i:i + chunk]) for i in range(0, flat.numel(), chunk))


def _check_real(name: str, t: torch.Tensor, path) -> None:
    """Refuse a complex tensor: copying it into a real parameter drops the imaginary part (torch
    only warns)."""
    if t.is_complex():
        raise CheckpointError(
            f"{path}: {name} is a {t.dtype} tensor; expected real numbers (a copy into the model's "
            "real weights would drop the imaginary part)"
        )


def _upsampling_keys(model: nn.Module) -> set[str]:
    from ..heads import model_heads

    return {f"{s.upsample}.weight" for head in model_heads(model) for s in head.stages}


def _load_state(model: nn.Module, state: dict, path, strict: bool, fill_upsampling: bool) -> None:
    """Copy ``state`` into ``model`` after checking that it fits (keys, shapes, finite values).
    With ``fill_upsampling`` (a file without a config) missing fixed upsampling weights keep the
    model's bilinear init, with a warning."""
    own = model.state_dict()
    missing, unexpected, wrong, filled = _fit(model, own, state, fill_upsampling)
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_short(wrong, 8)}")
        c = model.config
        raise CheckpointError(
            f"{path}: does not fit {c['arch']} (num_classes={c['num_classes']}, "
            f"width={c['width']:g}): " + "; ".join(parts)
        )
    for k in own:
        if k in state:
            _check_real(k, state[k], path)
    bad = [k for k in own if k in state and not _all_finite(state[k], own[k].dtype)]
    if bad:
        raise CheckpointError(
            f"{path}: non-finite values (NaN or inf) in {_short(bad)}; the weights are corrupt"
        )
    if filled:
        warnings.warn(
            f"{path}: no weights for {', '.join(filled)}; using the reference bilinear upsampling",
            stacklevel=3,  # the caller of load()
        )
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))


def _fit(model: nn.Module, own: dict, state: dict, fill_upsampling: bool):
    """(missing, unexpected, wrong shapes, filled upsampling keys) of ``state`` against ``own``."""
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
    return missing, unexpected, wrong, filled
