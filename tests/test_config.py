"""fastfcn.config.ModelConfig: frozen, one set of defaults, one validator, files of the previous
version loading identically (tests/data/compat_*, written by tests/data/make_compat.py before it)."""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastfcn
from fastfcn import models
from fastfcn.config import ARCH_CLASS_NAMES, ARCH_MEAN, VOC_CLASSES, ModelConfig, preprocessing, voc_palette
from fastfcn.errors import CheckpointError, InputError
from fastfcn.runtime.preprocess import Preprocessor

DATA = Path(__file__).parent / "data"
COMPAT = ("compat_alexnet_w03125.safetensors", "compat_alexnet_w03125.pt")


def _built(arch: str, num_classes: int = 5, width: float = 0.0625):
    with torch.device("meta"):  # nothing allocated: only the config is looked at
        return models.build(arch, num_classes, width)


def test_config_is_frozen():
    c = ModelConfig("fcn8s", 21)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.color_order = "RGB"
    with pytest.raises(TypeError):
        c["color_order"] = "RGB"
    with pytest.raises(TypeError):
        c.options["dropout"] = 0.1
    assert isinstance(c.mean, tuple) and isinstance(c.class_names, tuple) and isinstance(c.palette[0], tuple)
    # What a reader gets is a copy in JSON form: changing it leaves the config as it was.
    names = c["class_names"]
    names[0] = "changed"
    assert c.class_names[0] == "background"


@pytest.mark.parametrize("arch", models.available())
def test_defaults_are_the_models_own(arch):
    assert ModelConfig(arch, 5, width=0.0625) == _built(arch).config
    assert ModelConfig(arch, 5, width=0.0625).to_dict() == dict(_built(arch).config)
    c = ModelConfig(arch, 21)
    assert c.mean == ARCH_MEAN[arch] and c.color_order == "BGR" and c.input_scale == 255.0
    # 21 classes are VOC's names only for the VOC nets (SIFT Flow, NYUDv2 and PASCAL-Context have
    # their own datasets' names at 36, 40 and 60 classes, none invented at other counts); std 1 per
    # input channel (NYUDv2 fusion: 4 or 6).
    voc = VOC_CLASSES if arch not in ARCH_CLASS_NAMES else tuple(f"class_{i}" for i in range(21))
    assert c.std == (1.0,) * models.build(arch, width=1 / 64).in_channels
    assert c.class_names == voc and c.meta is None
    # 4 classes: the fewest a SIFT Flow net holds with its 3 geometric ones
    assert ModelConfig(arch, 4).class_names == ("class_0", "class_1", "class_2", "class_3")
    assert [list(p) for p in ModelConfig(arch, 4).palette] == [list(p) for p in voc_palette(4)]


def test_dilated_nets_take_their_own_mean():
    assert ModelConfig("dilated-frontend", 21).mean == (102.93, 111.36, 116.52)
    assert ModelConfig("fcn8s", 21).mean == (104.00698793, 116.66876762, 122.67891434)


@pytest.mark.parametrize("arch", models.available())
def test_round_trip_through_the_file_form(arch):
    c = _built(arch).config.replace(color_order="RGB", input_scale=1.0, meta={"run": {"seed": 3}})
    d = c.to_dict()
    assert list(d) == ["arch", "num_classes", "width", "options", "mean", "std", "color_order",
                       "input_scale", "class_names", "palette", "meta"]  # fmt: skip
    assert json.loads(json.dumps(d)) == d  # plain JSON: lists and dicts only
    back = ModelConfig.from_dict(json.loads(json.dumps(d)), "x.safetensors")
    assert back == c and back.to_dict() == d
    assert pickle.loads(pickle.dumps(c)) == c


def test_from_dict_fills_defaults_and_drops_file_keys():
    d = {"arch": "fcn16s", "num_classes": 21, "width": 0.5, "mean": None, "fastfcn_version": "0.1",
         "format_version": 1}  # fmt: skip
    c = ModelConfig.from_dict(d, "f.safetensors")
    assert c == ModelConfig("fcn16s", 21, width=0.5)
    assert "fastfcn_version" not in c and "meta" not in c and c.get("meta") is None


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"arch": "fcn7s"}, r"unknown arch 'fcn7s'; expected one of \['fcn32s'"),
        ({"num_classes": 0}, r"num_classes must be an int in 1..4096; got 0"),
        ({"width": 4.5}, r"width must be a number in \(0, 4\]; got 4.5"),
        ({"options": {"context": "basic"}}, r"unknown options \['context'\] for fcn8s"),
        ({"mean": [1.0, 2.0]}, r"mean must be 3 finite numbers \(one per input channel\)"),
        ({"std": [0.0, 1.0, 1.0]}, r"std must be positive, in \[0.0001, 10000\]"),
        ({"color_order": "RBG"}, r"color_order must be 'RGB' or 'BGR'; got 'RBG'"),
        ({"input_scale": 0}, r"input_scale must be a positive number in \[0.0001, 1e\+06\]"),
        ({"class_names": ["a", "b"]}, r"class_names has 2 entries; the model has num_classes=3"),
        ({"palette": [[0, 0, 256]] * 3}, r"palette must be a list of \[R, G, B\] with integers in 0..255"),
        ({"meta": [1]}, r"meta must be a dict"),
    ],
)
def test_one_validator_names_the_source(changes, problem):
    d = {**ModelConfig("fcn8s", 3).to_dict(), **changes}
    with pytest.raises(CheckpointError, match=rf"^m.safetensors: {problem}"):
        ModelConfig.from_dict(d, "m.safetensors")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    with pytest.raises(CheckpointError, match=rf"^ModelConfig: {problem}"):
        dataclasses.replace(ModelConfig("fcn8s", 3), **fields)


def preprocess(images, config):
    """uint8 (N, H, W, 3) -> the model's input, in the arithmetic order tests/data/make_compat.py
    used (the previous version's training preprocessing), so the files' logits compare exactly."""
    bgr, scale, mean, std = preprocessing(config)
    x = images.permute(0, 3, 1, 2).float()
    if bgr:
        x = x.flip(1)
    if scale != 255.0:
        x = x * (scale / 255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_training_and_runtime_preprocess_with_the_same_defaults():
    # Before ModelConfig a partial config was RGB with a zero mean in one and BGR in the other.
    img = torch.tensor([[[[10, 20, 30]]]], dtype=torch.uint8)
    partial = {"arch": "fcn8s"}
    assert preprocessing(partial) == (True, 255.0, ARCH_MEAN["fcn8s"], (1.0, 1.0, 1.0))
    want = torch.tensor([30.0, 20.0, 10.0]) - torch.tensor(ARCH_MEAN["fcn8s"])
    torch.testing.assert_close(preprocess(img, partial).flatten(), want)
    torch.testing.assert_close(Preprocessor(partial, torch.device("cpu"))(img).flatten(), want)
    torch.testing.assert_close(preprocess(img, ModelConfig("fcn8s", 21)).flatten(), want)
    with pytest.raises(InputError, match="no mean and arch None has none by default"):
        preprocessing({"color_order": "RGB"})


# ------------------------------------------------------------------------- files of the previous version


def _expected():
    with safe_open(str(DATA / "compat_expected.safetensors"), "pt") as f:
        configs = json.loads(f.metadata()["configs"])
    return load_file(str(DATA / "compat_expected.safetensors")), configs


@pytest.mark.parametrize("name", COMPAT)
def test_files_of_the_previous_version_load_identically(name):
    tensors, configs = _expected()
    m = fastfcn.load(DATA / name)
    assert isinstance(m.config, ModelConfig) and m.config.to_dict() == configs["compat"]
    assert m.config.color_order == "RGB" and m.config.meta["trained"]["iterations"] == 30
    with torch.no_grad():
        logits = m(preprocess(tensors["input"], m.config))
    assert torch.equal(logits, tensors["logits"])


def test_shipped_demo_loads_identically():
    tensors, configs = _expected()
    demo = fastfcn.load("demo")
    assert demo.config.to_dict() == configs["demo"]
    with torch.no_grad():
        labels = demo(preprocess(tensors["input"], demo.config)).argmax(1).to(torch.uint8)
    assert torch.equal(labels, tensors["demo_labels"])


@pytest.mark.parametrize("name", COMPAT)
def test_saved_metadata_is_byte_identical_to_the_previous_version(tmp_path, name):
    # A file saved now carries the same JSON (keys, order, value forms) as one saved before,
    # so the previous version reads it.
    m = fastfcn.load(DATA / name)
    fastfcn.save(m, tmp_path / "again.safetensors")
    with safe_open(str(tmp_path / "again.safetensors"), "pt") as a:
        now = a.metadata()["fastfcn"]
    if name.endswith(".safetensors"):
        with safe_open(str(DATA / name), "pt") as b:
            assert now == b.metadata()["fastfcn"]
    else:
        before = torch.load(DATA / name, weights_only=True)["config"]
        assert json.loads(now) == before and list(json.loads(now)) == list(before)


def test_an_arch_without_a_default_mean_must_be_given_one(monkeypatch):
    # A family added to fastfcn.models must add its mean to ARCH_MEAN or pass one.
    monkeypatch.delitem(ARCH_MEAN, "fcn8s")
    with pytest.raises(CheckpointError, match=r"arch 'fcn8s' has no default mean \(ARCH_MEAN\)"):
        ModelConfig("fcn8s", 3)
    assert ModelConfig("fcn8s", 3, mean=(1, 2, 3)).mean == (1.0, 2.0, 3.0)
