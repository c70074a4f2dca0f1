"""fastfcn.Ensemble: the weighted mean of its members' probabilities, through run and stream."""

import math

import numpy as np
import pytest
import torch

import fastfcn
from fastfcn.ensemble import Ensemble
from fastfcn.errors import InputError


def _segmenter(arch, seed, num_classes=5):
    torch.manual_seed(seed)
    model = fastfcn.models.build(arch, width=0.0625, num_classes=num_classes).eval()
    return fastfcn.Segmenter(model, device="cpu", backend="torch", precision="fp32")


@pytest.fixture(scope="module")
def members():
    # Different families with different means (VOC's vs the dilated net's), so each member
    # must preprocess for itself.
    return _segmenter("fcn8s", 0), _segmenter("dilated-frontend", 1)


def images(n=3, size=(20, 24), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def test_members_really_differ(members):
    # Otherwise the tests below could not tell a mean from one member's result.
    a, b = members
    assert a.config["mean"] != b.config["mean"]
    x = images()
    assert float((a.run(x, "probs") - b.run(x, "probs")).abs().max()) > 1e-3


@pytest.mark.parametrize("weights", [None, (1, 3), (2.5, 0.5), [np.float32(0.25), np.int64(3)]])
def test_probs_are_the_weighted_mean_of_the_members(members, weights):
    a, b = members
    x = images()
    ens = Ensemble([a, b], weights)
    wa, wb = (0.5, 0.5) if weights is None else (weights[0] / sum(weights), weights[1] / sum(weights))
    assert ens.weights == pytest.approx((wa, wb), abs=1e-15)
    expected = wa * a.run(x, "probs") + wb * b.run(x, "probs")
    got = ens.run(x, "probs")
    assert got.shape == (3, 5, 20, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # Labels and logits are the argmax and log of that same average.
    assert torch.equal(ens.run(x, "labels"), got.argmax(1).to(torch.uint8))
    torch.testing.assert_close(ens.run(x, "logits"), torch.log(got), atol=1e-5, rtol=0)


def test_weights_change_the_result(members):
    x = images()
    p1 = Ensemble(members, (1, 1)).run(x, "probs")
    p2 = Ensemble(members, (1, 9)).run(x, "probs")
    assert float((p1 - p2).abs().max()) > 1e-4
    # One member with all the weight but a sliver: nearly that member.
    p3 = Ensemble(members, (1e-9, 1)).run(x, "probs")
    torch.testing.assert_close(p3, members[1].run(x, "probs"), atol=1e-6, rtol=0)


def test_input_forms_match_segmenter_run(members, tmp_path):
    from PIL import Image

    ens = Ensemble(members)
    x = images()
    batch = ens.run(x)
    one = ens.run(x[1])
    assert one.shape == (20, 24) and torch.equal(one, batch[1])
    other = images(1, (17, 13), seed=3)[0]
    listed = ens.run([x[0], other, x[2]])
    assert isinstance(listed, list) and [t.shape for t in listed] == [(20, 24), (17, 13), (20, 24)]
    assert torch.equal(listed[1], ens.run(other))
    assert torch.equal(listed[2], batch[2])
    path = tmp_path / "im.png"
    Image.fromarray(other).save(path)
    assert torch.equal(ens.run(str(path)), ens.run(other))
    assert torch.equal(ens(other), ens.run(other))


def test_tiled_run_is_the_mean_of_the_tiled_members(members):
    a, b = members
    x = images(1, (40, 44), seed=5)[0]
    ens = Ensemble([a, b], (3, 1))
    got = ens.run(x, "probs", tile=(24, 24), overlap=8)
    expected = 0.75 * a.run(x, "probs", tile=(24, 24), overlap=8) + 0.25 * b.run(x, "probs", tile=(24, 24),
                                                                                overlap=8)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_preprocessed_input_needs_one_preprocessing(members):
    a, b = members
    x = torch.randn(1, 3, 20, 24) * 50
    with pytest.raises(InputError, match="preprocess differently"):
        Ensemble([a, b]).run(x, preprocessed=True)
    c = _segmenter("fcn32s", 2)  # VOC's mean, as member a
    same = Ensemble([a, c])
    expected = 0.5 * a.run(x, "probs", preprocessed=True) + 0.5 * c.run(x, "probs", preprocessed=True)
    torch.testing.assert_close(same.run(x, "probs", preprocessed=True), expected, atol=1e-6, rtol=0)


def test_stream_in_order_none_lost(members):
    ens = Ensemble(members, (2, 1))
    frames = list(images(5, (20, 24), seed=7)) + list(images(4, (16, 18), seed=8))
    out = list(ens.stream(iter(frames), batch_size=3))
    assert len(out) == len(frames)
    for f, r in zip(frames, out):
        assert r.device.type == "cpu" and r.shape == f.shape[:2]
        assert torch.equal(r, ens.run(f).cpu())
    probs = list(ens.stream(frames[:4], batch_size=2, output="probs"))
    torch.testing.assert_close(torch.stack(probs), ens.run(np.stack(frames[:4]), "probs"), atol=1e-6, rtol=0)


def test_properties(members):
    ens = Ensemble(list(members), [1, 1])
    assert len(ens) == 2 and ens.segmenters == members
    assert ens.num_classes == 5 and ens.device == torch.device("cpu")
    assert ens.class_names == members[0].class_names and ens.palette == members[0].palette
    assert ens.postprocess is None and ens.crf is None
    assert "Ensemble([" in repr(ens) and "x 0.5" in repr(ens)
    assert fastfcn.Ensemble is Ensemble


def _crf_member():
    pytest.importorskip("pydensecrf", reason="pydensecrf2 not installed (pip install fastfcn[crf])")
    torch.manual_seed(0)
    model = fastfcn.models.build("fcn8s", width=0.0625, num_classes=5).eval()
    return fastfcn.Segmenter(model, device="cpu", backend="torch", precision="fp32", postprocess="crf")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: Ensemble([]), ValueError, "at least one"),
        (lambda m: Ensemble(m[0]), TypeError, "list of fastfcn.Segmenter"),
        (lambda m: Ensemble([m[0], "demo"]), TypeError, "member 1 .* str"),
        (lambda m: Ensemble([m[0], _segmenter("fcn32s", 0, num_classes=3)]), ValueError, r"\[5, 3\]"),
        (lambda m: Ensemble(m, [1]), ValueError, "1 weights for 2"),
        (lambda m: Ensemble(m, [1, 0]), ValueError, "weight 1 is 0"),
        (lambda m: Ensemble(m, [-1, 1]), ValueError, "weight 0 is -1"),
        (lambda m: Ensemble(m, [1, math.nan]), ValueError, "finite"),
        (lambda m: Ensemble(m, [1, math.inf]), ValueError, "finite"),
        (lambda m: Ensemble(m, [True, 1]), ValueError, "weight 0 is True"),
        (lambda m: Ensemble(m, [np.True_, 1]), ValueError, "weight 0 is "),
        (lambda m: Ensemble(m, [np.float32(-1), 1]), ValueError, "weight 0 is .*-1"),
        (lambda m: Ensemble(m, "12"), TypeError, "list of numbers"),
        (lambda m: Ensemble(m, postprocess="blur"), ValueError, "postprocess must be"),
        (lambda m: Ensemble([_segmenter("nyud-fcn32s-color", 0), _segmenter("nyud-fcn32s-hha", 1)]),
         ValueError, "member 1 .* takes hha images and member 0 color images"),
        (lambda m: Ensemble([_segmenter("nyud-fcn32s-color-d", 0)]), ValueError, "takes color \\+ depth"),
        (lambda m: Ensemble([m[0], _crf_member()]), ValueError, "member 1 .* postprocess='crf'"),
        (lambda m: Ensemble(m).run(images(), "scores"), ValueError, "output must be one of"),
        (lambda m: Ensemble(m).run(images(), overlap=3), InputError, "tile"),
    ],
)
def test_errors(members, make, error, match):
    with pytest.raises(error, match=match):
        make(members)


def test_one_member_is_that_member(members):
    x = images()
    torch.testing.assert_close(Ensemble([members[0]]).run(x, "probs"), members[0].run(x, "probs"),
                               atol=1e-7, rtol=0)  # fmt: skip


def test_fused_members_give_the_reference_average():
    # The fused backend's head emits the probabilities itself (the C++ head's softmax); the
    # ensemble of fused members equals the ensemble of the reference ones.
    torch.manual_seed(3)
    m1 = fastfcn.models.build("fcn8s", width=0.0625, num_classes=5).eval()
    m2 = fastfcn.models.build("fcn-alexnet", width=0.0625, num_classes=5).eval()
    x = images(2, (33, 29), seed=4)

    def ens(backend):
        segs = [fastfcn.Segmenter(m, device="cpu", backend=backend, precision="fp32") for m in (m1, m2)]
        return Ensemble(segs, (1, 2))

    torch.testing.assert_close(ens("fused").run(x, "probs"), ens("torch").run(x, "probs"), atol=1e-5, rtol=0)
