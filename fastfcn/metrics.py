"""Segmentation metrics of the FCN paper, all from one confusion matrix.

With ``n_ij`` the number of pixels of class i predicted as class j, ``t_i = sum_j n_ij``
the pixels of class i and ``k`` the number of classes (Long et al., section 5):

- pixel accuracy: ``sum_i n_ii / sum_i t_i``
- mean accuracy: ``(1/k) sum_i n_ii / t_i``
- mean IU: ``(1/k) sum_i n_ii / (t_i + sum_j n_ji - n_ii)``
- frequency weighted IU: ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)``

As in the reference ``score.py`` the means are nan-means: a class absent from the ground
truth has no accuracy, and a class absent from both ground truth and prediction has no IU,
so neither counts towards its mean. A class predicted but absent from the ground truth
has IU 0 and does count.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

IGNORE = 255


def confusion_matrix(label, pred, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Confusion matrix ``(C, C)`` int64, rows = ground truth, columns = prediction.

    label, pred: same shape, e.g. ``(H, W)`` or ``(N, H, W)``; numpy arrays or torch tensors
    (counted on the tensor's device). Pixels whose label is ``ignore`` are skipped; any other
    value outside ``0..C-1`` raises :class:`InputError`.
    """
    lab = label if isinstance(label, torch.Tensor) else torch.from_numpy(np.asarray(label))
    prd = pred if isinstance(pred, torch.Tensor) else torch.from_numpy(np.asarray(pred))
    if lab.shape != prd.shape:
        raise InputError(
            f"label {tuple(lab.shape)} and prediction {tuple(prd.shape)} must have the same shape"
        )
    prd = prd.to(lab.device)
    lab, prd = lab.reshape(-1).long(), prd.reshape(-1).long()
    keep = lab != ignore
    lab, prd = lab[keep], prd[keep]
    if lab.numel():
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"labels hold {bad}, outside 0..{num_classes - 1} (and not the ignore label {ignore})"
            )
        lo, hi = int(prd.min()), int(prd.max())
        if lo < 0 or hi >= num_classes:
            raise InputError(f"predictions hold {lo if lo < 0 else hi}, outside 0..{num_classes - 1}")
    hist = torch.bincount(lab * num_classes + prd, minlength=num_classes * num_classes)
    return hist.view(num_classes, num_classes).cpu().numpy().astype(np.int64)


def scores(hist: np.ndarray) -> dict:
    """The paper's four numbers and per-class IU / accuracy from a confusion matrix ``(C, C)``.

    Returns a dict: ``pixel_acc``, ``mean_acc``, ``mean_iu``, ``fw_iu`` (floats; nan when no
    pixel was counted), ``per_class_iu`` and ``per_class_acc`` (``(C,)`` float64 arrays, nan
    where undefined), ``pixels`` (``(C,)`` ground-truth pixel counts).
    """
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise InputError(f"confusion matrix must be square (C, C); got shape {hist.shape}")
    diag, gt, pr = np.diag(hist), hist.sum(1), hist.sum(0)
    total = hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = diag / gt
        iu = diag / (gt + pr - diag)
        pixel_acc = diag.sum() / total if total else float("nan")
        freq = gt / total if total else np.zeros_like(gt)
    present = freq > 0
    return {
        "pixel_acc": float(pixel_acc),
        "mean_acc": _nanmean(acc),
        "mean_iu": _nanmean(iu),
        "fw_iu": float((freq[present] * iu[present]).sum()) if total else float("nan"),
        "per_class_iu": iu,
        "per_class_acc": acc,
        "pixels": gt.astype(np.int64),
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches: ``update(label, pred)``, then ``scores()``."""

    def __init__(self, num_classes: int, ignore: int = IGNORE):
        if num_classes < 1:
            raise InputError(f"num_classes must be >= 1; got {num_classes}")
        self.num_classes, self.ignore = int(num_classes), ignore
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, label, pred) -> ConfusionMatrix:
        """label, pred: ``(H, W)`` or ``(N, H, W)`` class ids (numpy or torch)."""
        self.matrix += confusion_matrix(label, pred, self.num_classes, self.ignore)
        return self

    def scores(self) -> dict:
        return scores(self.matrix)


def format_table(result: dict, class_names=None) -> str:
    """A plain-text table: the four numbers, then IU and accuracy per class."""
    iu, acc, pix = result["per_class_iu"], result["per_class_acc"], result["pixels"]
    names = list(class_names) if class_names else [str(i) for i in range(len(iu))]
    names += [str(i) for i in range(len(names), len(iu))]
    w = max(12, *(len(n) for n in names))
    pct = lambda v: "   -  " if v != v else f"{100 * v:6.2f}"  # noqa: E731  (nan: undefined)
    lines = [
        f"pixel acc {pct(result['pixel_acc'])}   mean acc {pct(result['mean_acc'])}   "
        f"mean IU {pct(result['mean_iu'])}   f.w. IU {pct(result['fw_iu'])}",
        "",
        f"{'class':<{w}}  {'IU':>6}  {'acc':>6}  {'pixels':>10}",
    ]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}  {pct(iu[i])}  {pct(acc[i])}  {int(pix[i]):>10}")
    return "\n".join(lines)
