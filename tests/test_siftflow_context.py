"""SIFT Flow two-headed FCNs and PASCAL-Context FCNs (issue 14): the reference nets' names,
parameter counts and geometry, the two heads wired to the right layers (against an independent
Caffe-style forward), checkpoints and .caffemodel import, arch inference, the backends per head
(fused with the dead-zone skip, ONNX Runtime), the Segmenter's {head: result}, stream, tiling,
the CLI's one folder per head, and the refusals of the one-map-per-image paths.

The numbers come from fcn.berkeleyvision.org: siftflow-fcn{32,16,8}s/net.py (layer names,
num_output 33 / 3), siftflow_layers.py (mean), data/sift-flow/classes.txt,
pascalcontext-fcn{32,16,8}s/net.py (num_output 60), data/pascal-context/classes-59.txt.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import caffe_fcn
from test_caffe_agreement import caffe_forward

import fastfcn
from fastfcn import models
from fastfcn.checkpoint import infer_arch
from fastfcn.config import ModelConfig, validate_config
from fastfcn.errors import CheckpointError, InputError
from fastfcn.flops import count_macs
from fastfcn.heads import HEADS
from fastfcn.models import multihead

SIFT = ["siftflow-fcn32s", "siftflow-fcn16s", "siftflow-fcn8s"]
CONTEXT = ["pascalcontext-fcn32s", "pascalcontext-fcn16s", "pascalcontext-fcn8s"]
WIDTH = 1 / 16
GEO = 3
SEM = 4  # small nets: 4 semantic + 3 geometric classes


def small(arch, seed=0, num_classes=SEM + GEO, **kw):
    torch.manual_seed(seed)
    m = models.build(arch, num_classes=num_classes, width=WIDTH, **kw).eval()
    with torch.no_grad():  # score layers at the scale of the activations: clear label margins
        for name, p in m.named_parameters():
            if name.startswith("score") and name.endswith("weight"):
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return m


def image_batch(n=2, h=29, w=41, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------------------ models


def test_names_defaults_means_and_class_names():
    assert set(SIFT + CONTEXT) <= set(models.available())
    with torch.device("meta"):
        sf, pc = models.build("siftflow-fcn8s"), models.build("pascalcontext-fcn16s")
    assert sf.config["num_classes"] == 36 and sf.config["options"]["geometric_classes"] == 3
    assert multihead.output_heads(sf.config) == (("semantic", 33), ("geometric", 3))
    assert sf.config["mean"] == pytest.approx([114.578, 115.294, 108.353])
    names = sf.config["class_names"]
    assert (names[0], names[5], names[32], names[33:]) == ("awning", "building", "window",
                                                           ["sky", "horizontal", "vertical"])
    assert pc.config["num_classes"] == 60 and pc.config["arch"] == "pascalcontext-fcn16s"
    assert pc.config["mean"] == pytest.approx([104.00698793, 116.66876762, 122.67891434])
    assert (pc.config["class_names"][0], pc.config["class_names"][28], pc.config["class_names"][59]) == (
        "background", "clothes", "wood")
    assert multihead.output_heads(pc.config) is None
    # the config's own defaults (what a file without them loads with) are the models'
    assert ModelConfig("siftflow-fcn16s", 36) == models.build("siftflow-fcn16s", width=WIDTH).config.replace(
        width=1.0)
    assert ModelConfig("pascalcontext-fcn8s", 60).class_names == tuple(pc.config["class_names"])
    # another class count: no invented names
    other = models.build("pascalcontext-fcn32s", num_classes=5, width=WIDTH)
    assert other.config["class_names"][0] == "class_0"
    assert models.build("siftflow-fcn32s", num_classes=21, width=WIDTH).config["class_names"][1] == "class_1"


def _reference_count(arch: str) -> int:
    """Parameters of the reference Caffe net, from its layers' (num_output, input, kernel, bias)."""
    vgg = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
           (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip
    n = sum(o * i * 9 + o for o, i in vgg) + (4096 * 512 * 49 + 4096) + (4096 * 4096 + 4096)
    base = arch.split("-")[1]
    taps = {"fcn32s": [], "fcn16s": [512], "fcn8s": [512, 256]}[base]
    ups = {"fcn32s": [64], "fcn16s": [4, 32], "fcn8s": [4, 4, 16]}[base]
    for c in ([33, 3] if arch.startswith("siftflow") else [60]):
        n += sum(c * i + c for i in [4096, *taps]) + sum(c * c * k * k for k in ups)
    return n


@pytest.mark.parametrize("arch,count", [
    ("siftflow-fcn32s", 138_905_444), ("siftflow-fcn16s", 135_568_424), ("siftflow-fcn8s", 134_751_980),
    ("pascalcontext-fcn32s", 149_251_964), ("pascalcontext-fcn16s", 138_281_144),
    ("pascalcontext-fcn8s", 135_589_364),
])  # fmt: skip
def test_parameter_counts_of_the_reference_nets(arch, count):
    with torch.device("meta"):
        m = models.build(arch)
    assert models.parameter_count(m) == _reference_count(arch) == count


@pytest.mark.parametrize("arch", SIFT)
def test_heads_are_the_voc_heads_with_suffixes(arch):
    m = small(arch)
    base = HEADS[arch.removeprefix("siftflow-")]
    assert [h.score for h in m.heads] == ["score_fr_sem", "score_fr_geo"]
    for head, suffix in zip(m.heads, ("_sem", "_geo")):
        assert [(s.upsample, s.kernel, s.stride, s.offset, s.skip) for s in head.stages] == [
            (s.upsample + suffix, s.kernel, s.stride, s.offset, s.skip and s.skip + suffix)
            for s in base.stages
        ]
        assert [(t.score, t.source) for t in head.taps] == [(t.score + suffix, t.source) for t in base.taps]
    assert m.head_convs == {n for n, _ in m.named_children() if n.startswith("score")}


@pytest.mark.parametrize("arch", SIFT + CONTEXT)
def test_output_is_input_size_for_every_side_1_to_96(arch):
    # As test_models.py does for VOC: H in 1..96 with W = 97 - H covers every height and width.
    with torch.device("meta"):
        m = models.build(arch, num_classes=SEM + GEO, width=1 / 64).eval()
    maps = (2,) if arch in SIFT else ()
    for h in range(1, 97):
        x = torch.empty(1, 3, h, 97 - h, device="meta")
        assert tuple(m(x).shape) == (1, SEM + GEO, h, 97 - h)
        assert tuple(m(x, "labels").shape) == (1, *maps, h, 97 - h)


@pytest.mark.parametrize("arch", SIFT)
def test_each_head_matches_an_independent_caffe_forward(arch):
    """Each head equals the VOC net of the same stride run by plain torch.nn.functional on the
    shared backbone and that head's own (suffix-stripped) layers: the heads are wired to the right
    score layers, upsamplings and taps, and labels / probs are per head."""
    m = small(arch, seed=3)
    x = torch.randn(2, 3, 23, 37, generator=torch.Generator().manual_seed(2)) * 60
    sd = m.state_dict()
    with torch.no_grad():
        logits, probs, labels = m(x), m(x, "probs"), m(x, "labels")
        for i, (suffix, lo, hi) in enumerate((("_sem", 0, SEM), ("_geo", SEM, SEM + GEO))):
            own = {k.replace(suffix, ""): v for k, v in sd.items() if suffix in k or "score" not in k
                   and "upscore" not in k}  # fmt: skip
            want = caffe_forward(arch.removeprefix("siftflow-"), own, x)
            torch.testing.assert_close(logits[:, lo:hi], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            torch.testing.assert_close(probs[:, lo:hi], torch.softmax(want, 1), rtol=1e-4, atol=1e-5)
            assert torch.equal(labels[:, i].long(), logits[:, lo:hi].argmax(1))
    assert labels.dtype == torch.uint8 and int(labels[:, 1].max()) < GEO


def test_labels_are_int32_for_both_heads_when_one_has_over_256_classes():
    with torch.device("meta"):  # shapes and dtypes only: no 257-class upsampling in memory
        m = models.build("siftflow-fcn8s", num_classes=257 + GEO, width=1 / 64).eval()
        labels, logits = m(torch.empty(1, 3, 5, 7), "labels"), m(torch.empty(1, 3, 5, 7))
    assert labels.dtype == torch.int32 and labels.shape == (1, 2, 5, 7)
    assert multihead.finish(logits, "labels", multihead.output_heads(m.config)).dtype == torch.int32


def test_bad_geometric_classes_are_refused():
    with pytest.raises(ValueError, match="geometric_classes"):
        models.build("siftflow-fcn8s", num_classes=3, width=WIDTH)  # 3 geometric leave no semantic
    with pytest.raises(ValueError, match="geometric_classes"):
        models.build("siftflow-fcn8s", num_classes=8, width=WIDTH, geometric_classes=0)
    with pytest.raises(ValueError, match="bad options"):
        models.build("pascalcontext-fcn8s", width=WIDTH, geometric_classes=3)
    good = {"arch": "siftflow-fcn16s", "num_classes": 8, "width": 0.5, "options": {"geometric_classes": 2}}
    assert validate_config(good, "x")["options"] == {"geometric_classes": 2}
    for bad in (8, 0, True, 2.0):
        with pytest.raises(CheckpointError, match="geometric_classes must be an int in 1..num_classes-1"):
            validate_config(dict(good, options={"geometric_classes": bad}), "x")
    with pytest.raises(CheckpointError, match="unknown options"):
        validate_config(dict(good, arch="fcn16s"), "x")


def test_flops_count_both_heads_and_the_dead_zone():
    size = (1, 3, 96, 128)
    with torch.device("meta"):
        sf = models.build("siftflow-fcn8s")
        sem, geo = models.build("fcn8s", num_classes=33), models.build("fcn8s", num_classes=3)
    got = {c.name: c.macs for c in count_macs(sf, size, skip_dead_zone=False).layers}
    head = ("score", "upscore")
    for net, suffix in ((sem, "_sem"), (geo, "_geo")):
        for c in count_macs(net, size, skip_dead_zone=False).layers:
            name = c.name.split(".")[0]
            if name.startswith(head):
                key = c.name.replace(name, name + suffix)
            elif suffix == "_geo":
                continue  # the shared backbone: counted once, with the semantic net's
            else:
                key = c.name
            assert got.pop(key) == c.macs, key
    assert not got  # nothing counted twice or left out
    total = count_macs(sf, size)
    assert total.computed_macs < total.macs  # conv1_1's pad 100: the skipped positions are counted


# -------------------------------------------------------------------------------------- checkpoints


def test_round_trip_and_bare_state_dict_inference(tmp_path):
    m = small("siftflow-fcn16s", num_classes=6, geometric_classes=2)
    x = torch.randn(1, 3, 21, 19) * 50
    path = fastfcn.save(m, tmp_path / "sf.safetensors")
    loaded = fastfcn.load(path)
    assert loaded.config == m.config and multihead.output_heads(loaded.config) == (("semantic", 4),
                                                                                   ("geometric", 2))
    with torch.no_grad():
        assert torch.equal(loaded(x, "labels"), m(x, "labels"))
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    bare = fastfcn.load(tmp_path / "bare.pth")
    assert (bare.config["arch"], bare.config["num_classes"], bare.config["options"]["geometric_classes"],
            bare.config["width"]) == ("siftflow-fcn16s", 6, 2, WIDTH)  # fmt: skip
    for arch in SIFT:
        assert infer_arch(small(arch).state_dict()) == arch


@pytest.mark.parametrize("base", ["fcn16s", "fcn8s"])  # fcn32s: same keys, a 14.7M-value upscore
def test_pascal_context_inference_by_class_count(tmp_path, base):
    """Same keys as VOC: 60 classes load as pascalcontext-*, others as VOC; a file's config wins."""
    m60 = models.build(base, num_classes=60, width=WIDTH)
    assert infer_arch(m60.state_dict()) == f"pascalcontext-{base}"
    assert infer_arch(models.build(base, num_classes=21, width=WIDTH).state_dict()) == base
    torch.save(m60.state_dict(), tmp_path / "bare.pth")
    loaded = fastfcn.load(tmp_path / "bare.pth")
    assert loaded.config["arch"] == f"pascalcontext-{base}" and loaded.config["class_names"][-1] == "wood"
    assert fastfcn.load(fastfcn.save(m60, tmp_path / "voc60.safetensors")).config["arch"] == base
    assert fastfcn.load(tmp_path / "bare.pth", arch=base).config["arch"] == base
    with torch.device("meta"):  # keys and shapes only
        assert infer_arch(models.build("fcn32s", num_classes=60).state_dict()) == "pascalcontext-fcn32s"
        assert infer_arch(models.build("fcn-alexnet", num_classes=60).state_dict()) == "fcn-alexnet"


@pytest.mark.parametrize("v1", [False, True], ids=["layer", "v1-layers"])
def test_caffemodel_with_the_reference_layer_names(tmp_path, v1):
    m = small("siftflow-fcn8s", seed=4)
    path = tmp_path / "siftflow-fcn8s-heavy.caffemodel"
    path.write_bytes(caffe_fcn(m, v1))
    loaded = fastfcn.load(path)
    c = loaded.config
    assert (c["arch"], c["num_classes"], c["options"]["geometric_classes"]) == (
        "siftflow-fcn8s", SEM + GEO, GEO)
    sa, sb = m.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pascal_context_caffemodel(tmp_path):
    """pascalcontext-fcn16s-heavy.caffemodel's layout: the VOC layer names with 60 outputs."""
    m = models.build("pascalcontext-fcn16s", width=WIDTH).eval()
    path = tmp_path / "pascalcontext-fcn16s-heavy.caffemodel"
    path.write_bytes(caffe_fcn(m, v1=False))
    loaded = fastfcn.load(path)
    assert (loaded.config["arch"], loaded.config["num_classes"]) == ("pascalcontext-fcn16s", 60)
    sa, sb = m.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- runtime, CLI


@pytest.fixture(scope="module")
def sift():
    return small("siftflow-fcn8s", seed=5)


def _clear(logits: torch.Tensor, rel: float = 1e-3) -> torch.Tensor:
    top2 = logits.topk(2, dim=-3).values
    return (top2.select(-3, 0) - top2.select(-3, 1)) > rel * float(logits.abs().max())


def _agree(got: dict, want: dict, want_logits: dict) -> None:
    for name in ("semantic", "geometric"):
        clear = _clear(want_logits[name])
        assert clear.float().mean() > 0.9, name
        assert torch.equal(got[name][clear], want[name][clear]), name


def _agree_per_head(seg, ref, frames, rel: float) -> None:
    """Each head's logits within ``rel`` of the reference's range, and its labels equal wherever
    the reference's top two classes are clearly apart."""
    want_logits, got_logits = ref.run(frames, "logits"), seg.run(frames, "logits")
    assert set(got_logits) == set(want_logits) == {"semantic", "geometric"}
    for name in want_logits:
        scale = float(want_logits[name].abs().max())
        torch.testing.assert_close(got_logits[name], want_logits[name], rtol=0, atol=rel * scale)
    _agree(seg.run(frames), ref.run(frames), want_logits)


def test_segmenter_returns_one_result_per_head(sift):
    seg = fastfcn.Segmenter(sift, backend="torch", device="cpu", precision="fp32")
    assert seg.heads == (("semantic", SEM), ("geometric", GEO))
    assert [len(p) for p in seg.head_palettes().values()] == [SEM, GEO]
    frames = image_batch()
    labels, logits, probs = seg.run(frames), seg.run(frames, "logits"), seg.run(frames, "probs")
    assert set(labels) == {"semantic", "geometric"}
    assert labels["semantic"].shape == labels["geometric"].shape == (2, 29, 41)
    assert logits["semantic"].shape == (2, SEM, 29, 41) and logits["geometric"].shape == (2, GEO, 29, 41)
    for name in labels:
        assert torch.equal(labels[name].long(), logits[name].argmax(1))
        torch.testing.assert_close(probs[name].sum(1), torch.ones(2, 29, 41))
    one = seg.run(frames[0].numpy())
    assert torch.equal(one["geometric"], labels["geometric"][0])
    listed = seg.run([frames[1].numpy(), frames[0, :17].numpy()])
    assert torch.equal(listed[0]["semantic"], labels["semantic"][1])
    assert listed[1]["semantic"].shape == (17, 41)
    # tiles larger than the image: one tile, the untiled result; smaller: stitched per head
    assert torch.equal(seg.run(frames, tile=64)["semantic"], labels["semantic"])
    tiled = seg.run(frames[:1], "logits", tile=(29, 24), overlap=8)
    assert tiled["geometric"].shape == (1, GEO, 29, 41)
    streamed = list(seg.stream(iter(frames.numpy()), batch_size=2))
    assert all(torch.equal(s[k], labels[k][i]) for i, s in enumerate(streamed) for k in labels)


@pytest.mark.parametrize("skip_dead_zone", [True, False])
def test_fused_backend_equals_the_reference_per_head(sift, skip_dead_zone):
    ref = fastfcn.Segmenter(sift, backend="torch", device="cpu", precision="fp32")
    fused = fastfcn.Segmenter(sift, backend="fused", device="cpu", precision="fp32",
                              skip_dead_zone=skip_dead_zone)  # fmt: skip
    assert (fused._backend.dead_zone is not None) == skip_dead_zone
    _agree_per_head(fused, ref, image_batch(seed=7), rel=1e-4)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_onnx_export_and_graph_backends_per_head(exported, backend):
    """The export shared with test_export.py (siftflow-fcn8s, 33 + 3 classes, width 0.125)."""
    pytest.importorskip(backend)
    from fastfcn.export import read_onnx_metadata

    model, path = exported("siftflow-fcn8s")
    assert read_onnx_metadata(path)["options"]["geometric_classes"] == GEO
    ref = fastfcn.Segmenter(model, backend="torch", device="cpu", precision="fp32")
    ort = fastfcn.Segmenter(path, device="cpu", backend=backend, precision="fp32")
    assert ort.backend == backend and ort.heads == ref.heads
    frames = image_batch(seed=9)
    _agree_per_head(ort, ref, frames, rel=1e-5)
    torch.testing.assert_close(ort.run(frames, "probs")["geometric"].sum(1), torch.ones(2, 29, 41))


def test_cli_segment_writes_each_head(sift, tmp_path, capsys):
    from PIL import Image

    from fastfcn.cli import main

    ckpt = fastfcn.save(sift, tmp_path / "sf.safetensors")
    src = tmp_path / "in"
    src.mkdir()
    frames = image_batch(seed=11).numpy()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(src / f"p{i}.png")
    out = tmp_path / "out"
    rc = main(["segment", str(ckpt), str(src), "--out", str(out), "--backend", "torch", "--device", "cpu",
               "--quiet"])  # fmt: skip
    assert rc == 0
    want = fastfcn.Segmenter(ckpt, backend="torch", device="cpu").run(list(frames))
    for i in range(len(frames)):
        for name in ("semantic", "geometric"):
            got = np.asarray(Image.open(out / "labels" / name / f"p{i}.png"))
            assert np.array_equal(got, want[i][name].numpy()), (i, name)
            assert (out / "overlays" / name / f"p{i}.png").is_file()
    assert not (out / "labels" / "p0.png").exists()
    capsys.readouterr()
    assert main(["info", str(ckpt)]) == 0
    assert re.search(rf"\nheads +semantic \({SEM} classes\), geometric \({GEO} classes\)\n",
                     capsys.readouterr().out)


def test_evaluation_wants_every_heads_ground_truth(sift, tmp_path):
    """Evaluating a two-headed net needs every head's labels and all heads' classes (video, the Ray
    job and eval with each head's labels: tests/test_multihead_io.py, test_distributed.py;
    training: tests/test_train_multi.py)."""
    seg = fastfcn.Segmenter(sift, backend="torch", device="cpu")
    from fastfcn.evaluate import evaluate

    with pytest.raises(InputError, match=r"head 'semantic' has no ground truth in the dataset \(one label"):
        evaluate(seg, [(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))], SEM + GEO)
    with pytest.raises(InputError, match=r"num_classes=4 but the heads"):
        evaluate(seg, [(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8))], SEM)
