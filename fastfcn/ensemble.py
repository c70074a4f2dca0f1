"""fastfcn.Ensemble: several Segmenters, one answer, by averaging their class probabilities.

    a = fastfcn.Segmenter("deconvnet.safetensors")
    b = fastfcn.Segmenter("fcn8s.safetensors")
    ens = fastfcn.Ensemble([a, b])                  # weights: equal
    labels = ens.run(images)                        # argmax of (p_a + p_b) / 2

This is the combination of Noh, Hong and Han (ICCV 2015, "Learning Deconvolution Network for
Semantic Segmentation", section 4.3): DeconvNet and FCN-8s are complementary (DeconvNet keeps
fine structure, FCN-8s the coarse layout of large objects), and the mean of their per-pixel
class probabilities (then a dense CRF) reached 72.5 mean IU on VOC 2012 test (71.7 without
the CRF), against 69.6 for DeconvNet alone (70.5 with the CRF) and 62.2 for FCN-8s.
``Ensemble(..., postprocess="crf")`` applies the CRF to the average, as they did.

Each member runs its own backend and preprocessing (DeconvNet and FCN may differ in mean,
colour order and scale) with output "probs": the fused backends' head kernels emit the
softmax themselves, so no member's logits are materialised twice. The average is built in one
accumulator on the ensemble's device (the first member's): memory is one (N, C, H, W) map plus
the member being added, whatever the number of members.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError
from .kernels.structure import check_output, labels_dtype
from .runtime.dispatch import run_batch, run_postprocessed
from .runtime.segmenter import Segmenter

# The preprocessing fields of a config (fastfcn.runtime.preprocess.Preprocessor): members that
# agree on all of them can share one preprocessed float batch.
_PREPROCESS_KEYS = ("mean", "std", "color_order", "input_scale")


def _check_members(segmenters) -> tuple[Segmenter, ...]:
    if isinstance(segmenters, Segmenter) or not isinstance(segmenters, Sequence):
        raise TypeError(
            f"segmenters must be a list of fastfcn.Segmenter; got {type(segmenters).__name__}"
        )
    members = tuple(segmenters)
    if not members:
        raise ValueError("an Ensemble needs at least one Segmenter; got an empty list")
    for i, s in enumerate(members):
        if not isinstance(s, Segmenter):
            raise TypeError(
                f"member {i} of the ensemble is a {type(s).__name__}; expected a fastfcn.Segmenter"
            )
        if s.heads is not None:
            raise ValueError(
                f"member {i} of the ensemble is a two-headed net ({', '.join(h for h, _ in s.heads)}); "
                "an ensemble averages one class distribution per pixel"
            )
        if len(s._inputs) > 1:
            raise ValueError(
                f"member {i} of the ensemble takes {' + '.join(s._inputs)}; an ensemble runs on "
                "colour images alone (run two-input nets with their Segmenter)"
            )
        if s._inputs != members[0]._inputs:
            raise ValueError(
                f"member {i} of the ensemble takes {s._inputs[0]} images and member 0 "
                f"{members[0]._inputs[0]} images; every member must read the same input"
            )
        if s.postprocess is not None:
            raise ValueError(
                f"member {i} of the ensemble has postprocess={s.postprocess!r}; an ensemble averages "
                "its members' probabilities first: give postprocess to the Ensemble instead"
            )
    classes = [s.num_classes for s in members]
    if len(set(classes)) != 1:
        raise ValueError(
            f"the members predict different numbers of classes {classes}; an ensemble averages "
            "per-class probabilities, so every member must predict the same classes"
        )
    return members


def _check_weights(weights, n: int) -> tuple[float, ...]:
    """None -> equal weights; else n finite numbers > 0, normalised to sum to 1."""
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be None or a list of numbers; got {type(weights).__name__}")
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} segmenters; expected one weight per segmenter")
    w = []
    for i, v in enumerate(weights):
        # numbers.Real: numpy's scalars too (weights taken from an array of validation scores)
        real = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        if not real or not math.isfinite(v) or v <= 0:
            raise ValueError(f"weight {i} is {v!r}; expected a finite number > 0")
        w.append(float(v))
    total = math.fsum(w)
    return tuple(v / total for v in w)


class Ensemble:
    """Average the class probabilities of several Segmenters.

    Ensemble(segmenters, weights=None, *, postprocess=None, crf=None)

    segmenters: a non-empty list of fastfcn.Segmenter predicting the same number of classes
        (each keeps its own device, backend, precision and preprocessing).
    weights: None (equal) or one finite number > 0 per segmenter; normalised to sum to 1.
    postprocess, crf: as for Segmenter: "crf" refines the averaged probabilities with a dense
        CRF on the original image (extra: pip install fastfcn[crf]).

    run(batch, output="labels", *, preprocessed=False, tile=None, overlap=None) takes the
    forms Segmenter.run takes and returns the same forms, on ``self.device`` (the first
    member's): "probs" (N, C, H, W) float32 = sum_i w_i * probs_i; "labels" its argmax (uint8,
    int32 above 256 classes); "logits" its log (softmax(log p) = p). Preprocessed float input
    is accepted only when every member preprocesses the same way.
    stream(frames, ...) as Segmenter.stream: in order, none lost.
    """

    def __init__(self, segmenters, weights=None, *, postprocess: str | None = None, crf=None):
        from .runtime.crf import check_postprocess

        self._members = _check_members(segmenters)
        self._weights = _check_weights(weights, len(self._members))
        self._crf = check_postprocess(postprocess, crf)
        self._postprocess = postprocess
        first = self._members[0]
        self._device = first.device
        cfgs = [s.config for s in self._members]
        self._same_preprocessing = all(
            [c.get(k) for k in _PREPROCESS_KEYS] == [cfgs[0].get(k) for k in _PREPROCESS_KEYS] for c in cfgs
        )
        # The file decoder's limit (run_batch; none when tiled): the strictest member's. Each
        # member still checks its own limit on what it runs (per tile when tiled).
        self.max_pixels = min(s.max_pixels for s in self._members)
        self._inputs = first._inputs  # the same for every member (checked above)

    # --------------------------------------------------------------- properties
    @property
    def segmenters(self) -> tuple[Segmenter, ...]:
        return self._members

    @property
    def weights(self) -> tuple[float, ...]:
        """The normalised weights, one per segmenter, summing to 1."""
        return self._weights

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def heads(self) -> None:
        """Always None: members are one-headed nets (checked when the ensemble is built)."""
        return None

    def split_heads(self, out, output: str, batched: bool = True):
        """run()'s and stream()'s results as they are: one head (see Segmenter.split_heads)."""
        return out

    @property
    def num_classes(self) -> int:
        return self._members[0].num_classes

    @property
    def config(self) -> dict:
        """The first member's config (class names, palette, number of classes)."""
        return self._members[0].config

    @property
    def class_names(self) -> list[str]:
        return self._members[0].class_names

    @property
    def palette(self) -> list[list[int]]:
        return self._members[0].palette

    @property
    def postprocess(self) -> str | None:
        return self._postprocess

    @property
    def crf(self):
        return self._crf

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s!r} x {w:.3g}" for s, w in zip(self._members, self._weights))
        post = f", postprocess={self._postprocess!r}" if self._postprocess else ""
        return f"Ensemble([{parts}]{post})"

    # ---------------------------------------------------------------------- run
    def run(self, batch, output: str = "labels", *, preprocessed: bool = False, tile=None,
            overlap: int | None = None):
        """Segment ``batch`` with every member and average (see the class docstring; the
        batch forms and ``tile`` / ``overlap`` are those of Segmenter.run)."""
        return run_batch(self, batch, output, preprocessed, tile, overlap)

    def __call__(self, batch, output: str = "labels", *, preprocessed: bool = False, tile=None,
                 overlap: int | None = None):
        return self.run(batch, output, preprocessed=preprocessed, tile=tile, overlap=overlap)

    def stream(self, frames, *, batch_size: int = 8, output: str = "labels", max_delay=None, queue_size=None):
        """As Segmenter.stream: one CPU tensor per frame, in order, each equal to
        ``run(frame, output).cpu()``."""
        from .runtime.stream import stream

        return stream(self, frames, batch_size=batch_size, output=output, max_delay=max_delay,
                      queue_size=queue_size)  # fmt: skip

    def _run(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """The batch path of run() and stream(): the average, then the CRF (if any)."""
        return run_postprocessed(self, t, kind, output)

    def _infer(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """t: uint8 (N, H, W, 3) (kind "u8") or float (N, 3, H, W) (kind "float") -> the
        weighted mean of the members' probabilities, as ``output``."""
        check_output(output)
        if kind == "float" and not self._same_preprocessing:
            raise InputError(
                "the members of this ensemble preprocess differently (mean, std, colour order or "
                "scale), so one preprocessed float batch cannot serve them all; pass uint8 RGB images "
                "and each member preprocesses for itself"
            )
        # The members return inference tensors; updating them in place needs inference mode.
        with torch.inference_mode():
            acc = None
            for seg, w in zip(self._members, self._weights):
                p = seg._run(t, kind, "probs").to(self._device, torch.float32)
                if acc is None:
                    acc = p.mul_(w)  # the first member's map becomes the accumulator: no extra copy
                else:
                    acc.add_(p, alpha=w)
                del p
            if output == "probs":
                return acc
            if output == "labels":
                return acc.argmax(1).to(labels_dtype(acc.shape[1]))
            return torch.log(acc.clamp_min_(torch.finfo(torch.float32).tiny))
