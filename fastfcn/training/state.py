"""What a run keeps on disk: checkpoints, the resume state and the history.

In ``--out``: ``last.safetensors`` + ``train_state.pt`` (optimizer, step, stage, history, torch
RNG, and with ``--batchnorm`` the unfolded weights and statistics) at every save point;
``final.safetensors``, ``history.json`` and ``curves.png`` at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.torch_format import _check_zip_sizes, _torch_load_reason
from ..errors import CheckpointError, InputError
from ..paths import atomic_path
from .batchnorm import plain_copy
from .plots import for_plot, plot_curves

STATE_FILE = "train_state.pt"
# What save_point writes (and with --batchnorm "model").
_STATE_KEYS = ("step", "stage", "optimizer", "history", "torch_rng")


def new_history(heads=None) -> dict:
    """``{"loss": [[step, loss], ...], "val_mean_iu": [[step, mean IU], ...]}``; for a net with
    several ``heads`` ((name, classes), ...) also ``"heads": {name: {"loss": [[step, that head's
    loss], ...], "val_mean_iu": [[step, its mean IU], ...]}}``: "loss" is the heads' sum and the
    top-level "val_mean_iu" stays empty (the heads' mean IUs are over different class sets)."""
    history = {"loss": [], "val_mean_iu": []}
    if heads:
        history["heads"] = {name: {"loss": [], "val_mean_iu": []} for name, _ in heads}
    return history


def load_state(out: Path) -> dict:
    """The resume state of the run in ``out``; InputError when there is none."""
    path = out / STATE_FILE
    if not path.is_file():
        raise InputError(f"--resume: {path} is missing; train without --resume first")
    try:
        _check_zip_sizes(path, path.stat().st_size)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as e:
        raise InputError(f"--resume: {e}") from None
    except Exception as e:  # a damaged file: RuntimeError, EOFError, UnpicklingError... from torch.load
        raise InputError(
            f"--resume: {path} is not a readable training state (truncated or damaged: "
            f"{_torch_load_reason(e)}); train without --resume to start over"
        ) from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(
            f"--resume: {path} is not a training state of fastfcn train (it lacks {', '.join(missing)})"
        )
    return state


def meta(args, step: int, arch: str) -> dict:
    """The ``trained`` record every saved model carries."""
    return {"trained": {"data": args.data, "seed": args.seed, "iterations": step, "arch": arch,
                        "size": args.size, "optimizer": args.optimizer, "lr": args.lr}}  # fmt: skip


def save_point(model: nn.Module, out: Path, step: int, stage: int, opt, history: dict, args,
               arch: str) -> None:
    """``last.safetensors`` (BatchNorm folded) and ``train_state.pt``: a resume point."""
    import fastfcn

    # fastfcn.save writes atomically and durably (fsync before the rename); the state file is
    # renamed into place the same way, so neither an interrupted save nor a power loss after it
    # leaves a resume point whose state file is empty or cut short beside its checkpoint.
    fastfcn.save(plain_copy(model), out / "last.safetensors", **meta(args, step, arch))
    state = {"step": step, "stage": stage, "optimizer": opt.state_dict(), "history": history,
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    if torch.cuda.is_initialized():  # dropout on a GPU draws from the CUDA generators
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if args.batchnorm:  # the unfolded weights and statistics, for an exact resume
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(out / STATE_FILE, durable=True) as tmp:
        torch.save(state, tmp)


def save_final(model: nn.Module, out: Path, step: int, history: dict, args, arch: str) -> None:
    """``final.safetensors`` (and ``--export``), ``history.json`` and ``curves.png``."""
    import fastfcn

    info = meta(args, step, arch)
    fastfcn.save(model.cpu(), out / "final.safetensors", **info)
    if args.export:
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
        fastfcn.save(model, args.export, **info)
    (out / "history.json").write_text(json.dumps(history))
    plot_curves(for_plot(history), out / "curves.png", f"{arch} width {args.width} on {args.data}")
