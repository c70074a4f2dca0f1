"""Dense CRF post-processing: parameters, the glue around pydensecrf (with and without the
library), Segmenter(postprocess="crf") and the CLI's --crf."""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

import fastfcn
from fastfcn.data import heldout_scenes
from fastfcn.errors import BackendUnavailableError, InputError
from fastfcn.runtime import crf
from fastfcn.runtime.crf import CRFParams, check_inputs, dense_crf, unary

HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
needs_crf = pytest.mark.skipif(not HAS_CRF, reason="pydensecrf2 not installed (pip install fastfcn[crf])")


class FakeDenseCRF2D:
    """Stands in for pydensecrf.densecrf.DenseCRF2D: records what the glue passes and returns
    the softmax of the unary (the CRF with no pairwise effect), so results can be checked."""

    calls: list = []

    def __init__(self, w, h, c):
        self.args = {"w": w, "h": h, "c": c}
        FakeDenseCRF2D.calls.append(self.args)

    def setUnaryEnergy(self, u):  # noqa: N802 - pydensecrf's names
        assert u.dtype == np.float32 and u.flags.c_contiguous
        self.args["unary"] = u.copy()

    def addPairwiseGaussian(self, sxy, compat):  # noqa: N802
        self.args["gaussian"] = (sxy, compat)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat):  # noqa: N802
        assert rgbim.dtype == np.uint8 and rgbim.flags.c_contiguous
        self.args["bilateral"] = (sxy, srgb, compat)
        self.args["image"] = rgbim.copy()

    def inference(self, n):
        self.args["iterations"] = n
        e = np.exp(-self.args["unary"])
        return e / e.sum(0, keepdims=True)


class FakeLibrary:
    DenseCRF2D = FakeDenseCRF2D


@pytest.fixture
def fake(monkeypatch):
    FakeDenseCRF2D.calls = []
    monkeypatch.setattr(crf, "load_library", lambda: FakeLibrary)
    return FakeDenseCRF2D.calls


def probs_and_image(c=3, h=7, w=9, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.random((c, h, w)).astype(np.float32) + 0.05
    return p / p.sum(0), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------- parameters (no library)
def test_defaults_are_deeplabs():
    # DeepLab-v2 ResNet-101 VOC12 test net's DenseCRF layer: max_iter 10, pos_w 3, pos_xy_std 1,
    # bi_w 4, bi_xy_std 67, bi_rgb_std 3.
    assert CRFParams().as_dict() == {
        "iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0,
        "bilateral_sxy": 67.0, "bilateral_srgb": 3.0, "bilateral_compat": 4.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iterations": 0}, "iterations must be an int >= 1"),
        ({"iterations": 2.5}, "iterations"),
        ({"iterations": True}, "iterations"),
        ({"gaussian_sxy": 0}, "gaussian_sxy must be a finite number > 0"),
        ({"bilateral_srgb": -3}, "bilateral_srgb"),
        ({"bilateral_sxy": math.inf}, "bilateral_sxy"),
        ({"gaussian_compat": math.nan}, "gaussian_compat"),
        ({"bilateral_compat": "4"}, "bilateral_compat"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRFParams(**kwargs)


def test_params_of():
    assert CRFParams.of(None) == CRFParams()
    p = CRFParams(iterations=3)
    assert CRFParams.of(p) is p
    assert CRFParams.of({"iterations": 4, "bilateral_sxy": 30}) == CRFParams(iterations=4, bilateral_sxy=30)
    with pytest.raises(ValueError, match=r"unknown CRF parameter\(s\) \['iters'\]"):
        CRFParams.of({"iters": 4})
    with pytest.raises(TypeError, match="crf must be None, a CRFParams or a dict"):
        CRFParams.of(5)


def test_check_postprocess(fake):
    assert crf.check_postprocess(None, None) is None
    assert crf.check_postprocess("crf", None) == CRFParams()
    assert crf.check_postprocess("crf", {"iterations": 2}).iterations == 2
    with pytest.raises(ValueError, match="postprocess must be None or 'crf'"):
        crf.check_postprocess("dense", None)
    with pytest.raises(ValueError, match="without postprocess='crf'"):
        crf.check_postprocess(None, CRFParams())


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)  # import pydensecrf -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install fastfcn\[crf\]"):
        crf.load_library()
    with pytest.raises(BackendUnavailableError, match="pydensecrf2"):
        fastfcn.Segmenter("demo", postprocess="crf")


# ------------------------------------------------------------------- the glue (stub library)
def test_unary_is_minus_log_p_clipped():
    p, _ = probs_and_image()
    p[0, 0, 0] = 0.0
    u = unary(p)
    assert u.shape == (3, 63) and u.dtype == np.float32 and u.flags.c_contiguous
    np.testing.assert_allclose(u[:, 1:], -np.log(p.reshape(3, -1)[:, 1:]), rtol=1e-6)
    assert u[0, 0] == pytest.approx(-math.log(crf.PROB_FLOOR))


@pytest.mark.parametrize(
    "probs, image, match",
    [
        (np.full((3, 7, 9), 1 / 3, np.float32), np.zeros((7, 8, 3), np.uint8), r"7x8 .* 7x9"),
        (np.full((3, 7, 9), 1 / 3, np.float32), np.zeros((3, 7, 9), np.uint8), r"\(H, W, 3\) uint8"),
        (np.full((3, 7, 9), 1 / 3, np.float32), np.zeros((7, 9, 3), np.float32), "uint8"),
        (np.full((7, 9), 1.0, np.float32), np.zeros((7, 9, 3), np.uint8), r"\(C, H, W\)"),
        (np.ones((1, 7, 9), np.float32), np.zeros((7, 9, 3), np.uint8), "C >= 2"),
        (np.full((3, 7, 9), -2.0, np.float32), np.zeros((7, 9, 3), np.uint8), "not logits"),
        (np.full((3, 7, 9), np.nan, np.float32), np.zeros((7, 9, 3), np.uint8), "finite"),
        (np.zeros((3, 7, 9), np.int64), np.zeros((7, 9, 3), np.uint8), "float"),
        (np.zeros((3, 0, 9), np.float32), np.zeros((0, 9, 3), np.uint8), "0x9; expected an image"),
    ],
)
def test_bad_inputs(probs, image, match):
    with pytest.raises(InputError, match=match):
        check_inputs(probs, image)


def test_dense_crf_passes_width_height_and_the_parameters(fake):
    p, im = probs_and_image(c=4, h=5, w=11)
    params = CRFParams(iterations=3, gaussian_sxy=2, gaussian_compat=5, bilateral_sxy=40,
                       bilateral_srgb=7, bilateral_compat=6)  # fmt: skip
    q = dense_crf(p, np.asfortranarray(im), params)
    (call,) = fake
    assert (call["w"], call["h"], call["c"]) == (11, 5, 4)  # DenseCRF2D(width, height, classes)
    assert call["gaussian"] == (2, 5) and call["bilateral"] == (40, 7, 6) and call["iterations"] == 3
    np.testing.assert_array_equal(call["image"], im)
    np.testing.assert_allclose(call["unary"], -np.log(p.reshape(4, -1)), rtol=1e-6)
    # (C, H*W) back to (C, H, W) in the same order: the identity CRF gives the input back.
    assert q.shape == (4, 5, 11) and q.dtype == np.float32
    np.testing.assert_allclose(q, p, atol=1e-6)


def test_segmenter_feeds_the_original_image_and_returns_each_form(fake):
    plain = fastfcn.Segmenter("demo", backend="torch", precision="fp32")
    seg = fastfcn.Segmenter("demo", backend="torch", precision="fp32", postprocess="crf",
                            crf={"iterations": 2})  # fmt: skip
    assert seg.postprocess == "crf" and seg.crf == CRFParams(iterations=2)
    assert "postprocess='crf'" in repr(seg)
    x = heldout_scenes(3, 40)
    batch = np.stack([x[i][0] for i in range(3)])
    fake.clear()
    probs = seg.run(batch, "probs")
    assert len(fake) == 3 and all(c["iterations"] == 2 for c in fake)
    for i, call in enumerate(fake):  # the uint8 RGB image as given, not the preprocessed one
        np.testing.assert_array_equal(call["image"], batch[i])
    want = plain.run(batch, "probs")
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)  # the identity stub
    assert torch.equal(seg.run(batch), probs.argmax(1).to(torch.uint8))
    torch.testing.assert_close(seg.run(batch, "logits"), torch.log(probs.clamp_min(crf.PROB_FLOOR)))
    assert seg.run(batch[0]).shape == (40, 40)


def test_tiled_crf_runs_once_on_the_whole_image(fake):
    seg = fastfcn.Segmenter("demo", backend="torch", precision="fp32", postprocess="crf")
    image = heldout_scenes(1, (48, 60))[0][0]
    fake.clear()
    labels = seg.run(image, tile=(32, 32), overlap=8)
    assert labels.shape == (48, 60)
    assert [(c["h"], c["w"]) for c in fake] == [(48, 60)]
    np.testing.assert_array_equal(fake[0]["image"], image)


def test_crf_needs_uint8_images(fake):
    seg = fastfcn.Segmenter("demo", backend="torch", precision="fp32", postprocess="crf")
    with pytest.raises(InputError, match="original uint8 images"):
        seg.run(torch.randn(1, 3, 16, 16) * 50, preprocessed=True)


def test_stream_with_crf(fake):
    seg = fastfcn.Segmenter("demo", backend="torch", precision="fp32", postprocess="crf")
    frames = [heldout_scenes(4, 32)[i][0] for i in range(4)]
    out = list(seg.stream(frames, batch_size=3))
    assert len(out) == 4 and len(fake) == 4
    for f, r in zip(frames, out):
        assert torch.equal(r, seg.run(f).cpu())


def test_ensemble_crf_refines_the_average(fake):
    a = fastfcn.Segmenter("demo", backend="torch", precision="fp32")
    ens = fastfcn.Ensemble([a, a], postprocess="crf", crf={"iterations": 1})
    image = heldout_scenes(1, 32)[0][0]
    fake.clear()
    torch.testing.assert_close(ens.run(image, "probs"), a.run(image, "probs"), atol=1e-5, rtol=0)
    assert len(fake) == 1 and fake[0]["iterations"] == 1


# ------------------------------------------------------------------------ the real library
@needs_crf
def test_real_crf_cleans_noise_along_an_edge():
    # Two flat halves (dark | light); the model's probabilities are right but noisy: 30% of the
    # pixels lean (0.6) to the wrong class. The appearance kernel pulls them back.
    h, w = 40, 60
    image = np.zeros((h, w, 3), np.uint8)
    image[:, w // 2:] = 220
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    rng = np.random.default_rng(0)
    wrong = rng.random((h, w)) < 0.3
    lean = np.where(wrong, 1 - truth, truth)
    p = np.empty((2, h, w), np.float32)
    p[1] = np.where(lean == 1, 0.6, 0.4)
    p[0] = 1 - p[1]
    before = float((p.argmax(0) == truth).mean())
    q = dense_crf(p, image, CRFParams(iterations=5, bilateral_sxy=20, bilateral_srgb=10))
    after = float((q.argmax(0) == truth).mean())
    assert before == pytest.approx(0.7, abs=0.03)
    assert after > 0.99
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


@needs_crf
def test_real_crf_through_the_segmenter_equals_dense_crf():
    params = CRFParams(iterations=3)
    plain = fastfcn.Segmenter("demo", backend="torch", precision="fp32")
    seg = fastfcn.Segmenter("demo", backend="torch", precision="fp32", postprocess="crf", crf=params)
    x = np.stack([heldout_scenes(2, 48)[i][0] for i in range(2)])
    got = seg.run(x, "probs")
    raw = plain.run(x, "probs").numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i].numpy(), dense_crf(raw[i], x[i], params), atol=1e-6)
    # It does something: some labels change.
    assert not torch.equal(seg.run(x), plain.run(x))


# -------------------------------------------------------------------------------- the CLI
def _png(tmp_path):
    from PIL import Image

    path = tmp_path / "in" / "a.png"
    path.parent.mkdir()
    Image.fromarray(heldout_scenes(1, 40)[0][0]).save(path)
    return path


def test_cli_crf_options_need_crf(tmp_path, capsys):
    from fastfcn.cli import main

    rc = main(["segment", "demo", str(_png(tmp_path)), "--out", str(tmp_path / "o"), "--crf-iterations", "3"])
    assert rc == 1 and "--crf-iterations set without --crf" in capsys.readouterr().err
    rc = main(["segment", "demo", str(tmp_path / "in" / "a.png"), "--out", str(tmp_path / "o"), "--crf",
               "--crf-gaussian-sxy", "0"])  # fmt: skip
    assert rc == 1 and "--crf-gaussian-sxy must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_segment_with_crf_uses_it(tmp_path, fake):
    from fastfcn.cli import main

    rc = main(["segment", "demo", str(_png(tmp_path)), "--out", str(tmp_path / "o"), "--crf",
               "--crf-iterations", "4", "--quiet"])  # fmt: skip
    assert rc == 0 and (tmp_path / "o" / "labels" / "a.png").is_file()
    assert [c["iterations"] for c in fake] == [4]


def test_cli_eval_crf(fake, capsys):
    from fastfcn.cli import main

    rc = main(["eval", "demo", "--data", "synthetic", "--n", "3", "--size", "32", "--crf", "--json"])
    assert rc == 0 and len(fake) == 3
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["postprocess"] == "crf" and out["crf"]["iterations"] == 10
