"""A Caffe-named state dict saved with torch.save loads through fastfcn.load and its
forward matches an independent implementation of the reference Caffe nets.

The implementation below is written from docs/facts.md with plain torch.nn.functional
calls only (no fastfcn models, heads or ops): conv1_1 pad 100, ceil-mode pooling,
fc6 7x7 (AlexNet 6x6), 1x1 score layers, Deconvolutions as conv_transpose2d with
the file's upscore weights, Caffe's Crop (top-left offset, to the reference
blob's size), the at-once scales 0.01 / 0.0001. The state dicts are built here
too, from the Caffe layer shapes, not from fastfcn's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastfcn

WIDTH = 0.125
NUM_CLASSES = 7
VGG = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
FC = 4096
# Deconvolutions (kernel, stride) and Crop offsets of the reference prototxts (docs/facts.md, "Crop offsets").
UPSCORE = {
    "fcn32s": {"upscore": (64, 32)},
    "fcn16s": {"upscore2": (4, 2), "upscore16": (32, 16)},
    "fcn8s": {"upscore2": (4, 2), "upscore_pool4": (4, 2), "upscore8": (16, 8)},
    "fcn-alexnet": {"upscore": (63, 32)},
}
UPSCORE["fcn8s-atonce"] = UPSCORE["fcn8s"]


def ch(c: int, multiple: int = 1) -> int:
    return max(multiple, round(c * WIDTH / multiple) * multiple)


def bilinear(c: int, k: int) -> torch.Tensor:
    """docs/facts.md, "Upsampling weights": factor = (k+1)//2, center = factor-1 (k odd) or
    factor-0.5; on the diagonal only."""
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float64)
    f = 1 - (og - center).abs() / factor
    w = torch.zeros(c, c, k, k, dtype=torch.float64)
    for i in range(c):
        w[i, i] = torch.outer(f, f)
    return w.float()


def _conv(g, sd, name, c_out, c_in, k, groups=1):
    # He-scaled weights keep activations O(1) through 16 layers, so every skip and
    # every crop contributes visibly to the logits.
    std = math.sqrt(2.0 / (c_in // groups * k * k))
    sd[f"{name}.weight"] = torch.randn(c_out, c_in // groups, k, k, generator=g) * std
    sd[f"{name}.bias"] = torch.randn(c_out, generator=g) * 0.1


def caffe_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the Caffe-named layout; upscore2 (where present) learned and dense."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    C = NUM_CLASSES
    if arch == "fcn-alexnet":
        c1, c2, c3, c4, c5 = (ch(c, 2) for c in (96, 256, 384, 384, 256))
        _conv(g, sd, "conv1", c1, 3, 11)
        _conv(g, sd, "conv2", c2, c1, 5, groups=2)
        _conv(g, sd, "conv3", c3, c2, 3)
        _conv(g, sd, "conv4", c4, c3, 3, groups=2)
        _conv(g, sd, "conv5", c5, c4, 3, groups=2)
        _conv(g, sd, "fc6", ch(FC), c5, 6)
    else:
        c_in = 3
        for b, (c, n) in enumerate(VGG, 1):
            for i in range(1, n + 1):
                _conv(g, sd, f"conv{b}_{i}", ch(c), c_in, 3)
                c_in = ch(c)
        _conv(g, sd, "fc6", ch(FC), c_in, 7)
    _conv(g, sd, "fc7", ch(FC), ch(FC), 1)
    _conv(g, sd, "score_fr", C, ch(FC), 1)
    if arch in ("fcn16s", "fcn8s", "fcn8s-atonce"):
        _conv(g, sd, "score_pool4", C, ch(512), 1)
    if arch in ("fcn8s", "fcn8s-atonce"):
        _conv(g, sd, "score_pool3", C, ch(256), 1)
    for name, (k, _) in UPSCORE[arch].items():
        sd[f"{name}.weight"] = bilinear(C, k)
    if "upscore2.weight" in sd:
        # A learned, non-diagonal intermediate deconvolution (the paper learns these).
        sd["upscore2.weight"] = sd["upscore2.weight"] + 0.2 * torch.randn(C, C, 4, 4, generator=g)
    return sd


def crop(x: torch.Tensor, ref_hw: tuple[int, int], offset: int) -> torch.Tensor:
    """Caffe Crop (axis 2): x[..., offset:offset + H_ref, offset:offset + W_ref]; must fit."""
    H, W = ref_hw
    assert x.shape[2] >= offset + H and x.shape[3] >= offset + W, (tuple(x.shape), ref_hw, offset)
    return x[:, :, offset:offset + H, offset:offset + W]


def lrn(x: torch.Tensor, n: int = 5, alpha: float = 1e-4, beta: float = 0.75) -> torch.Tensor:
    """Caffe LRN across channels: x / (1 + alpha/n * sum over n neighbouring channels of x^2)^beta."""
    sq = F.pad(x * x, (0, 0, 0, 0, n // 2, n // 2))
    s = sum(sq[:, i:i + x.shape[1]] for i in range(n))
    return x / (1 + alpha / n * s) ** beta


def caffe_forward(arch: str, sd: dict, x: torch.Tensor, ceil_mode: bool = True) -> torch.Tensor:
    """The reference Caffe net's forward: x (N, 3, H, W) -> score (N, C, H, W)."""

    def conv(name, h, pad=0, groups=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=pad, groups=groups)

    def pool(h, k=2, s=2):
        return F.max_pool2d(h, k, s, ceil_mode=ceil_mode)

    def up(name, h):
        k, s = UPSCORE[arch][name]
        return F.conv_transpose2d(h, sd[f"{name}.weight"], stride=s)

    size = x.shape[-2:]
    if arch == "fcn-alexnet":
        h = lrn(pool(F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=4, padding=100)), 3, 2))
        h = lrn(pool(F.relu(conv("conv2", h, 2, 2)), 3, 2))
        h = F.relu(conv("conv3", h, 1))
        h = F.relu(conv("conv4", h, 1, 2))
        h = pool(F.relu(conv("conv5", h, 1, 2)), 3, 2)
    else:
        pools = {}
        h = x
        for b, (_, n) in enumerate(VGG, 1):
            for i in range(1, n + 1):
                h = F.relu(conv(f"conv{b}_{i}", h, 100 if (b, i) == (1, 1) else 1))
            h = pools[b] = pool(h)
    h = F.relu(conv("fc6", h))  # dropout: identity at test time
    h = F.relu(conv("fc7", h))
    score = conv("score_fr", h)
    if arch in ("fcn32s", "fcn-alexnet"):
        return crop(up("upscore", score), size, 19 if arch == "fcn32s" else 18)
    s4, s3 = (0.01, 0.0001) if arch == "fcn8s-atonce" else (1.0, 1.0)
    upscore2 = up("upscore2", score)
    fuse_pool4 = upscore2 + crop(conv("score_pool4", pools[4] * s4), upscore2.shape[-2:], 5)
    if arch == "fcn16s":
        return crop(up("upscore16", fuse_pool4), size, 27)
    upscore_pool4 = up("upscore_pool4", fuse_pool4)
    fuse_pool3 = upscore_pool4 + crop(conv("score_pool3", pools[3] * s3), upscore_pool4.shape[-2:], 9)
    return crop(up("upscore8", fuse_pool3), size, 31)


def assert_float32_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Both sides run the same float32 arithmetic up to summation order (the backbone
    convolutions are the same calls; the head may group its adds and crops differently).
    Reordering a float32 sum of K terms moves it by at most ~K * 2^-24 of the sum of
    the terms' magnitudes; the largest sums here (fc6: 64 * 49 = 3136 terms, plus the
    head's few) bound the error well below 1e-4 of the logits' magnitude. An error in
    geometry (an off-by-one crop, floor pooling, a missing or wrong scale) moves the
    logits by 1e-4 (the at-once pool3 skip) to O(1) of it, far above this bound.
    """
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * scale, f"max error {err:.3g} vs logits' magnitude {scale:.3g}"


_SD: dict[str, dict] = {}
_MODELS: dict[str, torch.nn.Module] = {}


def _loaded(arch, tmp_path_factory):
    """The Caffe-layout state dict, torch.save'd and read back through fastfcn.load."""
    if arch not in _MODELS:
        _SD[arch] = caffe_state_dict(arch)
        path = tmp_path_factory.mktemp("ckpt") / f"{arch}.pth"
        torch.save(_SD[arch], path)
        # Plain fcn8s and at-once share keys: at-once is named, everything else inferred.
        _MODELS[arch] = fastfcn.load(path, arch="fcn8s-atonce" if arch == "fcn8s-atonce" else None)
        assert _MODELS[arch].config["arch"] == arch
        assert _MODELS[arch].config["num_classes"] == NUM_CLASSES
    return _SD[arch], _MODELS[arch]


CASES = [
    ("fcn32s", 2, 1, 1), ("fcn32s", 3, 37, 53),
    ("fcn16s", 2, 7, 13), ("fcn16s", 2, 64, 97),
    ("fcn8s", 2, 1, 1), ("fcn8s", 3, 7, 13), ("fcn8s", 2, 37, 53), ("fcn8s", 2, 64, 97),
    ("fcn8s-atonce", 3, 7, 13), ("fcn8s-atonce", 2, 37, 53),
    ("fcn-alexnet", 2, 1, 1), ("fcn-alexnet", 3, 37, 53), ("fcn-alexnet", 2, 64, 97),
]  # fmt: skip


@pytest.mark.parametrize("arch, n, H, W", CASES)
def test_matches_independent_caffe_forward(tmp_path_factory, arch, n, H, W):
    sd, model = _loaded(arch, tmp_path_factory)
    g = torch.Generator().manual_seed(H * 1000 + W)
    x = torch.randn(n, 3, H, W, generator=g) * 60  # mean-subtracted BGR pixels: tens
    with torch.no_grad():
        got = model(x)
        want = caffe_forward(arch, sd, x)
    assert got.shape == (n, NUM_CLASSES, H, W)
    assert_float32_close(got, want)
    # Images of a batch are independent.
    with torch.no_grad():
        assert_float32_close(model(x[1:2]), want[1:2])


def test_tolerance_catches_geometry_errors(tmp_path_factory):
    """The comparison can fail: each single deviation from the reference net is caught."""
    sd, model = _loaded("fcn8s-atonce", tmp_path_factory)
    x = torch.randn(2, 3, 37, 53, generator=torch.Generator().manual_seed(7)) * 60
    with torch.no_grad():
        got = model(x)
        plain = caffe_forward("fcn8s", sd, x)  # the at-once scales left out
        shifted = caffe_forward("fcn8s-atonce", sd, F.pad(x, (1, 0, 1, 0)))[:, :, 1:, 1:]
    for wrong in (plain, shifted):
        with pytest.raises(AssertionError):
            assert_float32_close(got, wrong)
    # Without the pool3 skip (its contribution is scaled by 1e-4): still caught.
    sd2 = dict(sd, **{"score_pool3.weight": torch.zeros_like(sd["score_pool3.weight"]),
                      "score_pool3.bias": torch.zeros_like(sd["score_pool3.bias"])})  # fmt: skip
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_float32_close(got, caffe_forward("fcn8s-atonce", sd2, x))


# ------------------------------------------------------------------------------- ceil vs floor pooling


def pooled_sizes(H: int, ceil: bool) -> list[int]:
    """Heights of pool1..pool5 of the VGG FCNs for an input height H (conv1_1 pad 100)."""
    h = H + 198
    out = []
    for _ in range(5):
        h = (math.ceil((h - 2) / 2) if ceil else (h - 2) // 2) + 1
        out.append(h)
    return out


def floor_fails(H: int) -> bool:
    """Whether FCN-8s with floor pooling cannot even produce an H-row output (a crop runs off its blob)."""
    p = pooled_sizes(H, ceil=False)
    f = p[4] - 6  # fc6 7x7, pad 0
    return f < 1 or p[3] < 5 + 2 * f + 2 or p[2] < 9 + 4 * f + 6 or 32 * f + 56 < 31 + H


def test_floor_versus_ceil_heights():
    differ = [H for H in range(1, 2049) if pooled_sizes(H, True) != pooled_sizes(H, False)]
    # Floor and ceil agree only where every pooled map has an even input: 64 heights in 1..2048,
    # one per period of 32 (2^5 for five poolings).
    same = sorted(set(range(1, 2049)) - set(differ))
    assert len(same) == 64 and all(b - a == 32 for a, b in zip(same, same[1:]))
    # With floor pooling the Caffe crop offsets overrun for the smallest inputs; ceil never does.
    fails = [H for H in range(1, 2049) if floor_fails(H)]
    assert fails == list(range(1, len(fails) + 1)) and len(fails) > 0
    ceil_ok = []
    for H in range(1, 2049):
        p = pooled_sizes(H, True)
        f = p[4] - 6
        ceil_ok.append(f >= 1 and p[3] >= 2 * f + 7 and p[2] >= 4 * f + 15 and 32 * f + 56 >= 31 + H)
    assert all(ceil_ok)


def test_model_pools_with_ceil(tmp_path_factory):
    """At a height where floor and ceil disagree the model equals the ceil net and not the
    floor net; where they agree, all three coincide (so pooling is the only difference)."""
    sd, model = _loaded("fcn8s", tmp_path_factory)
    h_same = next(H for H in range(30, 200) if pooled_sizes(H, True) == pooled_sizes(H, False))
    h_diff = next(H for H in range(30, 200) if pooled_sizes(H, True) != pooled_sizes(H, False)
                  and not floor_fails(H))  # fmt: skip
    for H, agree in ((h_same, True), (h_diff, False)):
        # The width is one where floor and ceil agree, so only the height can tell them apart.
        x = torch.randn(2, 3, H, h_same, generator=torch.Generator().manual_seed(H)) * 60
        with torch.no_grad():
            got = model(x)
            assert_float32_close(got, caffe_forward("fcn8s", sd, x, ceil_mode=True))
            floor = caffe_forward("fcn8s", sd, x, ceil_mode=False)
        if agree:
            assert_float32_close(got, floor)
        else:
            with pytest.raises(AssertionError):
                assert_float32_close(got, floor)
    # For the smallest inputs the floor net cannot be evaluated at all; the model (ceil) can.
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
        caffe_forward("fcn8s", sd, x, ceil_mode=False)
    with torch.no_grad():
        assert_float32_close(model(x), caffe_forward("fcn8s", sd, x))
