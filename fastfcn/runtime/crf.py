"""Dense CRF post-processing (Krähenbühl & Koltun, NIPS 2011) of a model's class probabilities.

    seg = fastfcn.Segmenter("demo", postprocess="crf")                      # DeepLab's parameters
    seg = fastfcn.Segmenter("demo", postprocess="crf", crf=CRFParams(iterations=5))

The fully connected CRF takes the softmax output as its unary term (-log p) and adds two
Gaussian pairwise terms over all pixel pairs: a smoothness kernel on position
(``gaussian_sxy``, weight ``gaussian_compat``) and an appearance kernel on position and colour of
the ORIGINAL image (``bilateral_sxy``, ``bilateral_srgb``, weight ``bilateral_compat``), solved by
``iterations`` steps of mean-field inference in the permutohedral lattice. The result is a
(C, H, W) map of marginals; its argmax is the refined labelling.

The library is pydensecrf2 (PyPI, a source distribution: Cython + C++, built at install time),
an optional extra: ``pip install fastfcn[crf]``. It is imported only when a CRF is asked for;
without it ``postprocess="crf"`` raises BackendUnavailableError naming the extra.

This module imports numpy only (no torch, no pydensecrf), so the CLI's ``--help`` can read
CRFParams' defaults (the --crf-* options).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import BackendUnavailableError, InputError

POSTPROCESS = (None, "crf")
INSTALL_HINT = "pip install fastfcn[crf]"

# The smallest probability turned into a unary -log p: log(1e-8) = -18.4 bounds the energy of
# a class the network rules out, as pydensecrf.utils.unary_from_softmax's clip does.
PROB_FLOOR = 1e-8


@dataclass(frozen=True)
class CRFParams:
    """Parameters of the dense CRF; the defaults are DeepLab's.

    Source of the defaults: DeepLab-v2 (Chen et al., TPAMI 2017), the DenseCRF layer of the
    released ResNet-101 PASCAL VOC 2012 test net (``max_iter 10, pos_w 3, pos_xy_std 1, bi_w 4,
    bi_xy_std 67, bi_rgb_std 3``), found by cross-validation on VOC val there. DeepLab-v1's
    LargeFOV net used ``bi_w 4, bi_xy_std 121, bi_rgb_std 5, pos_w 3, pos_xy_std 3``.

    iterations: mean-field steps (DeepLab max_iter), int >= 1.
    gaussian_sxy: std of the smoothness kernel in pixels (pos_xy_std).
    gaussian_compat: its weight (Potts compatibility; pos_w).
    bilateral_sxy: std of the appearance kernel in pixels (bi_xy_std).
    bilateral_srgb: its std in colour, in 0..255 pixel units (bi_rgb_std). The kernel is
        isotropic in colour, so RGB and BGR give the same result.
    bilateral_compat: its weight (bi_w).
    All but ``iterations`` are finite numbers > 0.
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def __post_init__(self):
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 1:
            raise ValueError(f"CRFParams.iterations must be an int >= 1; got {it!r}")
        for f in fields(self)[1:]:
            v = getattr(self, f.name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
            if not ok or not math.isfinite(v) or v <= 0:
                raise ValueError(f"CRFParams.{f.name} must be a finite number > 0; got {v!r}")

    @classmethod
    def of(cls, options) -> CRFParams:
        """None (the defaults), a CRFParams, or a dict of some of its fields -> CRFParams."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            names = [f.name for f in fields(cls)]
            unknown = sorted(set(options) - set(names))
            if unknown:
                raise ValueError(f"unknown CRF parameter(s) {unknown}; expected some of {names}")
            return cls(**options)
        raise TypeError(
            f"crf must be None, a CRFParams or a dict of its fields; got {type(options).__name__}"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def check_postprocess(postprocess, crf) -> CRFParams | None:
    """Validate a Segmenter's ``postprocess`` / ``crf`` pair; the CRF parameters or None.
    Checks that pydensecrf2 is importable when a CRF is asked for (fail at construction, not
    at the first image)."""
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be None or 'crf'; got {postprocess!r}")
    if postprocess is None:
        if crf is not None:
            raise ValueError("crf= parameters were given without postprocess='crf'; pass both, or neither")
        return None
    params = CRFParams.of(crf)
    load_library()
    return params


def load_library():
    """pydensecrf's ``densecrf`` module (from the pydensecrf2 distribution), or
    BackendUnavailableError saying how to install it."""
    try:
        from pydensecrf import densecrf
    except ImportError as e:
        raise BackendUnavailableError(
            f"postprocess='crf' needs pydensecrf2, which is not installed ({e}); "
            f"install the extra: {INSTALL_HINT}"
        ) from None
    return densecrf


def unary(probs: np.ndarray) -> np.ndarray:
    """probs (C, H, W) -> the CRF's unary energy -log(max(p, PROB_FLOOR)), (C, H*W) float32, C-contiguous."""
    c = probs.shape[0]
    u = -np.log(np.maximum(probs.reshape(c, -1).astype(np.float32, copy=False), PROB_FLOOR))
    return np.ascontiguousarray(u, dtype=np.float32)


def check_inputs(probs, image) -> tuple[np.ndarray, np.ndarray]:
    """probs (C, H, W) float class probabilities and image (H, W, 3) uint8 RGB (numpy or anything
    numpy reads) -> (float32 probs, C-contiguous uint8 image); InputError when they do not fit."""
    p = np.asarray(probs)
    im = np.asarray(image)
    if p.ndim != 3 or not np.issubdtype(p.dtype, np.floating):
        raise InputError(f"CRF probs must be a float (C, H, W) array; got {p.dtype} of shape {p.shape}")
    if p.shape[0] < 2:
        raise InputError(f"CRF probs have {p.shape[0]} class; expected C >= 2 (shape {p.shape})")
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
        raise InputError(
            "the CRF's image must be the original (H, W, 3) uint8 RGB image; "
            f"got {im.dtype} of shape {im.shape}"
        )
    if im.shape[:2] != p.shape[1:]:
        raise InputError(
            f"the CRF's image is {im.shape[0]}x{im.shape[1]} but the probabilities are "
            f"{p.shape[1]}x{p.shape[2]}; expected the same height and width"
        )
    if p.shape[1] == 0 or p.shape[2] == 0:  # numpy's min() of nothing would say "zero-size array"
        raise InputError(f"CRF probs are {p.shape[1]}x{p.shape[2]}; expected an image of at least 1x1 pixel")
    p = p.astype(np.float32, copy=False)
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1 + 1e-3:
        raise InputError("CRF probs must be finite probabilities in [0, 1] (softmax output, not logits)")
    return p, np.ascontiguousarray(im)


def dense_crf(probs, image, params: CRFParams | None = None, *, library=None) -> np.ndarray:
    """Refine one image's class probabilities with the dense CRF.

    probs: (C, H, W) softmax probabilities; image: (H, W, 3) uint8 RGB, the image the model
    saw before preprocessing. params: CRFParams (None: DeepLab's). library: the pydensecrf
    ``densecrf`` module (None: import it). Returns the marginals, (C, H, W) float32, each pixel
    summing to 1.
    """
    params = CRFParams() if params is None else params
    p, im = check_inputs(probs, image)
    lib = load_library() if library is None else library
    c, h, w = p.shape
    d = lib.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary(p))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=im,
                           compat=params.bilateral_compat)
    q = np.asarray(d.inference(params.iterations), dtype=np.float32)
    return q.reshape(c, h, w)


def refine(probs, images, params: CRFParams, output: str, *, library=None):
    """The Segmenter's post-processing step: a batch of probabilities through the CRF.

    probs: torch (N, C, H, W) float; images: torch (N, H, W, 3) uint8, the original images.
    Returns ``output`` ("labels" (N, H, W) uint8 / int32 above 256 classes, "probs" the CRF
    marginals (N, C, H, W) float32, "logits" their log) on the device of ``probs``.
    """
    import torch

    from ..kernels.structure import labels_dtype

    if probs.dim() != 4 or images.dim() != 4 or probs.shape[0] != images.shape[0]:
        raise InputError(
            f"CRF: expected probs (N, C, H, W) and images (N, H, W, 3) of one N; got "
            f"{tuple(probs.shape)} and {tuple(images.shape)}"
        )
    p_host = probs.detach().float().cpu().numpy()
    im_host = images.detach().cpu().numpy()
    q = np.stack([dense_crf(p_host[i], im_host[i], params, library=library) for i in range(len(p_host))])
    out = torch.from_numpy(q)
    if output == "labels":
        out = out.argmax(1).to(labels_dtype(q.shape[1]))
    elif output == "logits":
        out = torch.log(out.clamp_min(PROB_FLOOR))
    return out.to(probs.device)
