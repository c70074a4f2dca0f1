"""Training data: datasets by name, batches of one image size, mosaics, random scaling and flips."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


def open_dataset(spec: str, split: str, *, n: int, size: int, seed: int, num_classes: int, heads=None,
                 second=None, image: str = "color"):
    """``synthetic`` -> SyntheticScenes(n, size, seed, num_classes); else a VOC root.

    heads: the head names of a net with several (SIFT Flow): the VOC layout's labels per head,
    ``SegmentationClass/<head>/<id>.png``, read as ``fastfcn eval`` reads them; the synthetic
    scenes make SIFT Flow's (semantic, geometric), num_classes being the semantic classes.
    second: ``(modality, folder)`` of a two-input net (NYUDv2): each image's depth / HHA file,
    paired by name as eval and segment pair it (``fastfcn.data.Paired``); for the synthetic
    scenes, which make each scene's depth map or HHA image themselves, ``(modality, None)``.
    image: the net's first input, "color" or "hha" (nyud-fcn32s-hha): the synthetic scenes give
    their HHA encoding as the image, as a VOC-layout folder for that net holds HHA images.
    Items have the same form either way (``fastfcn.data``).
    """
    from .. import data

    if spec == "synthetic":
        if second is not None and second[1] is not None:
            raise InputError(f"--data synthetic makes each scene's {second[0]} itself; --{second[0]} "
                             f"{second[1]} is for a VOC-layout folder")  # fmt: skip
        if seed == data.HELDOUT_SEED:
            raise InputError(f"seed {seed} is the held-out synthetic split's; training must never see it")
        return data.SyntheticScenes(n, size, seed, num_classes, heads=heads, second=second and second[0],
                                    image=image)
    if second is not None and second[1] is None:
        raise InputError(f"{spec}: a VOC-layout folder has no {second[0]} files; pass --{second[0]} DIR")
    ds = data.VOCSegmentation(spec, split, heads=heads)
    return data.Paired(ds, *second, None) if second else ds


class Subset:
    """The first ``n`` items of a dataset (validation on part of a VOC split)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, n
        self.num_classes = getattr(ds, "num_classes", None)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def batch_of(ds, idx, heads=None):
    """Stack items of one size: ``(images (N, H, W, 3) uint8, labels, second)``.

    labels: ``(N, H, W)`` long, or ``(N, H, W, K)`` for the K ``heads`` of a net with several
    (items ``(image, {head: label})``); second: the second inputs of items ``(image, label,
    {modality: array})`` stacked, depth ``(N, H, W)``, HHA ``(N, H, W, 3)``, else None.
    """
    items = [ds[int(i)] for i in idx]
    shapes = {item[0].shape for item in items}
    if len(shapes) != 1:
        raise InputError(
            f"images of one batch or mosaic differ in size ({sorted(shapes)}); use --batch 1 and --mosaic 1 "
            "for datasets of mixed sizes (whole-image training, as in the paper)"
        )
    images = torch.from_numpy(np.stack([item[0] for item in items]))
    if heads:
        labels = np.stack([np.stack([item[1][h] for h in heads], -1) for item in items])
    else:
        labels = np.stack([item[1] for item in items])
    second = None
    if len(items[0]) == 3:
        (modality,) = items[0][2]
        second = torch.from_numpy(np.stack([item[2][modality] for item in items]))
    return images, torch.from_numpy(labels.astype(np.int64)), second


def tile(t: torch.Tensor, k: int) -> torch.Tensor:
    """Groups of k*k maps into one canvas each: ``(N*k*k, H, W, *rest)`` -> ``(N, k*H, k*W, *rest)``,
    row by row."""
    if k == 1:
        return t
    n, h, w, rest = t.shape[0], t.shape[1], t.shape[2], tuple(t.shape[3:])
    t = t.reshape(n // (k * k), k, k, h, w, *rest).transpose(2, 3)
    return t.reshape(-1, k * h, k * w, *rest)


def mosaic(images: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile groups of k*k images into one canvas: ``(N*k*k, H, W, 3)`` -> ``(N, k*H, k*W, 3)``
    (labels ``(N*k*k, H, W)`` -> ``(N, k*H, k*W)``, per head ``(..., K)`` alike; a second input
    through ``tile`` in the same order).

    The reference nets pad conv1_1 by 100 pixels, so a 96x96 image costs a 296x296 forward;
    3x3 tiles cost 488x488 for nine images, 3.3x less per image.
    """
    return tile(images, k), tile(labels, k)


def augment(images: torch.Tensor, labels: torch.Tensor, scale: float, flips: torch.Tensor):
    """Random scaling and horizontal flips of a batch.

    images: ``(N, C, H, W)`` float, every input channel (a second input concatenated by the
    Preprocessor flips and scales with the image), labels: ``(N, H, W)`` long, or ``(N, K, H, W)``
    for a net of K heads; one scale for the batch (so it stays one tensor), one flip flag per
    image ``flips: (N,) bool``. Images resize bilinearly, labels by nearest neighbour (ids must
    not blend).
    """
    if flips.any():
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flips.view(-1, *[1] * (labels.dim() - 1)), labels.flip(-1), labels)
    if scale != 1.0:
        h, w = labels.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        per_head = labels.dim() == 4
        y = F.interpolate((labels if per_head else labels[:, None]).float(), size=size, mode="nearest").long()
        labels = y if per_head else y[:, 0]
    return images, labels


def draw_batch(args, ds, step: int, rank: int, world: int, heads=None):
    """This rank's share of the global batch of ``step``: ``(images (n, H, W, 3) uint8, labels
    (n, H, W) long (per head (n, H, W, K)), second input (n, H, W[, 3]) or None, scale, flips (n,)
    bool)``. The batch depends only on (seed, step): a resumed run sees the same data, and the
    ranks split one batch between them."""
    rng, idx, mine = _draw(args, len(ds), step, rank, world)
    scale = float(rng.uniform(args.scale_min, args.scale_max)) if args.scale_max > 0 else 1.0
    flips = torch.from_numpy(rng.random(args.batch) < 0.5)
    if not args.flip:
        flips[:] = False
    images, labels, second = batch_of(ds, idx[mine].reshape(-1), heads)
    images, labels = mosaic(images, labels, args.mosaic)
    if second is not None:
        second = tile(second, args.mosaic)
    return images, labels, second, scale, flips[mine]


def batch_items(args, ds, step: int, rank: int, world: int) -> list[int]:
    """The dataset indices ``draw_batch`` reads for this rank's share of the batch of ``step``."""
    _, idx, mine = _draw(args, len(ds), step, rank, world)
    return [int(i) for i in idx[mine].reshape(-1)]


def _draw(args, n: int, step: int, rank: int, world: int):
    """(the batch's generator, after its indices: (batch, mosaic * mosaic) of ``n``, this rank's rows)."""
    rng = np.random.default_rng([args.seed, step, 0xB47C])
    idx = rng.integers(0, n, (args.batch, args.mosaic * args.mosaic))
    return rng, idx, slice(rank * args.batch // world, (rank + 1) * args.batch // world)
