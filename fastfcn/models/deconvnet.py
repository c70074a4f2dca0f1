"""DeconvNet (Noh, Hong, Han): VGG16 encoder with BatchNorm keeping its pooling
switches, fc6/fc7, fc6-deconv, and a mirrored decoder of max-unpooling and
3x3 deconvolutions, then a 1x1 seg-score.

Sizes: the net was designed for 224x224 proposals (pool5 7x7, fc6 7x7 valid ->
1x1). Any input works: it is zero-padded at the bottom and right (after mean
subtraction, so the pad is the mean colour) to a multiple of 32 and at least
224 on each side, run, and the logits are cropped back to H x W.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..kernels.reference import finish
from .backbone import Conv, Pool, run_conv
from .common import SegmentationModel, ops_impl, scaled
from .fcn import VGG_BLOCKS

# decoder blocks, coarse to fine: (unpool level, [(name, out channels at width 1)])
DECODER = (
    (5, (("deconv5_1", 512), ("deconv5_2", 512), ("deconv5_3", 512))),
    (4, (("deconv4_1", 512), ("deconv4_2", 512), ("deconv4_3", 256))),
    (3, (("deconv3_1", 256), ("deconv3_2", 256), ("deconv3_3", 128))),
    (2, (("deconv2_1", 128), ("deconv2_2", 64))),
    (1, (("deconv1_1", 64), ("deconv1_2", 64))),
)
MIN_SIZE = 224
MULTIPLE = 32


def _bn_name(conv: str) -> str:
    # conv3_2 -> bn3_2, deconv3_2 -> debn3_2, fc6 -> bn6, fc6_deconv -> fc6_deconv_bn
    if conv.startswith("conv"):
        return "bn" + conv[4:]
    if conv.startswith("deconv"):
        return "debn" + conv[6:]
    if conv in ("fc6", "fc7"):
        return "bn" + conv[2:]
    return conv + "_bn"


def padded_size(h: int) -> int:
    """The side DeconvNet runs at for an input side h: >= 224 and a multiple of 32."""
    # sym_max is max() for ints; for torch.export's symbolic sizes it avoids freezing the branch.
    # Rounding up with non-negative operands only: the ONNX exporter lowers symbolic // to an
    # integer Div, which truncates, so -(-h // 32) would round down in the exported graph.
    return torch.sym_max(MIN_SIZE, (h + MULTIPLE - 1) // MULTIPLE * MULTIPLE)


class DeconvNet(SegmentationModel):
    """forward(x: (N, 3, H, W)) -> logits (N, C, H, W)."""

    has_dead_zone = True  # the zero padding to >= 224 and a multiple of 32 (encoder only)

    def __init__(self, num_classes: int = 21, width: float = 1.0, dropout: float = 0.5):
        super().__init__("deconvnet", num_classes, width, {"dropout": dropout})
        self._pairs: list[tuple[str, str]] = []
        c_in, enc = 3, []
        for b, (c, n) in enumerate(VGG_BLOCKS, 1):
            for i in range(1, n + 1):
                name = f"conv{b}_{i}"
                c_out = scaled(c, width)
                self._add(name, nn.Conv2d(c_in, c_out, 3, padding=1), c_out)
                enc.append(Conv(name, bn=_bn_name(name)))
                c_in = c_out
            enc.append(Pool(2, 2, switches=b))
        self.backbone = tuple(enc)
        c5, c_fc = c_in, scaled(4096, width)
        self._add("fc6", nn.Conv2d(c5, c_fc, 7), c_fc)
        self._add("fc7", nn.Conv2d(c_fc, c_fc, 1), c_fc)
        # fc6_deconv and the decoder's 3x3 deconvolutions have stride 1: Conv steps (run as the
        # equivalent convolution by a backend's ConvImpl; models/backbone.py conv_weight).
        self._add("fc6_deconv", nn.ConvTranspose2d(c_fc, c5, 7), c5)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        c_in = c5
        # decoder blocks, coarse to fine: (unpool level, its Conv steps)
        self._dec: list[tuple[int, tuple[Conv, ...]]] = []
        for level, layers in DECODER:
            steps = []
            for name, c in layers:
                c_out = scaled(c, width)
                self._add(name, nn.ConvTranspose2d(c_in, c_out, 3, padding=1), c_out)
                steps.append(Conv(name, bn=_bn_name(name)))
                c_in = c_out
            self._dec.append((level, tuple(steps)))
        self.seg_score = nn.Conv2d(c_in, num_classes, 1)
        self.extra_steps = (
            Conv("fc6", bn="bn6"), Conv("fc7", bn="bn7"), Conv("fc6_deconv", bn="fc6_deconv_bn"),
            *(s for _, steps in self._dec for s in steps), Conv("seg_score", relu=False),
        )  # fmt: skip
        self.head_convs = frozenset({"seg_score"})

    def _add(self, name: str, conv: nn.Module, c: int) -> None:
        setattr(self, name, conv)
        setattr(self, _bn_name(name), nn.BatchNorm2d(c))
        self._pairs.append((name, _bn_name(name)))

    def bn_pairs(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def pool_with_switches(self, h: torch.Tensor, kernel: int, stride: int):
        """The fused mode's pooling: (pooled, one-byte switches) through fastfcn.ops."""
        return ops.max_pool2d_with_switches(h, kernel, stride, True, impl=ops_impl(self.impl))

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        impl = ops_impl(self.impl)
        fused = self.impl != "reference"
        H, W = x.shape[-2:]
        Hp, Wp = padded_size(H), padded_size(W)
        # Symbolic sizes (ONNX export) always pad (a zero pad is a copy) so the graph keeps both cases.
        symbolic = isinstance(H, torch.SymInt) or isinstance(W, torch.SymInt)
        h = F.pad(x, (0, Wp - W, 0, Hp - H)) if symbolic or (Hp, Wp) != (H, W) else x
        switches = {}
        image = None if symbolic else (H, W)
        h = self.run_backbone(h, {}, switches, self.pool_with_switches if fused else None, image)
        fc6, fc7, fc6_deconv = self.extra_steps[:3]
        h = self.drop7(run_conv(self, fc7, self.drop6(run_conv(self, fc6, h))))
        # Fused mode: the ReLU of a conv right before an unpooling runs inside the unpool kernel
        # (one pass fewer), unless a ConvImpl already fuses it (the CPU's planned convs do).
        defer = fused and "fc6_deconv" not in self._conv_impls
        h = run_conv(self, replace(fc6_deconv, relu=False) if defer else fc6_deconv, h)
        for level, steps in self._dec:
            sw, size = switches[level]
            if fused:
                h = ops.max_unpool2d(h, sw, size, 2, 2, relu=defer, impl=impl)
            else:
                h = F.max_unpool2d(h, sw, 2, 2, output_size=size)
            for i, step in enumerate(steps):
                last = i == len(steps) - 1
                defer = fused and level > 1 and last and step.name not in self._conv_impls
                h = run_conv(self, replace(step, relu=False) if defer else step, h)
        score = run_conv(self, self.extra_steps[-1], h)
        return finish(score[:, :, :H, :W], output)
