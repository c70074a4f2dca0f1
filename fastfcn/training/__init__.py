"""Training (``fastfcn train``): the loop, its state on disk, augmentation, curves, BatchNorm.

    loop.py       train(): set-up, one step, validation, stages, save points
    state.py      save points, resume state, history, the final files
    augment.py    datasets, batches, mosaics, random scaling and flips
    loss.py       the per-pixel cross-entropy, summed over the heads of a net with several
    batchnorm.py  training-only BatchNorm, folded away by fastfcn.models.fold_batchnorm
    plots.py      the curves PNG

``augment`` here is the function (imported below, so it is not shadowed by its module).
"""

from __future__ import annotations

from .augment import augment, batch_of, mosaic, open_dataset, tile
from .batchnorm import ConvBN, add_batchnorm, fold_added_batchnorm, plain_copy
from .loop import VAL_SEED_OFFSET, copy_by_name, evaluate_model, init_weights, parse_stages, train
from .loss import segmentation_loss
from .plots import plot_curves, smooth

__all__ = [
    "VAL_SEED_OFFSET", "ConvBN", "add_batchnorm", "augment", "batch_of", "copy_by_name", "evaluate_model",
    "fold_added_batchnorm", "init_weights", "mosaic", "open_dataset", "parse_stages", "plain_copy",
    "plot_curves", "segmentation_loss", "smooth", "tile", "train",
]  # fmt: skip
