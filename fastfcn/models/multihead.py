"""Nets with several output heads on one backbone (SIFT Flow: semantic + geometric).

Every backend stays single-output: the model's forward returns its heads' outputs side by
side, and the split is data carried by the config.

    logits, probs: (N, C1 + C2 + ..., H, W)   the heads' channels concatenated, in head order
                                               (probs: a softmax per head, then concatenated)
    labels:        (N, n_heads, H, W)          one label map per head (ids within that head)

``output_heads(config)`` gives the split as ((name, channels), ...): None for a one-headed
net. ``config["num_classes"]`` is the total channel count (SIFT Flow: 33 + 3 = 36), so the
exported graph's output, ONNX metadata checks and buffers keep their meaning ("channels of the
logits"); ``class_names`` and ``palette`` list the heads' entries in the same order
(SIFT Flow: the 33 semantic classes, then the 3 geometric ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import reduce

import numpy as np
import torch

from fastfcn.kernels.reference import OUTPUTS
from fastfcn.kernels.reference import finish as finish_one

from ..config import ARCH_OPTIONS, SIFTFLOW_ARCHS

# Archs with two heads, and the name of the option giving the second head's channel count
# (the first head has the rest of num_classes).
# SIFT Flow's geometric classes (sky, horizontal, vertical): the option's default.
GEOMETRIC_CLASSES = ARCH_OPTIONS["siftflow-fcn8s"]["geometric_classes"]


def output_heads(config: Mapping) -> tuple[tuple[str, int], ...] | None:
    """((head name, channels), ...) of a config's net, in output order; None for one head."""
    if config.get("arch") not in SIFTFLOW_ARCHS:
        return None
    geo = (config.get("options") or {}).get("geometric_classes", GEOMETRIC_CLASSES)
    return (("semantic", int(config["num_classes"]) - geo), ("geometric", geo))


def combine(outs: Sequence[torch.Tensor], output: str) -> torch.Tensor:
    """The heads' own outputs side by side: labels (N, H, W) each -> (N, n_heads, H, W), uint8
    unless a head has over 256 classes (then int32 for all); logits / probs (N, Ci, H, W) each
    -> (N, sum Ci, H, W)."""
    outs = list(outs)
    if output != "labels":
        return torch.cat(outs, 1)
    dtype = reduce(torch.promote_types, [o.dtype for o in outs])
    return torch.stack([o.to(dtype) for o in outs], 1)


def finish(y: torch.Tensor, output: str, heads) -> torch.Tensor:
    """Logits (N, C, H, W) of a net with ``heads`` (output_heads; None: one head) -> the
    requested output, per head (kernels.reference.finish on each head's channels)."""
    if not heads:
        return finish_one(y, output)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
    parts = torch.split(y, [c for _, c in heads], dim=1)
    return combine([finish_one(p, output) for p in parts], output)


def split(out: torch.Tensor, output: str, heads, batched: bool = True) -> dict[str, torch.Tensor]:
    """A combined result -> {head name: that head's result}, views of ``out``.

    out: labels (N, n_heads, H, W) or logits/probs (N, C, H, W); unbatched (without N) when
    ``batched`` is False. Each value is (N, H, W) labels or (N, Ci, H, W) logits/probs.
    """
    dim = 1 if batched else 0
    if output == "labels":
        if out.shape[dim] != len(heads):
            raise ValueError(f"expected {len(heads)} label maps along dim {dim}; got {tuple(out.shape)}")
        return {name: out.select(dim, i) for i, (name, _) in enumerate(heads)}
    sizes = [c for _, c in heads]
    if out.shape[dim] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} channels along dim {dim}; got {tuple(out.shape)}")
    return dict(zip([n for n, _ in heads], torch.split(out, sizes, dim=dim)))


def host_results(result) -> dict:
    """One image's result as numpy arrays on the host, keyed by head: ``{head name: array}`` for a
    net with several heads (a {head: tensor} result), ``{None: array}`` for one head's tensor.
    What the writers of files (segment, video, the Ray job) and evaluate iterate over; numpy
    results pass through."""
    host = lambda t: t.cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)  # noqa: E731
    if isinstance(result, Mapping):
        return {name: host(t) for name, t in result.items()}
    return {None: host(result)}


def head_entries(config: Mapping, key: str, heads) -> dict[str, list]:
    """A per-class list of the config (``class_names`` or ``palette``) cut per head."""
    items, out, start = list(config.get(key) or []), {}, 0
    for name, c in heads:
        out[name] = items[start:start + c]
        start += c
    return out


__all__ = [
    "GEOMETRIC_CLASSES", "SIFTFLOW_ARCHS", "combine", "finish", "head_entries",
    "host_results", "output_heads", "split",
]  # fmt: skip
