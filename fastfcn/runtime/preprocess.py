"""Input parsing and on-device preprocessing for the Segmenter.

Accepted batch forms (``parse_batch``):

- one RGB image ``(H, W, 3)`` uint8 (numpy array or torch tensor) -> form "image";
- a batch ``(N, H, W, 3)`` uint8 -> form "batch";
- a list/tuple of ``(H, W, 3)`` uint8 images, sizes may differ -> form "list";
- an already preprocessed float tensor/array ``(N, 3, H, W)`` -> form "float", declared with
  ``preprocessed=True``. Undeclared float input is checked: preprocessed input of the
  reference nets is mean-subtracted, so it has negative values (any image with one pixel
  darker than the mean in one channel: on the first 100 held-out synthetic scenes every
  preprocessed image has min <= -98, median -123), while what torchvision users pass, an
  image as float in [0, 1] (or [0, 255]), has none. Such input taken as preprocessed gave the
  demo model pixel accuracy 0.722 instead of 0.977 on those scenes, silently; it is refused
  with a message saying how to pass it. A model whose preprocessed input is non-negative
  (mean 0) needs ``preprocessed=True``.

Preprocessing (``Preprocessor``) follows the checkpoint's config: pixel values
are scaled to ``input_scale`` (255 = unscaled, the Caffe convention), the
channels reordered to ``color_order`` and normalised with ``(x - mean) / std``
(mean/std given in the model's colour order). The reference nets take BGR,
mean-subtracted, unscaled pixels. It is one fused per-channel affine map
``x * a + b`` run on the device, so the uint8 image is the only host->device copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import config_inputs, preprocessing
from ..errors import InputError
from ..modalities import MODALITIES, check_inputs, input_channels


@dataclass
class Parsed:
    """form: "image", "batch", "list" or "float"; tensors: uint8 (N, H, W, 3) groups (for "list" one per
    image, in order) or one float (N, 3, H, W) tensor (form "float")."""

    form: str
    tensors: list[torch.Tensor]


def _as_tensor(obj, what: str) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{what} must be a numeric array; got a numpy array of dtype object")
        # from_numpy shares memory; numpy arrays with negative strides (img[:, ::-1]) need a copy,
        # and so do those of the other byte order (a 16-bit PGM or FITS file's big-endian values).
        if any(s < 0 for s in obj.strides):
            obj = np.ascontiguousarray(obj)
        if not obj.dtype.isnative:
            obj = obj.astype(obj.dtype.newbyteorder("="))
        try:
            return torch.from_numpy(obj)
        except TypeError as e:
            raise TypeError(f"{what} has a dtype torch cannot read ({obj.dtype}); expected uint8") from e
    if hasattr(obj, "__array_interface__") or hasattr(obj, "__array__"):
        # PIL images and other array-likes.
        return _as_tensor(np.asarray(obj), what)
    raise TypeError(
        f"{what} must be a numpy array, a torch tensor, an image file path, a PIL image or a list of "
        f"them; got {type(obj).__name__}"
    )


def _check_image(t: torch.Tensor, what: str) -> None:
    if t.dim() != 3:
        raise InputError(f"{what} must be one (H, W, 3) uint8 RGB image; got shape {tuple(t.shape)}")
    _check_hwc(t, what)


def _check_hwc(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.uint8:
        raise TypeError(
            f"{what} has dtype {t.dtype}; expected uint8 RGB pixels, or an already preprocessed "
            "float tensor (N, 3, H, W) passed with preprocessed=True"
        )
    if t.shape[-1] != 3 and t.shape[-3] == 3:
        hint = "x.permute(1, 2, 0)" if t.dim() == 3 else "x.permute(0, 2, 3, 1)"
        raise InputError(
            f"{what} has shape {tuple(t.shape)}, channels first (CHW); images are expected in the HWC "
            f"layout, (H, W, 3) or (N, H, W, 3) uint8 RGB: pass {hint}"
        )
    if t.shape[-1] != 3:
        raise InputError(
            f"{what} has {t.shape[-1]} channels (shape {tuple(t.shape)}); expected 3 (RGB) in the last "
            "dimension, (H, W, 3) or (N, H, W, 3)"
        )
    if t.shape[-2] == 0 or t.shape[-3] == 0:
        raise InputError(f"{what} is empty (shape {tuple(t.shape)}); expected H, W >= 1")


def _check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise InputError(
            f"{what} is on the {t.device.type} device"
            + (", which holds shapes but no data" if t.device.type == "meta" else "")
            + "; expected a CPU or CUDA tensor (or a numpy array)"
        )


def _check_not_an_image(t: torch.Tensor) -> None:
    """Refuse a float batch whose values look like an image in [0, 1] or [0, 255] (see the module
    docstring). NaN/Inf pass through to check_finite, which names them."""
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (lo >= 0 and hi <= 255):
        return
    scale = "[0, 1]" if hi <= 1 else "[0, 255]"
    convert = "(x * 255).round().to(torch.uint8)" if hi <= 1 else "x.round().to(torch.uint8)"
    raise InputError(
        f"the float batch has no negative values (min {lo:g}, max {hi:g}): it looks like images in "
        f"{scale}, not preprocessed (mean-subtracted) input. Pass uint8 RGB pixels in the HWC layout, "
        f"e.g. {convert}.permute(0, 2, 3, 1), or run(x, preprocessed=True) if x is preprocessed already"
    )


def parse_batch(batch, preprocessed: bool = False, channels: int = 3) -> Parsed:
    """Validate ``batch`` and bring it to tensors, without copying where possible.

    preprocessed: the batch is float (N, channels, H, W) input already preprocessed for the
    model (channels: the model's input channels, every modality concatenated); without it,
    float input that looks like an image is refused (InputError).
    """
    if not isinstance(preprocessed, bool):
        raise TypeError(f"preprocessed must be True or False; got {preprocessed!r}")
    if isinstance(batch, (list, tuple)):
        if preprocessed:
            raise InputError("preprocessed=True expects one float (N, 3, H, W) tensor; got a list")
        if len(batch) == 0:
            raise InputError("the batch is an empty list; expected at least one (H, W, 3) uint8 image")
        tensors = []
        for i, img in enumerate(batch):
            t = _as_tensor(img, f"image {i} of the list")
            _check_device(t, f"image {i} of the list")
            _check_image(t, f"image {i} of the list")
            tensors.append(t.unsqueeze(0))
        return Parsed("list", tensors)
    t = _as_tensor(batch, "the batch")
    _check_device(t, "the batch")
    if preprocessed and not t.is_floating_point():
        raise InputError(
            f"preprocessed=True expects a float (N, 3, H, W) tensor; got dtype {t.dtype} (uint8 images "
            "are preprocessed by the Segmenter: pass them without preprocessed=True)"
        )
    if t.is_floating_point():
        if t.dim() != 4 or t.shape[1] != channels:
            if t.shape[-1] == 3 and t.dim() in (3, 4):
                raise InputError(
                    f"a float batch of shape {tuple(t.shape)} (HWC): float input must be preprocessed "
                    "(N, 3, H, W) passed with preprocessed=True; raw images must be uint8 (H, W, 3) "
                    "or (N, H, W, 3)"
                )
            raise InputError(
                f"a float batch must be preprocessed (N, {channels}, H, W); got shape {tuple(t.shape)} "
                "(raw images must be uint8 (H, W, 3) or (N, H, W, 3))"
            )
        if t.shape[0] == 0:
            raise InputError(f"the batch is empty (shape {tuple(t.shape)}); expected N >= 1")
        if t.shape[2] == 0 or t.shape[3] == 0:
            raise InputError(f"the batch has a zero-sized image (shape {tuple(t.shape)}); expected H, W >= 1")
        if not preprocessed:
            _check_not_an_image(t)
        return Parsed("float", [t])
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"the batch has dtype {t.dtype}; expected uint8 images or a float (N, 3, H, W)")
    if t.dim() == 3:
        _check_image(t, "the image")
        return Parsed("image", [t.unsqueeze(0)])
    if t.dim() == 4:
        if t.shape[0] == 0:
            raise InputError(f"the batch is empty (shape {tuple(t.shape)}); expected N >= 1 images")
        _check_hwc(t, "the batch")
        return Parsed("batch", [t])
    raise InputError(
        f"the batch has shape {tuple(t.shape)}; expected (H, W, 3) or (N, H, W, 3) uint8, "
        "or a float (N, 3, H, W)"
    )


def check_finite(x: torch.Tensor) -> None:
    """Refuse NaN/Inf in float input (a host sync on GPU; uint8 input never needs it)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"the float batch contains {bad} NaN or Inf values; expected finite numbers")


class Preprocessor:
    """uint8 RGB (N, H, W, 3) [+ a second modality] -> float (N, C, H, W) per the model config, on
    the device.

    The config's ``inputs`` (fastfcn.modalities) say what the channels are; ``mean`` / ``std``
    hold one number per channel. The first input is an image: "color" is reordered to
    ``color_order``, "hha" kept in the file's order; both are scaled by ``input_scale / 255``.
    A second input ("depth" or "hha") is preprocessed by its own rule and concatenated after
    the first: depth (N, H, W) in millimetres -> ``(log(depth) - mean) / std`` (depth <= 0 or
    non-finite is refused: log would give -inf / NaN), HHA (N, H, W, 3) uint8 as the first.

    The output is a channels_last view of the NHWC data for one image input (no layout change
    needed by the channels_last backbones). ``out``: an optional preallocated output (CUDA
    graphs write into their static buffer).
    """

    def __init__(self, config: dict, device: torch.device, dtype: torch.dtype = torch.float32):
        bgr, scale, mean, std = preprocessing(config)
        self.inputs = config_inputs(config)
        why = check_inputs(self.inputs)
        if why is not None:
            raise InputError(f"config {why}")
        n = input_channels(self.inputs)
        if len(mean) != n or len(std) != n or any(s == 0 or not math.isfinite(s) for s in std):
            raise InputError(
                f"config mean/std must be {n} finite numbers (one per channel of {list(self.inputs)}), "
                f"std non-zero; got {list(mean)}, {list(std)}"
            )
        # color_order is the colour modality's: an HHA image keeps its file's channel order.
        self.bgr = bgr and self.inputs[0] == "color"
        self.second = self.inputs[1] if len(self.inputs) > 1 else None
        self.dtype = dtype
        # x_model[c] = (pixel[c] * scale / 255 - mean[c]) / std[c]  ==  pixel[c] * a[c] + b[c]
        # (depth: log(d) * a + b with a = 1 / std: input_scale is for 0..255 pixels)
        per_channel = [m for m in self.inputs for _ in range(MODALITIES[m])]
        a = [(1.0 if m == "depth" else scale / 255.0) / s for m, s in zip(per_channel, std)]
        b = [-m / s for m, s in zip(mean, std)]
        self.a = torch.tensor(a, dtype=torch.float32, device=device).view(1, n, 1, 1)
        self.b = torch.tensor(b, dtype=torch.float32, device=device).view(1, n, 1, 1)

    def __call__(self, u8: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        """u8: (N, H, W, 3) uint8 on the device; second: the second modality on the device (depth
        (N, H, W) numbers, HHA (N, H, W, 3) uint8), where the config has one -> (N, C, H, W) float."""
        x = u8.permute(0, 3, 1, 2)
        if self.bgr:
            x = x.flip(1)
        # The affine runs in float32 (0..255 needs 8 mantissa bits: exact in bf16 but not
        # after the mean shift); the cast to a low precision dtype comes last.
        y = torch.addcmul(self.b[:, :3], x.to(torch.float32), self.a[:, :3])
        if self.second is None:
            if second is not None:
                raise InputError(f"this model takes one input ({self.inputs[0]}); got a second one")
        else:
            if second is None:
                raise InputError(f"this model takes a second input ({self.second}); none was given")
            if self.second == "depth":
                z = log_depth(second.to(torch.float32)).unsqueeze(1)
            else:
                z = second.permute(0, 3, 1, 2).to(torch.float32)
            y = torch.cat([y, torch.addcmul(self.b[:, 3:], z, self.a[:, 3:])], 1)
        return y if self.dtype == torch.float32 else y.to(self.dtype)


def log_depth(d: torch.Tensor) -> torch.Tensor:
    """log of a depth map (millimetres, any float shape); refuses depth <= 0, NaN or inf (one host
    sync): log(0) = -inf would turn every logit it reaches into NaN, silently."""
    bad = ~(torch.isfinite(d) & (d > 0))
    if bool(bad.any()):
        n = int(bad.sum())
        raise InputError(
            f"the depth map has {n} of {d.numel()} pixels that are <= 0 or not finite; log depth needs "
            "positive depths in millimetres (fill the holes of a raw sensor map first, as the NYUDv2 "
            "release's depth PNGs are)"
        )
    return torch.log(d)
