"""PASCAL-Context FCN-32s / 16s / 8s: the VOC nets with 60 classes.

fcn.berkeleyvision.org pascalcontext-fcn{32,16,8}s/net.py: the VOC geometry and layer names
(``score_fr``, ``upscore2``, ``score_pool4``, ...) with num_output 60 (59 classes + background,
data/pascal-context/classes-59.txt) and the VOC mean (pascalcontext_layers.py). Its own arch
names, so a checkpoint records which dataset it is.
"""

from __future__ import annotations

from ..config import PASCAL_CONTEXT_ARCHS, PASCAL_CONTEXT_CLASSES
from .fcn import FCN


class PascalContextFCN(FCN):
    """pascalcontext-fcn32s / 16s / 8s: FCN of the same stride, ``num_classes`` 60 by default.
    forward(x: (N, 3, H, W)) -> logits (N, C, H, W)."""

    def __init__(self, arch: str = "pascalcontext-fcn8s", num_classes: int = len(PASCAL_CONTEXT_CLASSES),
                 width: float = 1.0, learnable_upsampling: bool = False, dropout: float = 0.5):  # fmt: skip
        if arch not in PASCAL_CONTEXT_ARCHS:
            raise ValueError(f"PASCAL-Context arch must be one of {list(PASCAL_CONTEXT_ARCHS)}; got {arch!r}")
        base = arch.removeprefix("pascalcontext-")
        super().__init__(base, num_classes, width, learnable_upsampling, dropout)
        # The arch's own defaults (config.ARCH_CLASS_NAMES: the dataset's names at 60 classes).
        self.config = self.config.replace(arch=arch, class_names=None)
