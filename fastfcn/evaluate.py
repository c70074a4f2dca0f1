"""The paper's metrics of a model over a dataset, through any backend (``fastfcn eval``).

Pixel accuracy, mean accuracy, mean IU and frequency-weighted IU from one confusion
matrix (fastfcn.metrics), with per-class IU. The model runs through
``fastfcn.Segmenter``, so the same numbers check that a backend or a precision does not
change accuracy. ``--data synthetic`` is the held-out synthetic split (a fixed seed that
``fastfcn train`` refuses).
"""

from __future__ import annotations

import numpy as np

from .metrics import ConfusionMatrix


def evaluate(seg, dataset, num_classes: int, *, batch: int = 8, progress=None) -> tuple[dict, np.ndarray]:
    """Run ``seg`` (anything with ``run(images, output="labels")``) over ``dataset``.

    dataset yields ``(image (H, W, 3) uint8 RGB, label (H, W) uint8)``; consecutive images of
    one size go through ``run`` as one ``(N, H, W, 3)`` batch. Returns ``(scores, confusion
    matrix (C, C))``.
    """
    from .metrics import scores

    cm = ConfusionMatrix(num_classes)
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush():
        if not pending:
            return
        images = np.stack([im for im, _ in pending])
        labels = np.stack([lb for _, lb in pending])
        pred = seg.run(images, output="labels")
        pred = pred.cpu().numpy() if hasattr(pred, "cpu") else np.asarray(pred)
        cm.update(labels, pred)
        pending.clear()

    for i in range(len(dataset)):
        image, label = dataset[i]
        if pending and (image.shape != pending[0][0].shape or len(pending) >= batch):
            flush()
        pending.append((image, label))
        if progress is not None:
            progress.update(i + 1)
    flush()
    return scores(cm.matrix), cm.matrix
