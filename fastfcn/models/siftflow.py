"""SIFT Flow FCN-32s / 16s / 8s: one VGG16 backbone, two heads (Long, Shelhamer, Darrell).

The reference nets (fcn.berkeleyvision.org siftflow-fcn{32,16,8}s/net.py) are the VOC nets
with every head layer twice: ``score_fr_sem``, ``upscore2_sem``, ``score_pool4_sem``,
``upscore_pool4_sem``, ``score_pool3_sem``, ``upscore8_sem`` (fcn8s), ``upscore16_sem``
(fcn16s), ``upscore_sem`` (fcn32s), and the same with ``_geo``; semantic 33 classes, geometric
3 (data/sift-flow/classes.txt, ids shifted down by one as siftflow_layers.py does); fc6/fc7,
conv1_1's pad 100 and the crop offsets are the VOC nets'. Input: BGR minus
(114.578, 115.294, 108.353) (siftflow_layers.py), 0..255.

Config: ``num_classes`` is both heads' channels (33 + 3 = 36) and ``options.geometric_classes``
the second head's (3); see models/multihead.py for the output layout.
"""

from __future__ import annotations

import torch

from ..config import SIFTFLOW_GEOMETRIC, SIFTFLOW_SEMANTIC
from ..heads import HEADS, run_head
from .backbone import run_conv
from .common import FC_STEPS, SegmentationModel, ops_impl
from .fcn import FCN, score_steps
from .multihead import GEOMETRIC_CLASSES, SIFTFLOW_ARCHS, combine

SUFFIXES = (("semantic", "_sem"), ("geometric", "_geo"))


class SiftFlowFCN(FCN):
    """siftflow-fcn32s / 16s / 8s. forward(x: (N, 3, H, W), output) -> logits or probs
    (N, S + G, H, W) (semantic channels, then geometric; probs softmaxed per head) or labels
    (N, 2, H, W) (semantic ids, geometric ids). num_classes = S + G, geometric_classes = G."""

    def __init__(
        self,
        arch: str = "siftflow-fcn8s",
        num_classes: int = len(SIFTFLOW_SEMANTIC) + GEOMETRIC_CLASSES,
        width: float = 1.0,
        learnable_upsampling: bool = False,
        dropout: float = 0.5,
        geometric_classes: int = GEOMETRIC_CLASSES,
    ):
        if arch not in SIFTFLOW_ARCHS:
            raise ValueError(f"SIFT Flow arch must be one of {list(SIFTFLOW_ARCHS)}; got {arch!r}")
        if isinstance(geometric_classes, bool) or not isinstance(geometric_classes, int) or not (
            isinstance(num_classes, int) and 1 <= geometric_classes < num_classes
        ):
            raise ValueError(
                f"geometric_classes must be an int in 1..num_classes-1 (num_classes counts both heads' "
                f"classes); got geometric_classes={geometric_classes!r}, num_classes={num_classes!r}"
            )
        options = {"learnable_upsampling": learnable_upsampling, "dropout": dropout,
                   "geometric_classes": geometric_classes}  # fmt: skip
        # FCN.__init__ would add one head under the VOC names: the base class's, then FCN's
        # builders once per head. The mean and class names are the config's defaults for the arch.
        SegmentationModel.__init__(self, arch, num_classes, width, options)
        sem = num_classes - geometric_classes
        self.heads_out = (("semantic", sem), ("geometric", geometric_classes))
        base = HEADS[arch.removeprefix("siftflow-")]
        self.heads = tuple(base.suffixed(suffix) for _, suffix in SUFFIXES)
        c_fc = self._add_vgg16(width, dropout)
        for head, (_, c) in zip(self.heads, self.heads_out):
            self._add_head(head, c, c_fc, width, learnable_upsampling)
        per_head = [score_steps(head) for head in self.heads]
        self.extra_steps = FC_STEPS + tuple(s for steps in per_head for s in steps)
        self.head_convs = frozenset(s.name for steps in per_head for s in steps)
        self._fr_steps = tuple(steps[0] for steps in per_head)  # score_fr_sem, score_fr_geo
        if (sem, geometric_classes) != (len(SIFTFLOW_SEMANTIC), len(SIFTFLOW_GEOMETRIC)):
            # 36 classes split otherwise: the names would sit in the wrong head
            self.config = self.config.replace(class_names=[f"class_{i}" for i in range(num_classes)])

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        feats = {}
        h = self._fc(self.run_backbone(x, feats))
        impl = ops_impl(self.impl)
        outs = [run_head(head, self, run_conv(self, step, h), feats, size, output, impl)
                for head, step in zip(self.heads, self._fr_steps)]
        return combine(outs, output)
