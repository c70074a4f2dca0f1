"""Input modalities: what each channel group of a model's input is (no torch import).

A model takes the modalities its arch fixes, in channel order (``fastfcn.config.ARCH_INPUTS``;
``("color",)`` for every VOC net; ``config_inputs(config)`` / ``ModelConfig.inputs`` read them).
The model sees them concatenated along channels, so every backend keeps one input tensor;
``mean`` and ``std`` hold one number per channel of that tensor, in the same order.

- ``color``: 3 channels from an (H, W, 3) uint8 RGB image, reordered to the config's
  ``color_order`` and scaled by ``input_scale / 255``.
- ``hha``: 3 channels from an (H, W, 3) uint8 HHA image (Gupta et al., ECCV 2014: horizontal
  disparity, height above ground, angle with gravity), kept in the file's channel order
  (fcn.berkeleyvision.org nyud_layers.py ``load_hha``: no swap, minus the mean).
- ``depth``: 1 channel, ``log(depth)`` of a depth map in millimetres (the NYUDv2 depth PNGs:
  uint16 mm; nyud_layers.py ``load_depth``: ``log(d) - 7.844``, exp(7.844) = 2.55 m). The log
  of 0 is -inf: depth <= 0 (a hole in a raw sensor map) is refused, not turned into NaN
  (the release's maps are filled: no holes).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError

MODALITIES = {"color": 3, "hha": 3, "depth": 1}
# Modalities that can be the first input (an image that Segmenter.run takes as its batch).
PRIMARY = ("color", "hha")
DEFAULT_INPUTS = ("color",)


def input_channels(inputs: Sequence[str]) -> int:
    """Channels of the model input that ``inputs`` (modality names) make."""
    return sum(MODALITIES[m] for m in inputs)


def check_inputs(inputs) -> str | None:
    """Why ``inputs`` is not a valid modality list, or None: a list of known names, the first an
    image modality (color or hha), at most two, no name twice."""
    if (not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= 2
            or not all(isinstance(m, str) for m in inputs)):
        return f"inputs must be a list of 1 or 2 modality names; got {str(inputs)[:200]}"
    unknown = [m for m in inputs if m not in MODALITIES]
    if unknown:
        return f"unknown input modalities {unknown}; expected some of {list(MODALITIES)}"
    if inputs[0] not in PRIMARY:
        return f"the first input must be an image modality ({' or '.join(PRIMARY)}); got {inputs[0]!r}"
    if len(set(inputs)) != len(inputs):
        return f"inputs names a modality twice: {list(inputs)}"
    return None


def second_modality(arch, inputs: Sequence[str], given: dict, option: str = "--{m}", value: str = " DIR"):
    """The second modality of a two-input net (None for a one-input net), checked against
    ``given`` ({modality: what was passed} of the second inputs the caller was given): a
    one-input net takes none, a two-input net its own and only it. ``option`` / ``value`` spell
    the caller's option in the message (``--depth DIR``, ``--depth VIDEO``, ``depth=VIDEO``)."""
    if len(inputs) == 1:
        if given:
            names = "/".join(option.format(m=m) for m in given)
            raise InputError(f"{arch} takes one input ({inputs[0]} images); {names} is for the two-input "
                             "nets (nyud-fcn32s-color-d, nyud-fcn32s-color-hha)")  # fmt: skip
        return None
    want = inputs[1]
    if set(given) != {want}:
        raise InputError(f"{arch} takes {inputs[0]} images and {want}: pass {option.format(m=want)}{value} "
                         "(and only it)")  # fmt: skip
    return want


def synthetic_second(arch, inputs: Sequence[str], given: dict) -> str | None:
    """``second_modality`` for ``--data synthetic``, whose scenes make a two-input net's second
    input themselves: none may be given (a one-input net is checked as ``second_modality``
    checks it); -> the net's second modality, None for a one-input net."""
    if len(inputs) == 1:
        return second_modality(arch, inputs, given)
    if given:
        flags = "/".join(f"--{m}" for m in given)
        raise InputError(f"--data synthetic makes each scene's {inputs[1]} for {arch}; {flags} DIR is for a "
                         "VOC-layout --data folder")  # fmt: skip
    return inputs[1]


__all__ = ["DEFAULT_INPUTS", "MODALITIES", "PRIMARY", "check_inputs", "input_channels", "second_modality",
           "synthetic_second"]  # fmt: skip
