"""The skip-path head as data (docs/design.md, idea 1).

Every FCN variant, FCN-AlexNet and the dilated net's x8 output end in
"upsample, crop, add a scaled skip, repeat, crop to the input". A head is a
short list of stages run by one op (``fastfcn.ops.fcn_head``): a new variant
is a new list, not new code. Offsets are the reference nets' crop offsets
(top-left, not centred) from docs/facts.md, "Crop offsets".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import ops


@dataclass(frozen=True)
class Tap:
    """A skip source: ``score(input_scale * features[source])``.

    input_scale is the at-once variant's constant (0.01 for pool4, 0.0001 for
    pool3), applied before the score layer as in the reference net.
    """

    score: str
    source: str
    input_scale: float = 1.0


@dataclass(frozen=True)
class Stage:
    """One upsampling stage: ``upsample`` (a ConvTranspose2d module name) with
    kernel/stride, then either add ``scale * crop(skip, offset)`` (intermediate
    stages) or crop to the input's size from ``offset`` (the final stage)."""

    upsample: str
    kernel: int
    stride: int
    offset: int
    skip: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Head:
    """score: the coarsest score layer's name; taps: the skip sources in stage
    order; stages: intermediate stages (each with a skip) then the final one."""

    score: str
    taps: tuple[Tap, ...]
    stages: tuple[Stage, ...]

    def __post_init__(self):
        *mid, last = self.stages
        if last.skip is not None or any(s.skip is None for s in mid):
            raise ValueError("a head's intermediate stages take a skip and its final stage none")
        if [s.skip for s in mid] != [t.score for t in self.taps]:
            raise ValueError("a head's taps must be the skips of its stages, in order")


def _fcn8s(atonce: bool) -> Head:
    return Head(
        score="score_fr",
        taps=(
            Tap("score_pool4", "pool4", 0.01 if atonce else 1.0),
            Tap("score_pool3", "pool3", 0.0001 if atonce else 1.0),
        ),
        stages=(
            Stage("upscore2", 4, 2, offset=5, skip="score_pool4"),
            Stage("upscore_pool4", 4, 2, offset=9, skip="score_pool3"),
            Stage("upscore8", 16, 8, offset=31),
        ),
    )


HEADS: dict[str, Head] = {
    "fcn32s": Head("score_fr", (), (Stage("upscore", 64, 32, offset=19),)),
    "fcn16s": Head(
        "score_fr",
        (Tap("score_pool4", "pool4"),),
        (Stage("upscore2", 4, 2, offset=5, skip="score_pool4"), Stage("upscore16", 32, 16, offset=27)),
    ),
    "fcn8s": _fcn8s(False),
    "fcn8s-atonce": _fcn8s(True),
    "fcn-alexnet": Head("score_fr", (), (Stage("upscore", 63, 32, offset=18),)),
    # Not a reference net (never released): kernel 63 and offset 16 = conv1 pad 18 - 2 centre the
    # receptive fields exactly (derivation in models/googlenet.py).
    "fcn-googlenet": Head("score_fr", (), (Stage("upscore", 63, 32, offset=16),)),
    # Grouped bilinear deconvolution k16 s8 pad 4: pad 4 is a crop from offset 4.
    "dilated": Head("score", (), (Stage("upscore", 16, 8, offset=4),)),
}


def run_head(
    head: Head,
    model: nn.Module,
    score: torch.Tensor,
    features: dict[str, torch.Tensor],
    size: tuple[int, int],
    output: str = "logits",
    impl: str | None = "reference",
) -> torch.Tensor:
    """Run ``head`` on the coarsest score map.

    score: (N, C, h, w); features: the tap sources by name; size: the input's (H, W).
    Returns logits/probs (N, C, H, W) or labels (N, H, W).
    """
    skips = []
    for tap in head.taps:
        src = features[tap.source]
        if tap.input_scale != 1.0:
            src = src * tap.input_scale
        # apply_conv runs the score layer through the ConvImpl a backend set on it, if any.
        apply = getattr(model, "apply_conv", None)
        skips.append(apply(tap.score, src) if apply is not None else getattr(model, tap.score)(src))
    stages = head.stages
    return ops.fcn_head(
        score,
        skips,
        [getattr(model, s.upsample).weight for s in stages],
        [s.stride for s in stages],
        [s.offset for s in stages],
        [s.scale for s in stages[:-1]],
        size,
        output,
        impl=impl,
    )
