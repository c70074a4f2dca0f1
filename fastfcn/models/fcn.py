"""FCN-32s / 16s / 8s / 8s at-once on VGG16 and FCN-AlexNet (Long, Shelhamer, Darrell).

Exact reference geometry (docs/facts.md, "Reference geometry"): conv1_1 pad 100, Caffe ceil-mode pooling,
fc6 7x7 pad 0 (AlexNet: 6x6), 1x1 score layers, bilinear Deconvolutions without
bias, the crop offsets of heads.HEADS. Module names are the Caffe layer names,
so state dicts of the common PyTorch port load by name. Output is exactly
H x W for every H, W >= 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import HEADS, run_head
from .backbone import LRN, Conv, Pool, run_conv
from .common import FC_STEPS, SegmentationModel, caffe_lrn, make_upsampler, ops_impl, scaled

VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def add_vgg(model: nn.Module, c_in: int, width: float, suffix: str = "", first: str | None = None):
    """Register the VGG16 convs of the reference FCNs on ``model`` (conv1_1 pad 100, the rest pad 1)
    named ``conv{b}_{i}`` + ``suffix`` (late fusion's "conv1_1color"), conv1_1 named ``first``
    where given (early fusion's "conv1_1_bgrd"); returns (steps, output channels). The pools tap
    ``pool{b}`` (+ suffix)."""
    steps = []
    for b, (c, n) in enumerate(VGG_BLOCKS, 1):
        for i in range(1, n + 1):
            base = f"conv{b}_{i}"
            name = first if base == "conv1_1" and first is not None else base + suffix
            c_out = scaled(c, width)
            setattr(model, name, nn.Conv2d(c_in, c_out, 3, padding=100 if base == "conv1_1" else 1))
            steps.append(Conv(name))
            c_in = c_out
        steps.append(Pool(2, 2, tap=f"pool{b}{suffix}"))
    return tuple(steps), c_in


def score_steps(head) -> tuple[Conv, ...]:
    """The head's 1x1 score layers as Conv steps without ReLU: score_fr, then the taps'."""
    return (Conv(head.score, relu=False),) + tuple(Conv(t.score, relu=False) for t in head.taps)


class FCN(SegmentationModel):
    """FCN-32s, FCN-16s, FCN-8s or FCN-8s at-once on VGG16 ("D").

    forward(x: (N, 3, H, W)) -> logits (N, C, H, W).
    """

    has_dead_zone = True  # conv1_1's pad 100

    def __init__(
        self,
        arch: str = "fcn8s",
        num_classes: int = 21,
        width: float = 1.0,
        learnable_upsampling: bool = False,
        dropout: float = 0.5,
    ):
        if arch not in ("fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce"):
            raise ValueError(f"FCN arch must be fcn32s, fcn16s, fcn8s or fcn8s-atonce; got {arch!r}")
        super().__init__(
            arch, num_classes, width, {"learnable_upsampling": learnable_upsampling, "dropout": dropout},
        )  # fmt: skip
        self._build(HEADS[arch], 3, width, learnable_upsampling, dropout)

    def _build(self, head, c_in: int, width: float, learnable_upsampling: bool, dropout: float,
               first: str | None = None) -> None:
        """The VGG16 backbone on ``c_in`` input channels (conv1_1 named ``first`` where given),
        fc6/fc7, and ``head``: its score layers and upsamplings."""
        self.head = head
        c_fc = self._add_vgg16(width, dropout, c_in, first)
        self._add_head(head, self.num_classes, c_fc, width, learnable_upsampling)
        self.extra_steps = FC_STEPS + score_steps(head)
        self.head_convs = frozenset(s.name for s in score_steps(head))

    def _add_vgg16(self, width: float, dropout: float, c_in: int = 3, first: str | None = None) -> int:
        """conv1_1 .. conv5_3 (the backbone steps, tapping pool1..pool5), fc6 and fc7;
        returns fc7's channel count."""
        self.backbone, c_in = add_vgg(self, c_in, width, first=first)
        return self._add_fc(c_in, 7, width, dropout)

    def _add_head(self, head, num_classes: int, c_fc: int, width: float, learnable_upsampling: bool) -> None:
        """The head's score layers (1x1 on fc7 and on its taps) and upsamplings, by their names."""
        setattr(self, head.score, nn.Conv2d(c_fc, num_classes, 1))
        ch = {"pool3": scaled(256, width), "pool4": scaled(512, width)}
        for tap in head.taps:
            setattr(self, tap.score, nn.Conv2d(ch[tap.source], num_classes, 1))
        for st in head.stages:
            up = make_upsampler(num_classes, st.kernel, st.stride, learnable_upsampling)
            setattr(self, st.upsample, up)

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        feats = {}
        h = self._fc(self.run_backbone(x, feats))
        score = run_conv(self, self.extra_steps[2], h)
        return run_head(self.head, self, score, feats, size, output, ops_impl(self.impl))


class FCNAlexNet(SegmentationModel):
    """FCN-AlexNet: conv1 11x11/4 pad 100, LRN, grouped conv2/4/5, fc6 6x6,
    upscore 63/32, final crop 18. forward(x: (N, 3, H, W)) -> (N, C, H, W)."""

    has_dead_zone = True  # conv1's pad 100

    def __init__(
        self, num_classes: int = 21, width: float = 1.0, learnable_upsampling: bool = False,
        dropout: float = 0.5,
    ):  # fmt: skip
        super().__init__(
            "fcn-alexnet", num_classes, width,
            {"learnable_upsampling": learnable_upsampling, "dropout": dropout},
        )  # fmt: skip
        self.head = HEADS["fcn-alexnet"]
        c1, c2, c3, c4, c5 = (scaled(c, width, 2) for c in (96, 256, 384, 384, 256))
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=100)
        self.norm1 = caffe_lrn()
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, groups=2)
        self.norm2 = caffe_lrn()
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=2)
        c_fc = self._add_fc(c5, 6, width, dropout)
        self.score_fr = nn.Conv2d(c_fc, num_classes, 1)
        self.upscore = make_upsampler(num_classes, 63, 32, learnable_upsampling)
        self.backbone = (
            Conv("conv1"), Pool(3, 2), LRN("norm1"), Conv("conv2"), Pool(3, 2), LRN("norm2"),
            Conv("conv3"), Conv("conv4"), Conv("conv5"), Pool(3, 2),
        )  # fmt: skip
        self.extra_steps = FC_STEPS + score_steps(self.head)
        self.head_convs = frozenset({"score_fr"})

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        h = self._fc(self.run_backbone(x, {}))
        score = run_conv(self, self.extra_steps[2], h)
        return run_head(self.head, self, score, {}, size, output, ops_impl(self.impl))
