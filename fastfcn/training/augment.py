"""Training data: datasets by name, batches of one image size, mosaics, random scaling and flips."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


def open_dataset(spec: str, split: str, *, n: int, size: int, seed: int, num_classes: int):
    """``synthetic`` -> SyntheticScenes(n, size, seed, num_classes); else a VOC root."""
    from .. import data

    if spec == "synthetic":
        if seed == data.HELDOUT_SEED:
            raise InputError(f"seed {seed} is the held-out synthetic split's; training must never see it")
        return data.SyntheticScenes(n, size, seed, num_classes)
    return data.VOCSegmentation(spec, split)


class Subset:
    """The first ``n`` items of a dataset (validation on part of a VOC split)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n
        self.num_classes = getattr(ds, "num_classes", None)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def batch_of(ds, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items of one size: ``(N, H, W, 3)`` uint8 and ``(N, H, W)`` long."""
    items = [ds[int(i)] for i in idx]
    shapes = {im.shape for im, _ in items}
    if len(shapes) != 1:
        raise InputError(
            f"images of one batch differ in size ({sorted(shapes)}); use --batch 1 for datasets of mixed "
            "sizes (whole-image training, as in the paper)"
        )
    images = torch.from_numpy(np.stack([im for im, _ in items]))
    labels = torch.from_numpy(np.stack([lb for _, lb in items]).astype(np.int64))
    return images, labels


def mosaic(images: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile groups of k*k images into one canvas: ``(N*k*k, H, W, 3)`` -> ``(N, k*H, k*W, 3)``
    (labels ``(N*k*k, H, W)`` -> ``(N, k*H, k*W)``).

    The reference nets pad conv1_1 by 100 pixels, so a 96x96 image costs a 296x296 forward;
    3x3 tiles cost 488x488 for nine images, 3.3x less per image.
    """
    if k == 1:
        return images, labels
    n, h, w = labels.shape
    images = images.view(n // (k * k), k, k, h, w, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * h, k * w, 3)
    labels = labels.view(n // (k * k), k, k, h, w).permute(0, 1, 3, 2, 4).reshape(-1, k * h, k * w)
    return images, labels


def augment(images: torch.Tensor, labels: torch.Tensor, scale: float, flips: torch.Tensor):
    """Random scaling and horizontal flips of a batch.

    images: ``(N, 3, H, W)`` float, labels: ``(N, H, W)`` long; one scale for the batch (so
    it stays one tensor), one flip flag per image ``flips: (N,) bool``. Images resize
    bilinearly, labels by nearest neighbour (ids must not blend).
    """
    if flips.any():
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flips.view(-1, 1, 1), labels.flip(-1), labels)
    if scale != 1.0:
        h, w = labels.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, labels


def draw_batch(args, ds, step: int, rank: int, world: int):
    """This rank's share of the global batch of ``step``: ``(images (n, H, W, 3) uint8, labels
    (n, H, W) long, scale, flips (n,) bool)``. The batch depends only on (seed, step): a resumed
    run sees the same data, and the ranks split one batch between them."""
    rng = np.random.default_rng([args.seed, step, 0xB47C])
    idx = rng.integers(0, len(ds), (args.batch, args.mosaic * args.mosaic))
    scale = float(rng.uniform(args.scale_min, args.scale_max)) if args.scale_max > 0 else 1.0
    flips = torch.from_numpy(rng.random(args.batch) < 0.5)
    if not args.flip:
        flips[:] = False
    mine = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    images, labels = mosaic(*batch_of(ds, idx[mine].reshape(-1)), args.mosaic)
    return images, labels, scale, flips[mine]
