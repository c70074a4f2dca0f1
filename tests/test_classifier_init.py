"""Initialising FCNs from ImageNet classifiers (fastfcn.init_from_classifier, train --init):
small width-scaled classifier files written here, in the layouts of VGG_ILSVRC_16_layers,
bvlc_alexnet and bvlc_googlenet (docs/facts.md, "ImageNet classifiers") and of torchvision."""

import json

import pytest
import torch
from helpers import caffe_blob, caffe_layer, caffe_net, caffe_v1_layer

import fastfcn
from fastfcn import cli, models
from fastfcn.checkpoint import is_classifier_file, read_caffemodel
from fastfcn.kernels.structure import bilinear_weight

W = 0.0625  # conv1_1 4 channels, fc6 256 x (32 * 7 * 7)
VGG_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")  # fmt: skip
ALEX_CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")


def _donor(arch: str, seed: int = 1):
    """A model whose backbone weights the classifier file holds (random, reproducible)."""
    torch.manual_seed(seed)
    m = models.build(arch, width=W)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m


def _ip(name: str, w: torch.Tensor, b: torch.Tensor, v1: bool) -> bytes:
    """An InnerProduct layer: weight (out, in), as Caffe stores it (V1: legacy (1, 1, out, in))."""
    w2 = w.reshape(w.shape[0], -1)
    if v1:
        return caffe_v1_layer(name, 14, [caffe_blob(w2, legacy=True), caffe_blob(b, legacy=True)])
    return caffe_layer(name, "InnerProduct", [caffe_blob(w2), caffe_blob(b)])


def _conv(name: str, m, v1: bool) -> bytes:
    blobs = [caffe_blob(m.weight, legacy=v1), caffe_blob(m.bias, legacy=v1)]
    return caffe_v1_layer(name, 4, blobs) if v1 else caffe_layer(name, "Convolution", blobs)


def _classifier_bytes(donor, convs, caffe_names=None, v1=False, extra=()) -> bytes:
    """convs + fc6/fc7 as InnerProduct + a 10-way fc8 (what a classifier has and an FCN lacks)."""
    caffe_names = caffe_names or {}
    layers = [_conv(caffe_names.get(n, n), getattr(donor, n), v1) for n in convs]
    layers += [caffe_layer("relu5_3", "ReLU", [])] if not v1 else []
    for n in ("fc6", "fc7"):
        layers.append(_ip(n, getattr(donor, n).weight, getattr(donor, n).bias, v1))
    torch.manual_seed(5)
    fc = donor.fc7.weight.shape[0]
    layers.append(_ip("fc8", torch.randn(10, fc), torch.randn(10), v1))
    layers += list(extra)
    return caffe_net(layers, v1=v1)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """(donor, path of a VGG_ILSVRC_16_layers-like caffemodel in the V1 layout of the real file)."""
    donor = _donor("fcn32s")
    path = tmp_path_factory.mktemp("vgg") / "VGG_ILSVRC_16_layers.caffemodel"
    path.write_bytes(_classifier_bytes(donor, VGG_CONVS, v1=True))
    return donor, path


def _googlenet_file(tmp_path):
    donor = _donor("fcn-googlenet")
    names = [n for n, m in donor.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "score_fr"]

    def caffe(n):  # conv1_7x7_s2 -> conv1/7x7_s2, inception_3a_1x1 -> inception_3a/1x1
        i = n.index("_", len("inception_")) if n.startswith("inception_") else n.index("_")
        return n[:i] + "/" + n[i + 1:]

    c = donor.score_fr.weight.shape[1]
    aux = [caffe_layer(f"loss{k}/{part}", t, [caffe_blob(torch.randn(*s)), caffe_blob(torch.randn(s[0]))])
           for k in (1, 2) for part, t, s in (("conv", "Convolution", (8, 4, 1, 1)),
                                              ("fc", "InnerProduct", (16, 8)),
                                              ("classifier", "InnerProduct", (10, 16)))]  # fmt: skip
    layers = [_conv(caffe(n), getattr(donor, n), False) for n in names] + aux
    head = [caffe_blob(torch.randn(10, c)), caffe_blob(torch.randn(10))]
    layers.append(caffe_layer("loss3/classifier", "InnerProduct", head))
    path = tmp_path / "bvlc_googlenet.caffemodel"
    path.write_bytes(caffe_net(layers))
    return donor, path, names


def _torchvision_vgg16(donor) -> dict:
    idx = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    sd = {}
    for key, n in [(f"features.{i}", n) for i, n in zip(idx, VGG_CONVS)] + [("classifier.0", "fc6"),
                                                                            ("classifier.3", "fc7")]:
        w = getattr(donor, n).weight
        sd[f"{key}.weight"] = w if key.startswith("features") else w.reshape(w.shape[0], -1)
        sd[f"{key}.bias"] = getattr(donor, n).bias
    sd["classifier.6.weight"] = torch.randn(10, donor.fc7.weight.shape[0])
    sd["classifier.6.bias"] = torch.randn(10)
    return {k: v.detach().clone() for k, v in sd.items()}


def _scramble_head(model):
    """Non-reference values in the score and upsampling layers, so that the init must set them."""
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.startswith(("score", "upscore")):
                m.weight.normal_()


# ------------------------------------------------------------------------------ VGG16


def test_vgg_caffemodel_into_fcn8s(vgg):
    donor, path = vgg
    model = models.build("fcn8s", num_classes=5, width=W)
    _scramble_head(model)
    rep = fastfcn.init_from_classifier(model, path)
    assert rep.source == "caffemodel"
    assert set(rep.copied) == set(VGG_CONVS) and set(rep.reshaped) == {"fc6", "fc7"}
    assert rep.skipped == ("fc8",)
    assert set(rep.left_at_init) == {"score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4",
                                     "upscore8"}  # fmt: skip
    assert set(rep.zeroed) == {"score_fr", "score_pool4", "score_pool3"}
    for n in VGG_CONVS + ("fc6", "fc7"):
        torch.testing.assert_close(getattr(model, n).weight, getattr(donor, n).weight, rtol=0, atol=0, msg=n)
        torch.testing.assert_close(getattr(model, n).bias, getattr(donor, n).bias, rtol=0, atol=0, msg=n)
    for n in rep.zeroed:
        assert not getattr(model, n).weight.any() and not getattr(model, n).bias.any(), n
    for n in ("upscore2", "upscore_pool4", "upscore8"):
        w = getattr(model, n).weight
        assert torch.equal(w, bilinear_weight(5, w.shape[-1])), n
    assert model.config.color_order == "BGR" and model.config.input_scale == 255.0  # Caffe's, unchanged
    assert "copied 13 layers" in rep.summary() and "reshaped 2 (fc6, fc7)" in rep.summary()


def test_fc6_forward_is_the_classifiers_inner_product(vgg):
    _, path = vgg
    fc6 = next(ly for ly in read_caffemodel(path) if ly.name == "fc6")
    w, b = fc6.blobs[0].reshape(fc6.blobs[0].shape[-2:]), fc6.blobs[1].reshape(-1)  # legacy (1, 1, out, in)
    model = models.build("fcn32s", width=W).eval()
    fastfcn.init_from_classifier(model, path)
    torch.manual_seed(0)
    pool5 = torch.randn(2, model.fc6.in_channels, 7, 7)
    got = model.fc6(pool5).reshape(2, -1)
    want = pool5.reshape(2, -1) @ w.T + b  # Caffe's InnerProduct on the flattened (C, H, W) blob
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


ARCHS_ON_VGG = ["fcn32s", "fcn16s", "fcn8s-atonce", "deconvnet", "dilated-frontend", "dilated-context",
                "pascalcontext-fcn8s", "siftflow-fcn16s", "nyud-fcn32s-color", "nyud-fcn32s-hha",
                "nyud-fcn32s-color-hha"]  # fmt: skip


@pytest.mark.parametrize("arch", ARCHS_ON_VGG)
def test_every_vgg_arch_takes_the_backbone(vgg, arch):
    donor, path = vgg
    model = models.build(arch, width=W)
    rep = fastfcn.init_from_classifier(model, path)
    suffix = "color" if arch == "nyud-fcn32s-color-hha" else ""
    assert set(rep.copied) == {n + suffix for n in VGG_CONVS}
    for n in ("conv1_1", "conv5_3", "fc6", "fc7"):
        mod = getattr(model, n + suffix)
        assert torch.equal(mod.weight, getattr(donor, n).weight.reshape(mod.weight.shape)), n
    if arch == "nyud-fcn32s-color-hha":  # the HHA stream keeps its own init
        assert "conv1_1hha" in rep.left_at_init
        assert not torch.equal(model.conv1_1hha.weight, donor.conv1_1.weight)
    assert all(not getattr(model, n).weight.any() for n in rep.zeroed)


def test_bgrd_early_fusion_leaves_its_four_channel_conv1(vgg):
    _, path = vgg
    rep = fastfcn.init_from_classifier(models.build("nyud-fcn32s-color-d", width=W), path)
    assert "conv1_1_bgrd" in rep.left_at_init and "conv1_2" in rep.copied


def test_vgg_into_a_model_of_another_width_is_refused(vgg):
    _, path = vgg
    with pytest.raises(fastfcn.InputError, match=r"'conv1_1' holds \(4, 3, 3, 3\).*expects \(8, 3, 3, 3\)"):
        fastfcn.init_from_classifier(models.build("fcn8s", width=2 * W), path)


def test_non_finite_classifier_weights_are_refused(tmp_path):
    donor = _donor("fcn-alexnet")
    with torch.no_grad():
        donor.conv3.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "bvlc_alexnet.caffemodel"
    path.write_bytes(_classifier_bytes(donor, ALEX_CONVS))
    model = models.build("fcn-alexnet", width=W)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fastfcn.CheckpointError, match="non-finite.*'conv3'"):
        fastfcn.init_from_classifier(model, path)
    # conv1 and conv2 fitted before conv3 was found bad: nothing is half-copied
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_classifier_weights_that_overflow_float32_are_refused(tmp_path):
    # A float64 torchvision file with a value beyond float32's range would copy in as inf.
    sd = {k: v.double() for k, v in _torchvision_vgg16(_donor("fcn32s")).items()}
    sd["features.10.weight"][0, 0, 0, 0] = 1e39  # conv3_1
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    with pytest.raises(fastfcn.CheckpointError, match="non-finite.*'conv3_1'"):
        fastfcn.init_from_classifier(models.build("fcn32s", width=W), path)


def test_vgg_into_alexnet_is_refused(vgg):
    _, path = vgg
    with pytest.raises(fastfcn.InputError, match="'fc6'.*fcn-alexnet"):
        fastfcn.init_from_classifier(models.build("fcn-alexnet", width=W), path)


# ------------------------------------------------------------------------------ AlexNet, GoogLeNet


def test_alexnet_caffemodel_into_fcn_alexnet(tmp_path):
    donor = _donor("fcn-alexnet")
    path = tmp_path / "bvlc_alexnet.caffemodel"
    path.write_bytes(_classifier_bytes(donor, ALEX_CONVS))
    model = models.build("fcn-alexnet", width=W)
    _scramble_head(model)
    rep = fastfcn.init_from_classifier(model, path)
    assert set(rep.copied) == set(ALEX_CONVS) and set(rep.reshaped) == {"fc6", "fc7"}
    assert rep.skipped == ("fc8",) and rep.zeroed == ("score_fr",) and rep.bilinear == ("upscore",)
    assert model.conv2.groups == 2 and torch.equal(model.conv2.weight, donor.conv2.weight)
    assert torch.equal(model.fc6.weight, donor.fc6.weight)
    assert not model.score_fr.weight.any()
    assert torch.equal(model.upscore.weight, bilinear_weight(21, 63))
    with pytest.raises(fastfcn.InputError, match="'fc6'.*fcn8s"):
        fastfcn.init_from_classifier(models.build("fcn8s", width=W), path)


def test_googlenet_caffemodel_drops_classifier_and_aux(tmp_path):
    donor, path, names = _googlenet_file(tmp_path)
    assert is_classifier_file(path)
    model = models.build("fcn-googlenet", width=W)
    rep = fastfcn.init_from_classifier(model, path)
    assert set(rep.copied) == set(names) and not rep.reshaped
    assert set(rep.skipped) == {f"loss{k}_{p}" for k in (1, 2) for p in ("conv", "fc", "classifier")} | {
        "loss3_classifier"}  # fmt: skip
    assert rep.left_at_init == ("score_fr", "upscore") and rep.zeroed == ("score_fr",)
    for n in ("conv1_7x7_s2", "inception_4e_5x5", "inception_5b_pool_proj"):
        assert torch.equal(getattr(model, n).weight, getattr(donor, n).weight), n
    with pytest.raises(fastfcn.InputError, match="no layer of this caffemodel matches fcn8s"):
        fastfcn.init_from_classifier(models.build("fcn8s", width=W), path)


# ------------------------------------------------------------------------------ torchvision


def test_torchvision_vgg16_maps_by_order_and_converts_preprocessing(tmp_path):
    donor = _donor("fcn32s", seed=3)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(_torchvision_vgg16(donor), path)
    assert is_classifier_file(path)
    model = models.build("fcn16s", width=W)
    rep = fastfcn.init_from_classifier(model, path)
    assert rep.source == "torchvision vgg16"
    assert set(rep.copied) == set(VGG_CONVS) and set(rep.reshaped) == {"fc6", "fc7"}
    assert rep.skipped == ("fc8",)
    for n in ("conv1_1", "conv3_2", "conv5_3", "fc6", "fc7"):
        assert torch.equal(getattr(model, n).weight, getattr(donor, n).weight), n
    c = model.config
    assert (c.color_order, c.input_scale) == ("RGB", 1.0)
    assert (c.mean, c.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert rep.preprocessing and "torchvision" in rep.summary()
    with pytest.raises(fastfcn.InputError, match="RGB 0..1.*hha"):
        fastfcn.init_from_classifier(models.build("nyud-fcn32s-hha", width=W), path)


def test_torchvision_vgg16_in_the_legacy_torch_format(tmp_path):
    # torchvision's vgg16-397923af.pth predates torch 1.6: it is a legacy (non-zip) torch file,
    # which torch.load cannot memory-map (pytorch/vision#2068 lists such old weight files).
    donor = _donor("fcn32s", seed=3)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(_torchvision_vgg16(donor), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:2] == b"\x80\x02"  # not a zip
    assert is_classifier_file(path)
    model = models.build("fcn32s", width=W)
    rep = fastfcn.init_from_classifier(model, path)
    assert rep.source == "torchvision vgg16" and set(rep.reshaped) == {"fc6", "fc7"}
    for n in ("conv1_1", "conv5_3", "fc6", "fc7"):
        assert torch.equal(getattr(model, n).weight, getattr(donor, n).weight), n


def test_torchvision_alexnet_and_googlenet_are_refused(tmp_path):
    alex = {}
    for i, (o, c, k) in zip((0, 3, 6, 8, 10), ((64, 3, 11), (192, 64, 5), (384, 192, 3), (256, 384, 3),
                                                 (256, 256, 3))):  # fmt: skip
        alex[f"features.{i}.weight"] = torch.zeros(o // 16, c // 16 or 3, k, k)
        alex[f"features.{i}.bias"] = torch.zeros(o // 16)
    for i, (o, c) in zip((1, 4, 6), ((256, 16 * 36), (256, 256), (10, 256))):
        alex[f"classifier.{i}.weight"], alex[f"classifier.{i}.bias"] = torch.zeros(o, c), torch.zeros(o)
    torch.save(alex, tmp_path / "alexnet.pth")
    with pytest.raises(fastfcn.InputError, match="'conv1'.*not bvlc_alexnet"):
        fastfcn.init_from_classifier(models.build("fcn-alexnet", width=W), tmp_path / "alexnet.pth")
    tv_googlenet = {"conv1.conv.weight": torch.zeros(4, 3, 7, 7),
                    "inception3a.branch1.conv.weight": torch.zeros(4, 12, 1, 1)}  # fmt: skip
    torch.save(tv_googlenet, tmp_path / "googlenet.pth")
    with pytest.raises(fastfcn.InputError, match="bvlc_googlenet.caffemodel"):
        fastfcn.init_from_classifier(models.build("fcn-googlenet", width=W), tmp_path / "googlenet.pth")


def test_fcn_checkpoints_are_no_classifiers(tmp_path, vgg):
    _, path = vgg
    assert is_classifier_file(path)
    fcn = tmp_path / "fcn8s.pth"
    fastfcn.save(models.build("fcn8s", width=W), fcn)
    assert not is_classifier_file(fcn)
    caffe_fcn = tmp_path / "fcn8s.caffemodel"
    m = models.build("fcn32s", width=W)
    caffe_fcn.write_bytes(caffe_net([_conv(n, getattr(m, n), False) for n in ("conv1_1", "score_fr")]))
    assert not is_classifier_file(caffe_fcn)


def test_loading_a_classifier_as_an_fcn_points_to_the_surgery(tmp_path, vgg):
    _, path = vgg
    with pytest.raises(fastfcn.CheckpointError, match="classifier, not an FCN.*init_from_classifier"):
        fastfcn.load(path)
    torch.save(_torchvision_vgg16(_donor("fcn32s")), tmp_path / "vgg16.pth")
    with pytest.raises(fastfcn.CheckpointError, match="ImageNet classifier, not an FCN"):
        fastfcn.load(tmp_path / "vgg16.pth")


# ------------------------------------------------------------------------------ fastfcn train --init


def test_train_init_from_a_classifier(tmp_path, vgg, capsys):
    donor, path = vgg
    args = ["train", "--out", str(tmp_path), "--data", "synthetic", "--arch", "fcn32s", "--width", str(W),
            "--num-classes", "3", "--size", "32", "--batch", "1", "--iters", "1", "--lr", "1e-12",
            "--val-every", "0", "--threads", "1", "--quiet", "--init", str(path)]  # fmt: skip
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"fcn32s initialised from the ImageNet classifier {path} (caffemodel): copied 13 layers" in err
    assert "reshaped 2 (fc6, fc7), skipped 1 (fc8)" in err
    trained = fastfcn.load(tmp_path / "final.safetensors")
    # one step at lr 1e-12 moves nothing measurable: the backbone is the classifier's
    torch.testing.assert_close(trained.conv3_1.weight, donor.conv3_1.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(trained.fc6.weight, donor.fc6.weight, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "history.json").read_text())["loss"]


def test_train_keeps_torchvision_preprocessing_through_the_stages(tmp_path, capsys):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_vgg16(_donor("fcn32s", seed=3)), path)
    args = ["train", "--data", "synthetic", "--width", str(W), "--num-classes", "3", "--size", "32",
            "--batch", "1", "--val-every", "0", "--threads", "1", "--quiet", "--init", str(path)]  # fmt: skip
    assert cli.main([*args, "--out", str(tmp_path / "a"), "--stages", "fcn32s:1,fcn16s:1"]) == 0
    assert "(torchvision vgg16)" in capsys.readouterr().err
    c = fastfcn.load(tmp_path / "a" / "final.safetensors").config
    assert (c.arch, c.color_order, c.input_scale, c.std) == ("fcn16s", "RGB", 1.0, (0.229, 0.224, 0.225))
    # a classifier for another net is refused before anything trains, with the layer that differs
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--arch", "fcn-alexnet", "--iters", "1"]) == 1
    assert "'fc6'" in capsys.readouterr().err
