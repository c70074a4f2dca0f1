"""The batch path shared by ``Segmenter`` and ``Ensemble``: input forms in, results out.

A runner (a Segmenter or an Ensemble) provides ``_infer(t, kind, output)`` (its own results for
one same-size batch, ``t`` uint8 (N, H, W, 3) with kind "u8" or float (N, 3, H, W) with kind
"float"), ``split_heads(out, output, batched)`` (its results per head), ``_inputs`` (the input
modalities, fastfcn.modalities), ``max_pixels`` and
``_crf`` (fastfcn.runtime.crf.CRFParams or None). The functions here give it the rest of
``run``: decoding files and PIL images, the accepted batch forms, grouping a list by size,
tiling, and the CRF post-processing, in one place for both.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..imageio import decode_inputs
from ..kernels.structure import check_output
from ..modalities import input_channels
from .modal import parse_second
from .preprocess import Parsed, parse_batch
from .tiling import check_tiling, run_tiled


def run_batch(runner, batch, output: str, preprocessed: bool, tile, overlap, second=None):
    """The body of ``run`` (see Segmenter.run for the forms of ``batch`` and the results).
    ``second``: the second modality of a two-input net (Segmenter._second_input), or None."""
    check_output(output)
    run = runner._run
    if tile is None and overlap is not None:
        raise InputError(f"overlap={overlap!r} is for tiled runs; pass tile=(h, w) too")
    if tile is not None:
        tile, overlap = check_tiling(tile, overlap)
        run = lambda t, kind, out: run_tiles(runner, t, kind, out, tile, overlap)  # noqa: E731
    # Tiled, an image file may exceed max_pixels (the limit is per tile); Pillow's own
    # decompression-bomb limit (179 M pixels) still holds.
    max_pixels = None if tile is not None else runner.max_pixels
    batch = decode_inputs(batch, max_pixels)
    inputs = runner._inputs
    p: Parsed = parse_batch(batch, preprocessed, input_channels(inputs))
    seconds = None
    if second is not None:
        if p.form == "float":
            raise InputError(
                f"a float batch is preprocessed input, all {input_channels(inputs)} channels "
                f"({' + '.join(inputs)}): pass it with preprocessed=True and no {inputs[1]}=, or pass "
                f"uint8 images with {inputs[1]}="
            )
        seconds = parse_second(second, inputs[1], p, max_pixels)
        # Both modalities become one preprocessed float batch: one input tensor for every backend.
        run = _two_inputs(runner, run, check_size=tile is None)
    if p.form == "list":
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(p.tensors):
            groups.setdefault((t.shape[1], t.shape[2]), []).append(i)
        results: list = [None] * len(p.tensors)
        for idx in groups.values():
            t = _cat([p.tensors[i] for i in idx])
            t = t if seconds is None else (t, _cat([seconds[i] for i in idx]))
            out = run(t, "u8", output)
            for j, i in enumerate(idx):
                results[i] = _by_head(runner, out[j], output, batched=False)
        return results
    t = p.tensors[0] if seconds is None else (p.tensors[0], seconds[0])
    out = run(t, "float" if p.form == "float" else "u8", output)
    if p.form == "image":
        return _by_head(runner, out[0], output, batched=False)
    return _by_head(runner, out, output)


def _by_head(runner, out: torch.Tensor, output: str, batched: bool = True):
    """A two-headed net's result as {head: result} (runner.split_heads); others unchanged."""
    return runner.split_heads(out, output, batched)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _two_inputs(runner, run, check_size: bool):
    """run(t, kind, output) taking t = (images uint8 (N, H, W, 3), second (N, H, W[, 3])): both
    preprocessed on the device into one float (N, C, H, W) by the runner's Preprocessor, then
    ``run`` of kind "float" (tiled runs split that one tensor; untiled ones check max_pixels first)."""

    def two(t, kind, output):
        u8, sec = t
        if check_size:
            runner._check_size(u8.shape[1], u8.shape[2])
        device = runner.execution.device
        with torch.inference_mode():
            x = runner._pre(u8.to(device), sec.to(device))
        return run(x, "float", output)

    return two


def run_postprocessed(runner, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
    """One same-size batch: the runner's inference, then its CRF (if any)."""
    if runner._crf is None:
        return runner._infer(t, kind, output)
    _check_crf_input(kind)
    return _refine(runner, runner._infer(t, kind, "probs"), t, output)


def run_tiles(runner, t: torch.Tensor, kind: str, output: str, tile, overlap) -> torch.Tensor:
    """Each image of ``t`` in tiles; results stacked to (N, ...). The CRF (if any) runs once on
    each whole image, after the tiles' probabilities are put together."""
    if runner._crf is not None:
        _check_crf_input(kind)
        return _refine(runner, _tiles(runner, t, kind, "probs", tile, overlap), t, output)
    return _tiles(runner, t, kind, output, tile, overlap)


def _tiles(runner, t: torch.Tensor, kind: str, output: str, tile, overlap) -> torch.Tensor:
    if t.shape[0] == 1:  # no stacking copy (100 MB of labels at 10,000 x 10,000)
        return run_tiled(runner._infer, t, kind, output, tile, overlap).unsqueeze(0)
    return torch.stack([run_tiled(runner._infer, t[i:i + 1], kind, output, tile, overlap)
                        for i in range(t.shape[0])])


def _check_crf_input(kind: str) -> None:
    if kind != "u8":
        raise InputError(
            "postprocess='crf' needs the original uint8 images (its appearance kernel reads their "
            "colours); got a preprocessed float batch. Pass (H, W, 3) / (N, H, W, 3) uint8 RGB images"
        )


def _refine(runner, probs: torch.Tensor, images: torch.Tensor, output: str) -> torch.Tensor:
    from .crf import refine

    return refine(probs, images, runner._crf, output)
