"""The NYUDv2 FCN-32s nets of fcn.berkeleyvision.org (40 classes): colour, HHA, early and late fusion.

Reference: the repository's nyud-fcn32s-{color,hha,color-d,color-hha}/net.py and nyud_layers.py.

- ``nyud-fcn32s-color``: VOC FCN-32s geometry on BGR minus (116.190, 97.203, 92.318).
- ``nyud-fcn32s-hha``: the same net on an HHA image minus (132.431, 94.076, 118.477), in the
  file's channel order (``load_hha`` does not swap).
- ``nyud-fcn32s-color-d`` (early fusion): ``data = Concat(color, depth)``, 4 channels, into
  ``conv1_1_bgrd``; depth is ``log(depth_mm) - 7.844``; the rest is named as VOC FCN-32s.
- ``nyud-fcn32s-color-hha`` (late fusion): two whole VGG16 streams, the modality appended to
  every layer name (``modality_fcn``: ``conv1_1color`` ... ``fc7color``, ``score_frcolor``;
  ``conv1_1hha`` ... ``score_frhha``), ``score_fused = 0.5 * score_frcolor + 0.5 * score_frhha``
  (Eltwise SUM, coeff 0.5, 0.5), one ``upscore`` 64/32 and the crop from 19 to the colour
  input's size. The model takes colour and HHA concatenated (6 channels) and splits them, so
  every backend keeps one input tensor.

Module names are the Caffe layer names: a .caffemodel of these nets loads by name. Every net
pads conv1_1 by 100 in every stream, so the backbone planner's dead-zone skip applies to each
stream (``backbone_streams``): at NYUDv2's 425 x 560, 240.7 of late fusion's 352.1 GMAC are
computed (121.3 of 177.1 for early fusion). Fused backend, fp32, batch 1, 2 threads, AMD EPYC
Zen 4 at load ~2.3, medians of 5 interleaved rounds (benchmarks/nyud_fusion.py --width 1):
late fusion 2.04 s with the skip vs 2.82 s without, early fusion 0.93 vs 1.37 s.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import HEADS, run_head
from .backbone import Conv, run_conv
from .common import SegmentationModel, fc_steps, make_upsampler, ops_impl
from .fcn import FCN, add_vgg

NYUD_NUM_CLASSES = 40

# arch -> conv1_1's name. The means, the input modalities (fastfcn.config ARCH_MEAN, ARCH_INPUTS)
# and the 40 class names (NYUD_CLASSES) are the config's defaults for these archs.
_SINGLE = {"nyud-fcn32s-color": None, "nyud-fcn32s-hha": None, "nyud-fcn32s-color-d": "conv1_1_bgrd"}
LATE_FUSION = "nyud-fcn32s-color-hha"
ARCHS = (*_SINGLE, LATE_FUSION)
STREAMS = ("color", "hha")
# Keys that only these nets' state dicts have (checkpoint arch inference): the two stream-less
# NYUD nets have the VOC FCN-32s's keys and load as fcn32s unless arch= says otherwise.
ARCH_KEYS = {"conv1_1_bgrd": "nyud-fcn32s-color-d", "conv1_1color": LATE_FUSION, "score_frcolor": LATE_FUSION}


def first_conv(arch: str) -> str:
    """The name of a NYUD arch's first convolution (width inference)."""
    return {"nyud-fcn32s-color-d": "conv1_1_bgrd", LATE_FUSION: "conv1_1color"}.get(arch, "conv1_1")


def score_layer(arch: str) -> str:
    """The name of the score layer that gives a NYUD arch's class count."""
    return "score_frcolor" if arch == LATE_FUSION else "score_fr"


class NYUDFCN32s(FCN):
    """FCN-32s on one NYUDv2 input: colour, HHA, or colour + log depth (4 channels, first layer
    ``conv1_1_bgrd``). forward(x: (N, in_channels, H, W)) -> logits (N, C, H, W)."""

    def __init__(
        self, arch: str = "nyud-fcn32s-color", num_classes: int = NYUD_NUM_CLASSES, width: float = 1.0,
        learnable_upsampling: bool = False, dropout: float = 0.5,
    ):  # fmt: skip
        if arch not in _SINGLE:
            raise ValueError(f"NYUD FCN-32s arch must be one of {list(_SINGLE)}; got {arch!r}")
        SegmentationModel.__init__(
            self, arch, num_classes, width,
            {"learnable_upsampling": learnable_upsampling, "dropout": dropout},
        )  # fmt: skip
        self._build(HEADS["fcn32s"], self.in_channels, width, learnable_upsampling, dropout, _SINGLE[arch])


class NYUDLateFusion(SegmentationModel):
    """nyud-fcn32s-color-hha: a colour and an HHA VGG16 stream, their score maps averaged.

    forward(x: (N, 6, H, W), colour channels 0-2 then HHA 3-5) -> logits (N, C, H, W).
    """

    has_dead_zone = True  # conv1_1color's and conv1_1hha's pad 100

    def __init__(
        self, num_classes: int = NYUD_NUM_CLASSES, width: float = 1.0, learnable_upsampling: bool = False,
        dropout: float = 0.5,
    ):  # fmt: skip
        super().__init__(
            LATE_FUSION, num_classes, width,
            {"learnable_upsampling": learnable_upsampling, "dropout": dropout},
        )  # fmt: skip
        self.head = HEADS["fcn32s"]  # upscore 64/32, crop from 19
        self._streams: dict[str, tuple] = {}
        extra = []
        for s in STREAMS:
            self._streams[s], c_in = add_vgg(self, 3, width, suffix=s)
            c_fc = self._add_fc(c_in, 7, width, dropout, suffix=s)
            setattr(self, f"score_fr{s}", nn.Conv2d(c_fc, num_classes, 1))
            extra += [*fc_steps(s), Conv(f"score_fr{s}", relu=False)]
        self.upscore = make_upsampler(num_classes, 64, 32, learnable_upsampling)
        self.extra_steps = tuple(extra)
        self.head_convs = frozenset(f"score_fr{s}" for s in STREAMS)

    def backbone_streams(self) -> dict[str, tuple]:
        return dict(self._streams)

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        # Each stream's 3 channels as a dense tensor in x's layout: a channel slice of a
        # channels_last batch is neither layout, and every conv of the stream would copy it.
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        fmt = torch.channels_last if cl else torch.contiguous_format
        scores = []
        for i, s in enumerate(STREAMS):
            xs = x[:, 3 * i : 3 * i + 3].contiguous(memory_format=fmt)
            h = self._fc(self.run_backbone(xs, {}, stream=s), s)
            scores.append(run_conv(self, Conv(f"score_fr{s}", relu=False), h))
        # score_fused: Eltwise SUM with coeff 0.5, 0.5
        score = 0.5 * scores[0] + 0.5 * scores[1]
        return run_head(self.head, self, score, {}, size, output, ops_impl(self.impl))
