"""FCN-GoogLeNet (Long, Shelhamer, Darrell, sec. 4.1 and Table 1): GoogLeNet (Inception v1,
Szegedy et al. 2015) made fully convolutional with an FCN-32s-style head.

The authors never released it ("coming soon" in fcn.berkeleyvision.org's README), so the net
is built from what the paper says: "For GoogLeNet, we use only the final loss layer, and
improve performance by discarding the final average pooling layer". The backbone is the BVLC
``bvlc_googlenet`` deploy.prototxt up to ``inception_5b`` (no aux classifiers, no pool5, no
loss3/classifier); then ``score_fr`` (1x1, 1024 -> classes), one bilinear Deconvolution
``upscore`` by 32 and a crop to the input, as in FCN-32s.

Layer names are the Caffe names with '/' (no valid module name) replaced by '_':
``conv1/7x7_s2`` -> ``conv1_7x7_s2``, ``pool1/norm1`` -> ``pool1_norm1``,
``inception_3a/3x3_reduce`` -> ``inception_3a_3x3_reduce``, ... The caffemodel reader maps
layer names the same way (``checkpoint._caffe_name``), so a Caffe file loads by name; no two
GoogLeNet names collide under the mapping. Pooling layers (``pool1/3x3_s2`` ...) carry no
weights and stay anonymous Pool steps.

Choices the paper leaves open, and what is used here:

- Input padding: conv1/7x7_s2 pad ``CONV1_PAD`` = 18 instead of GoogLeNet's 3 (FCN-VGG's
  conv1_1 pad 100 plays the same role). The smallest pad for which every H, W >= 1 works:
  the four 3x3/2 ceil-mode poolings need an input of at least 2 (``(h - 3) / 2`` rounded up,
  + 1 >= 1; Caffe and torch both clip a window that overhangs), which for H = 1 needs
  conv1's output >= 16, i.e. ``(1 + 2 * pad - 7) // 2 + 1 >= 16``: pad >= 18 (pad 17 fails
  for H = 1, 2; ``googlenet_sizes`` and tests/test_googlenet.py check every H in 1..4096).
  A larger pad only adds image-independent work: at 500x500 pad 18 costs 1.13x the MACs of
  pad 3 (conv1's map 265 vs 250 wide; 9.21 vs 8.15 GMAC), pad 100 would cost 1.93x.
- Upsampling kernel 63 (stride 32), not FCN-32s' 64. In Caffe's coordinate arithmetic
  (fcn.berkeleyvision.org coord_map.py: a conv / pool maps x -> (x + pad - (k - 1) / 2) / s,
  a Deconvolution x -> s x + (k - 1) / 2 - pad), conv1 (k7 s2 pad 18) gives
  (x + 15) / 2, each 3x3/2 pool (x - 1) / 2, the Inception blocks and 1x1 layers nothing:
  score_fr's map is (x + 15) / 32 - 15 / 16 = (x - 15) / 32. A Deconvolution k64 s32 maps
  that to x + 16.5: a half-pixel offset, which no crop can centre (coord_map refuses
  non-integer crops). k63 maps it to x + 16: the crop offset is ``pad - 2`` = 16, exact. The
  3x3/2 poolings are FCN-AlexNet's, and the reference FCN-AlexNet uses upscore k63 / crop 18
  where k64 would give it 18.5. Initialised bilinear (docs/facts.md's filter: factor 32,
  centre 31) on the diagonal, fixed unless ``learnable_upsampling``.
- Dropout before score_fr: GoogLeNet's ``pool5/drop_7x7_s1`` ratio, 0.4 (``dropout``), on
  the classifier's input as in bvlc_googlenet (FCN-VGG likewise keeps fc6/fc7's 0.5).
- Mean: the BVLC googlenet mean, BGR (104, 117, 123) (its train_val.prototxt mean_value;
  ``fastfcn.config.ARCH_MEAN``); BGR, 0..255, like every Caffe net here.
- LRN as in Caffe (across channels, local_size 5, alpha 1e-4, beta 0.75, k 1), after pool1 and
  after conv2/3x3, with the same module (and bf16 handling) as FCN-AlexNet.
- No aux classifiers (loss1/*, loss2/*): the paper uses only the final loss.
- The dead-zone skip (runtime/deadzone.py) is not applied (``has_dead_zone = False``; the
  planner refuses Inception blocks): with pad 18 there is little to skip. At 500x500 the
  image-independent positions are conv1's outer 6 px (253^2 of 265^2 outputs depend on the
  image), conv2/3x3_reduce's 128^2 and conv2/3x3's 130^2 of 132^2; from pool2 on every
  position reaches the image. That is 120.7 MMAC of 9.21 GMAC (1.3%), against 31% for
  FCN-8s with its pad 100; planning the four branches of an Inception block would buy nothing.

Receptive field 715 px (Table 1 lists 907 for GoogLeNet: with the 7x7 average pool, 715 +
6 x 32). Cost (``fastfcn.flops.count_macs``, 500x500, 21 classes): 9.21 GMAC, against 181.4
for FCN-32s on VGG16 (19.7x) and 21.4 for FCN-AlexNet, with 6.0 M learned parameters
(Table 1: "6M"); 5,973,552 of them are bvlc_googlenet's up to inception_5b.
tests/test_googlenet.py derives each of these numbers from the prototxt's layer list.
"""

from __future__ import annotations

import torch
from torch import nn

from ..heads import HEADS, run_head
from ..kernels.structure import pool_out_size
from .backbone import LRN, Conv, Inception, Pool, run_conv
from .common import SegmentationModel, caffe_lrn, make_upsampler, ops_impl, scaled

CONV1_PAD = 18
# (name, 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) of bvlc_googlenet deploy.prototxt;
# None marks the 3x3/2 max pooling between stages (pool3/3x3_s2 after 3b, pool4/3x3_s2 after 4e).
INCEPTIONS = (
    ("inception_3a", 64, 96, 128, 16, 32, 32),
    ("inception_3b", 128, 128, 192, 32, 96, 64),
    None,
    ("inception_4a", 192, 96, 208, 16, 48, 64),
    ("inception_4b", 160, 112, 224, 24, 64, 64),
    ("inception_4c", 128, 128, 256, 24, 64, 64),
    ("inception_4d", 112, 144, 288, 32, 64, 64),
    ("inception_4e", 256, 160, 320, 32, 128, 128),
    None,
    ("inception_5a", 256, 160, 320, 32, 128, 128),
    ("inception_5b", 384, 192, 384, 48, 128, 128),
)  # fmt: skip


def googlenet_sizes(size: int, pad: int = CONV1_PAD) -> list[int] | None:
    """Side lengths along one dimension: conv1, pool1, pool2, pool3, pool4 (= score_fr), upscore
    (k63 s32); None where a pooling gets an empty input (its window would start past the map)."""
    h = (size + 2 * pad - 7) // 2 + 1
    out = [h]
    for _ in range(4):
        h = pool_out_size(h, 3, 2)  # Caffe / torch ceil mode, no padding
        if h < 1:
            return None
        out.append(h)
    out.append(32 * (h - 1) + 63)
    return out


class FCNGoogLeNet(SegmentationModel):
    """FCN-32s-style FCN on GoogLeNet (see the module docstring).

    forward(x: (N, 3, H, W)) -> logits (N, C, H, W), for every H, W >= 1.
    """

    has_dead_zone = False  # not applied: see the module docstring

    def __init__(
        self, num_classes: int = 21, width: float = 1.0, learnable_upsampling: bool = False,
        dropout: float = 0.4,
    ):  # fmt: skip
        super().__init__(
            "fcn-googlenet", num_classes, width,
            {"learnable_upsampling": learnable_upsampling, "dropout": dropout},
        )  # fmt: skip
        self.head = HEADS["fcn-googlenet"]
        c1, c2r, c2 = (scaled(c, width) for c in (64, 64, 192))
        self.conv1_7x7_s2 = nn.Conv2d(3, c1, 7, stride=2, padding=CONV1_PAD)
        self.pool1_norm1 = caffe_lrn()
        self.conv2_3x3_reduce = nn.Conv2d(c1, c2r, 1)
        self.conv2_3x3 = nn.Conv2d(c2r, c2, 3, padding=1)
        self.conv2_norm2 = caffe_lrn()
        steps = [
            Conv("conv1_7x7_s2"), Pool(3, 2), LRN("pool1_norm1"),
            Conv("conv2_3x3_reduce"), Conv("conv2_3x3"), LRN("conv2_norm2"), Pool(3, 2),
        ]  # fmt: skip
        c_in = c2
        for spec in INCEPTIONS:
            if spec is None:
                steps.append(Pool(3, 2))
                continue
            steps.append(Inception(spec[0]))
            c_in = self._add_inception(c_in, *spec, width=width)
        self.backbone = tuple(steps)
        self.drop = nn.Dropout(dropout)
        self.score_fr = nn.Conv2d(c_in, num_classes, 1)
        self.upscore = make_upsampler(num_classes, 63, 32, learnable_upsampling)
        self.extra_steps = (Conv("score_fr", relu=False),)
        self.head_convs = frozenset({"score_fr"})

    def _add_inception(self, c_in: int, name: str, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                       cp: int, width: float) -> int:  # fmt: skip
        """The block's six convs (in Caffe's order, which is the state dict's); returns its
        output channel count."""
        c1, c3r, c3, c5r, c5, cp = (scaled(c, width) for c in (c1, c3r, c3, c5r, c5, cp))
        for suffix, cin, cout, k in (
            ("1x1", c_in, c1, 1), ("3x3_reduce", c_in, c3r, 1), ("3x3", c3r, c3, 3),
            ("5x5_reduce", c_in, c5r, 1), ("5x5", c5r, c5, 5), ("pool_proj", c_in, cp, 1),
        ):  # fmt: skip
            setattr(self, f"{name}_{suffix}", nn.Conv2d(cin, cout, k, padding=(k - 1) // 2))
        return c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor, output: str = "logits") -> torch.Tensor:
        self._check_input(x)
        size = (x.shape[-2], x.shape[-1])
        h = self.drop(self.run_backbone(x, {}))
        score = run_conv(self, self.extra_steps[0], h)
        return run_head(self.head, self, score, {}, size, output, ops_impl(self.impl))
