"""The paper's metrics of a model over a dataset, through any backend (``fastfcn eval``).

Pixel accuracy, mean accuracy, mean IU and frequency-weighted IU from one confusion
matrix (fastfcn.metrics), with per-class IU. The model runs through
``fastfcn.Segmenter``, so the same numbers check that a backend or a precision does not
change accuracy. ``--data synthetic`` is the held-out synthetic split (a fixed seed that
``fastfcn train`` refuses). A net with several heads (SIFT Flow) is scored per head against each
head's ground truth; a net of two inputs (NYUDv2 fusion) gets its second input with each image.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .metrics import ConfusionMatrix


def evaluate(seg, dataset, num_classes: int, *, batch: int = 8, progress=None):
    """Run ``seg`` (anything with ``run(images, output="labels")``) over ``dataset``.

    dataset yields ``(image (H, W, 3) uint8 RGB, label)`` or ``(image, label, inputs)``: label
    (H, W) uint8, or for a net with several heads (``seg.heads``, SIFT Flow) ``{head: (H, W)}``
    with every head's ground truth; inputs: the second input of a two-input net (NYUDv2 fusion)
    as run's keyword, ``{"depth": (H, W)}`` or ``{"hha": (H, W, 3)}``. Consecutive images of one
    size go through ``run`` as one ``(N, H, W, 3)`` batch (their second inputs stacked alike).
    num_classes: C, all heads' together for several (each head is scored over its own classes).
    Returns ``(scores, confusion matrix (C, C))``; for several heads ``({head: scores},
    {head: matrix})``.
    """
    from .metrics import scores

    heads = getattr(seg, "heads", None)
    classes = dict(heads) if heads else {None: num_classes}
    if heads and sum(classes.values()) != num_classes:
        raise InputError(f"num_classes={num_classes} but the heads {heads} have {sum(classes.values())}")
    cms = {name: ConfusionMatrix(c) for name, c in classes.items()}
    pending: list[tuple] = []

    def flush():
        if not pending:
            return
        from .models.multihead import host_results

        images = np.stack([item[0] for item in pending])
        inputs = {k: np.stack([item[2][k] for item in pending]) for k in pending[0][2]}
        try:
            preds = host_results(seg.run(images, output="labels", **inputs))
        except InputError as e:  # too large for the model, a depth map it refuses...: say which
            more = f" and the {len(pending) - 1} after it" if len(pending) > 1 else ""
            raise InputError(f"{e} (in {item_name(dataset, first, 'images')}{more})") from None
        for name, cm in cms.items():
            labels = [_head_label(item[1], name) for item in pending]
            try:
                cm.update(np.stack(labels), preds[name])
            except InputError as e:
                raise InputError(f"{e}{_culprit(dataset, first, labels, cm, name)}") from None
        pending.clear()

    first = 0  # the dataset index of pending[0]
    for i in range(len(dataset)):
        item = _item(dataset[i], i)
        if pending and (item[0].shape != pending[0][0].shape or len(pending) >= batch):
            flush()
        if not pending:
            first = i
        pending.append(item)
        if progress is not None:
            progress.update(i + 1)
    flush()
    if not heads:
        return scores(cms[None].matrix), cms[None].matrix
    return {n: scores(cm.matrix) for n, cm in cms.items()}, {n: cm.matrix for n, cm in cms.items()}


def _culprit(dataset, first: int, labels: list, cm: ConfusionMatrix, head: str | None) -> str:
    """Where the ground truth of a batch (dataset items ``first``, ...) holds an id outside the
    classes: ``" in <label file> (item i)"``, so that one file of thousands can be found; "" when
    no label is to blame."""
    for k, lab in enumerate(labels):
        lab = np.asarray(lab)
        if ((lab != cm.ignore) & ((lab < 0) | (lab >= cm.num_classes))).any():
            return f" in {item_name(dataset, first + k, 'labels', head)}"
    return ""


def item_name(dataset, i: int, files: str, head: str | None = None) -> str:
    """Item ``i`` of ``dataset`` as ``"<its image or label file> (item i)"`` (``files``: "images"
    or "labels"; ``head``: whose label) where the dataset has files (a VOCSegmentation, also
    inside Paired or training's Subset), else ``"item i"``."""
    base = dataset
    while hasattr(base, "ds"):  # Paired, training's Subset: the same items of a VOCSegmentation
        base = base.ds
    paths = getattr(base, files, None)
    if not isinstance(paths, list) or i >= len(paths):
        return f"item {i}"
    return f"{paths[i][head] if isinstance(paths[i], dict) else paths[i]} (item {i})"


def _item(item, i: int) -> tuple:
    """A dataset's item as (image, label, inputs)."""
    if len(item) == 2:
        return (*item, {})
    if len(item) == 3 and isinstance(item[2], dict):
        return tuple(item)
    raise InputError(f"dataset item {i} has {len(item)} parts; expected (image, label) or (image, label, "
                     "{'depth' or 'hha': array})")  # fmt: skip


def _head_label(label, head: str | None) -> np.ndarray:
    """The ground truth of ``head`` (None: the one head's) in a dataset's label."""
    if head is None:
        if isinstance(label, dict):
            raise InputError(f"the dataset has labels per head ({', '.join(label)}); the model has one head")
        return label
    if not isinstance(label, dict) or head not in label:
        got = f"heads {', '.join(label)}" if isinstance(label, dict) else "one label map per image"
        raise InputError(f"the model's head {head!r} has no ground truth in the dataset ({got}); a net with "
                         "several heads is scored against every head's labels")  # fmt: skip
    return label[head]
