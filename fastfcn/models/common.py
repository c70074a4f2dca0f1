"""Pieces shared by the model families: channel scaling, the config (fastfcn.config.ModelConfig,
where the preprocessing defaults live), the fused/reference switch, Caffe-style layers, BatchNorm folding."""

from __future__ import annotations

import torch
from torch import nn

from fastfcn.kernels.structure import bilinear_weight

# The means, VOC names and palette are defined in fastfcn.config (the one set of defaults) and
# stay importable from here, as before.
from ..config import DILATED_MEAN_BGR, VOC_CLASSES, VOC_MEAN_BGR, ModelConfig, config_inputs, voc_palette  # noqa: F401
from ..modalities import input_channels
from .backbone import Conv, run_conv, run_steps, step_convs

# Model impl names: "reference" is the plain-PyTorch spec (the default forward);
# "fused" routes heads and unpooling through fastfcn.ops (Triton on CUDA, C++ on CPU);
# "triton" / "cpu" pin one implementation.
IMPLS = ("reference", "fused", "triton", "cpu")


def scaled(channels: int, width: float, multiple: int = 1) -> int:
    """channels * width, rounded to a multiple of `multiple` (>= multiple)."""
    return max(multiple, int(round(channels * width / multiple)) * multiple)


def ops_impl(impl: str) -> str | None:
    """Model impl name -> the ``impl=`` argument of fastfcn.ops."""
    return None if impl == "fused" else impl


class SegmentationModel(nn.Module):
    """Base of every model: forward(x: (N, 3, H, W) preprocessed float) ->
    logits (N, C, H, W); ``output="labels"`` / ``"probs"`` for the other forms.

    ``config`` holds what a checkpoint records (arch, num_classes, width,
    options, preprocessing); ``set_impl`` switches between the reference forward
    and the fused ops.
    """

    # The backbone as data (models/backbone.py); families that run through run_steps set it.
    backbone: tuple = ()
    # The other Conv steps the forward runs through run_conv (fc6/fc7, decoder, context module,
    # score layers), and the names among them whose outputs feed the head (score maps: a backend
    # may run these at higher precision than the backbone).
    extra_steps: tuple = ()
    head_convs: frozenset = frozenset()
    # Whether the input's padding (conv1_1's 100 px, DeconvNet's pad to >= 224 and a multiple
    # of 32) surrounds the image with positions that do not depend on it, which a backbone runner
    # may skip (fastfcn.runtime.deadzone). The dilated nets reflect-pad: every position depends
    # on the image.
    has_dead_zone: bool = False
    # pool_impl(h, kernel, stride) -> h: the max pooling of Pool steps without switches (Caffe's
    # ceil rounding, no padding) in place of torch's max_pool2d; set by the runtime (cpu_fast).
    pool_impl = None

    def __init__(self, arch: str, num_classes: int, width: float, options: dict, mean=None, std=None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
        if not (isinstance(width, (int, float)) and 0 < width <= 4):
            raise ValueError(f"width must be a number in (0, 4]; got {width!r}")
        self.impl = "reference"
        # Conv step name -> ConvImpl (models/backbone.py); empty means torch's own convs.
        self._conv_impls: dict = {}
        # runner(h, feats, switches, image_size) -> h: runs the backbone steps in place of
        # run_steps (set by the runtime, e.g. its planner of image-independent positions).
        self.backbone_runner = None
        # Every field the family does not fix (mean, colour order, scale, names, palette, input
        # modalities) takes ModelConfig's default: the reference net's.
        given = {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.config = ModelConfig(arch, num_classes, float(width), options, **given)

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    @property
    def in_channels(self) -> int:
        """Channels of the input forward takes: 3 for an image; more for several modalities
        concatenated (NYUDv2 colour + log depth: 4; colour + HHA: 6)."""
        return input_channels(config_inputs(self.config))

    def set_impl(self, impl: str) -> SegmentationModel:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
        self.impl = impl
        return self

    def backbone_streams(self) -> dict[str, tuple]:
        """Stream name -> backbone steps. One stream, "" (``backbone``), unless the model runs
        one backbone per input modality (late fusion: "color" and "hha")."""
        return {"": self.backbone}

    def conv_steps(self) -> tuple[Conv, ...]:
        """Every Conv step of the model, in forward order: each stream's backbone (an Inception
        block's branch convs included), then extra_steps."""
        steps = tuple(s for stream in self.backbone_streams().values() for s in stream)
        return step_convs(steps) + tuple(self.extra_steps)

    def run_backbone(self, h: torch.Tensor, feats: dict, switches: dict | None = None,
                     pool_with_switches=None, image_size=None, stream: str = "") -> torch.Tensor:
        """The backbone steps of ``stream`` on h (N, C, H, W): through ``backbone_runner`` when one
        is set (a dict of runners by stream for models with several), else ``run_steps``.
        image_size: the top-left (H, W) of h that holds the image (DeconvNet's padding), None for
        all of it."""
        runner = self.backbone_runner
        if isinstance(runner, dict):
            runner = runner.get(stream)
        if runner is not None:
            return runner(h, feats, switches, image_size)
        return run_steps(self, self.backbone_streams()[stream], h, feats, switches, pool_with_switches)

    def apply_conv(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Conv step ``name`` on h (its ConvImpl if one is set, else torch's conv + BN + ReLU)."""
        steps = {s.name: s for s in self.conv_steps()}
        if name not in steps:
            raise ValueError(f"{type(self).__name__} has no conv step {name!r}; it has {list(steps)}")
        return run_conv(self, steps[name], h)

    def set_conv_impl(self, name: str, impl) -> SegmentationModel:
        """Run conv step ``name`` through ``impl(x, padding)`` (see models/backbone.py);
        None restores torch's own convolution."""
        if not any(s.name == name for s in self.conv_steps()):
            names = [s.name for s in self.conv_steps()]
            raise ValueError(f"{type(self).__name__} has no conv step {name!r}; it has {names}")
        if impl is None:
            self._conv_impls.pop(name, None)
        else:
            self._conv_impls[name] = impl
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != c:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            what = "" if c == 3 else f" ({' + '.join(config_inputs(self.config))} concatenated)"
            raise ValueError(f"input must be a float tensor (N, {c}, H, W){what}; got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"input must be a preprocessed float tensor; got dtype {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"input must be non-empty (N, {c}, H, W), N, H, W >= 1; got {tuple(x.shape)}")

    def _add_fc(self, c_in: int, kernel: int, width: float, dropout: float, dilation: int = 1,
                suffix: str = "") -> int:
        """fc6 (kernel x kernel, no pad), fc7 (1x1) to 4096 * width channels, with their
        dropouts (names + ``suffix``: late fusion's "fc6color"); returns that channel count."""
        c_fc = scaled(4096, width)
        setattr(self, f"fc6{suffix}", nn.Conv2d(c_in, c_fc, kernel, dilation=dilation))
        setattr(self, f"fc7{suffix}", nn.Conv2d(c_fc, c_fc, 1))
        setattr(self, f"drop6{suffix}", nn.Dropout(dropout))
        setattr(self, f"drop7{suffix}", nn.Dropout(dropout))
        return c_fc

    def _fc(self, h: torch.Tensor, suffix: str = "") -> torch.Tensor:
        """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout (fc6/fc7 are FC_STEPS in extra_steps;
        with ``suffix``, fc_steps(suffix))."""
        fc6, fc7 = fc_steps(suffix)
        h = getattr(self, f"drop6{suffix}")(run_conv(self, fc6, h))
        return getattr(self, f"drop7{suffix}")(run_conv(self, fc7, h))

    def bn_pairs(self) -> list[tuple[str, str]]:
        """(conv name, BatchNorm name) pairs that fold_batchnorm may merge."""
        return []


def fc_steps(suffix: str = "") -> tuple[Conv, Conv]:
    """fc6 and fc7 as Conv steps, their names + ``suffix``."""
    return Conv(f"fc6{suffix}"), Conv(f"fc7{suffix}")


FC_STEPS = fc_steps()


def caffe_lrn() -> nn.LocalResponseNorm:
    """Caffe's LRN across channels as AlexNet and GoogLeNet use it (local_size 5, alpha 1e-4,
    beta 0.75): x / (1 + alpha / 5 * sum of x^2 over 5 neighbouring channels)^beta."""
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def make_upsampler(channels: int, k: int, stride: int, learnable: bool, depthwise: bool = False):
    """Deconvolution initialised bilinear on the diagonal, fixed unless learnable."""
    m = nn.ConvTranspose2d(
        channels, channels, k, stride=stride, bias=False, groups=channels if depthwise else 1
    )
    with torch.no_grad():
        m.weight.copy_(bilinear_weight(channels, k, depthwise=depthwise))
    m.weight.requires_grad_(learnable)
    return m


@torch.no_grad()
def fold_batchnorm(model: SegmentationModel) -> SegmentationModel:
    """Fold every eval-mode BatchNorm into the convolution before it, in place.

    y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta becomes a conv with
    weight * s and bias (b - mean) * s + beta, s = gamma / sqrt(var + eps): the
    same function up to float rounding. The BatchNorm becomes an Identity.
    Works for Conv2d (weight (out, in, k, k)) and ConvTranspose2d (weight (in, out, k, k)).
    """
    for conv_name, bn_name in model.bn_pairs():
        conv, bn = getattr(model, conv_name), getattr(model, bn_name)
        if isinstance(bn, nn.Identity):
            continue
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = conv.weight
        if isinstance(conv, nn.ConvTranspose2d):
            if conv.groups != 1:
                raise ValueError(f"cannot fold {bn_name} into grouped transposed conv {conv_name}")
            w.mul_(s.view(1, -1, 1, 1))
        else:
            w.mul_(s.view(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_b = (b - bn.running_mean) * s + bn.bias
        if conv.bias is None:
            conv.bias = nn.Parameter(new_b)
        else:
            conv.bias.copy_(new_b)
        setattr(model, bn_name, nn.Identity())
    return model
