"""Two-headed (SIFT Flow) and two-input (NYUDv2) nets through the file paths: `fastfcn video` /
segment_video, `fastfcn batch` / fastfcn.distributed and `fastfcn eval` / fastfcn.evaluate.
Every file written is compared with Segmenter.run on the same input."""

import numpy as np
import pytest
import torch
from test_siftflow_context import GEO, SEM, small

import fastfcn
from fastfcn import cli
from fastfcn.errors import InputError

HEADS = ("semantic", "geometric")


@pytest.fixture(scope="module")
def sift():
    return fastfcn.Segmenter(small("siftflow-fcn8s", seed=5), backend="torch", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def sift_file(tmp_path_factory):
    return fastfcn.save(small("siftflow-fcn8s", seed=5), tmp_path_factory.mktemp("ckpt") / "sf.safetensors")


# -------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    from test_video import make_video

    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    make_video(path, n=6)
    return path


def _want(seg, clip):
    """Each head's labels of every decoded frame of ``clip``, from Segmenter.run."""
    from test_video import decode

    frames = np.stack([f for _, f in decode(clip)])
    return seg.run(frames)


def test_video_writes_each_head(sift, clip, tmp_path):
    from test_video import audio_packets, decode

    from fastfcn.video import segment_video

    s = segment_video(clip, tmp_path / "out.mp4", sift, labels_out=tmp_path / "lab.mkv", batch_size=4,
                      progress=False)  # fmt: skip
    want = _want(sift, clip)
    assert s["frames_out"] == 6 and set(s["heads"]) == set(HEADS)
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "lab.mkv").exists()
    times = [t for t, _ in decode(clip)]
    for name in HEADS:
        assert s["heads"][name] == {"destination": str(tmp_path / f"out.{name}.mp4"),
                                    "labels_out": str(tmp_path / f"lab.{name}.mkv")}  # fmt: skip
        labels = decode(tmp_path / f"lab.{name}.mkv")
        assert [t for t, _ in labels] == times
        got = np.stack([f for _, f in labels])
        assert np.array_equal(got, want[name].numpy()), name
        pictures = decode(tmp_path / f"out.{name}.mp4")
        assert [t for t, _ in pictures] == times and pictures[0][1].shape == (48, 64, 3)
        assert audio_packets(tmp_path / f"out.{name}.mp4") == audio_packets(clip)
    # the two heads' pictures are their own: the semantic and geometric colours differ
    sem, geo = (decode(tmp_path / f"out.{n}.mp4")[0][1].astype(int) for n in HEADS)
    assert np.abs(sem - geo).mean() > 5


def test_video_label_folders_and_mapping_per_head(sift, clip, tmp_path):
    from PIL import Image

    from fastfcn.video import segment_video

    want = _want(sift, clip)
    segment_video(clip, tmp_path / "labels/", sift, mode="labels", every=2, progress=False)
    for name in HEADS:
        files = sorted((tmp_path / "labels" / name).iterdir())
        assert len(files) == 6
        for k, f in enumerate(files):  # every=2: frame k has the labels of frame k - k % 2
            assert np.array_equal(np.asarray(Image.open(f)), want[name][k - k % 2].numpy()), (name, k)
    dst = {"semantic": tmp_path / "a.mkv", "geometric": tmp_path / "b.mkv"}
    s = segment_video(clip, dst, sift, mode="labels", progress=False)
    assert s["destination"] == f"{dst['semantic']}, {dst['geometric']}"
    with pytest.raises(InputError, match=r"destination is a mapping of \['semantic'\]; expected one path per "
                                         r"head \(semantic, geometric\)"):  # fmt: skip
        segment_video(clip, {"semantic": tmp_path / "c.mkv"}, sift, mode="labels", progress=False)
    with pytest.raises(InputError, match="heads semantic and geometric would both write"):
        segment_video(clip, {"semantic": tmp_path / "c.mkv", "geometric": tmp_path / "c.mkv"}, sift,
                      mode="labels", progress=False)  # fmt: skip


def test_video_mapping_is_refused_for_one_head(clip, tmp_path):
    from fastfcn.video import segment_video

    seg = fastfcn.Segmenter(small("pascalcontext-fcn32s"), backend="torch", device="cpu")
    with pytest.raises(InputError, match=r"expected one path \(the net has one head\)"):
        segment_video(clip, {"semantic": tmp_path / "a.mkv"}, seg, mode="labels", progress=False)


def test_video_of_a_two_input_net_without_its_depth_video_is_refused_before_writing(clip, tmp_path):
    from fastfcn.video import segment_video

    seg = fastfcn.Segmenter(fastfcn.models.build("nyud-fcn32s-color-d", width=1 / 16, num_classes=5).eval(),
                            backend="torch", device="cpu")  # fmt: skip
    with pytest.raises(InputError, match=r"^nyud-fcn32s-color-d takes color images and depth: pass "
                                         r"depth=VIDEO \(and only it\)$"):
        segment_video(clip, tmp_path / "out.mp4", seg, labels_out=tmp_path / "lab.mkv", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_video_two_heads(sift_file, clip, tmp_path, capsys):
    rc = cli.main(["video", str(sift_file), str(clip), str(tmp_path / "seg.mp4"), "--mode", "side-by-side",
                   "--labels-out", str(tmp_path / "png"), "--backend", "torch", "--device", "cpu",
                   "--precision", "fp32", "--quiet"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'seg.semantic.mp4'}, {tmp_path / 'seg.geometric.mp4'}" in err
    for name in HEADS:
        assert (tmp_path / f"seg.{name}.mp4").is_file()
        assert len(list((tmp_path / "png" / name).glob("frame_*.png"))) == 6
    assert cli.main(["video", "--help"]) == 0
    assert "OUT.semantic.mp4 and OUT.geometric.mp4" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------------------- eval


def _voc(root, images, labels, split="val"):
    """images: {id: (H, W, 3) uint8}; labels: {head or None: {id: (H, W) uint8}} -> a VOC-layout
    folder, each head's ground truth in SegmentationClass/<head>/."""
    from PIL import Image

    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, im in images.items():
        Image.fromarray(im).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
    for head, maps in labels.items():
        folder = root / "SegmentationClass" / (head or "")
        folder.mkdir(parents=True, exist_ok=True)
        for i, lab in maps.items():
            Image.fromarray(lab).save(folder / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))


def _ground_truth(pred: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """The prediction with a fifth of the pixels moved to the next class and a tenth void (255):
    scores well away from 0 and 1, so a wrong pairing or head shows."""
    rng = np.random.default_rng(seed)
    gt = pred.astype(np.uint8).copy()
    moved = rng.random(gt.shape) < 0.2
    gt[moved] = (gt[moved] + 1) % classes
    gt[rng.random(gt.shape) < 0.1] = 255
    return gt


def _expected(gts: list, preds: list, classes: int) -> dict:
    from fastfcn.metrics import confusion_matrix, scores

    cm = sum(confusion_matrix(g, p, classes) for g, p in zip(gts, preds))
    return {**scores(cm), "confusion_matrix": cm.tolist()}


def _check(got: dict, want: dict) -> None:
    assert got["confusion_matrix"] == want["confusion_matrix"]
    for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0.3 < got["mean_iu"] < 0.95


def _eval_json(capsys, args) -> dict:
    import json

    capsys.readouterr()
    assert cli.main(["eval", *args, "--backend", "torch", "--device", "cpu", "--precision", "fp32", "--json",
                     "--batch", "2"]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def test_eval_scores_each_head(sift_file, tmp_path, capsys):
    from PIL import Image

    from fastfcn.imageio import read_image

    rng = np.random.default_rng(3)
    sizes = ((29, 41), (29, 41), (33, 37))  # two sizes: a batch is flushed at the size change
    images = {f"sf_{k}": rng.integers(0, 256, (*s, 3), dtype=np.uint8) for k, s in enumerate(sizes)}
    root = tmp_path / "siftflow"
    _voc(root, images, {})  # the images first: the labels are made from their decoded JPEGs
    seg = fastfcn.Segmenter(sift_file, backend="torch", device="cpu", precision="fp32")
    preds = {i: seg.run(read_image(root / "JPEGImages" / f"{i}.jpg")) for i in images}
    classes = dict(seg.heads)
    gts = {h: {i: _ground_truth(preds[i][h].numpy(), classes[h], seed=k) for k, i in enumerate(images)}
           for h in HEADS}  # fmt: skip
    for h, maps in gts.items():
        (root / "SegmentationClass" / h).mkdir(parents=True)
        for i, lab in maps.items():
            Image.fromarray(lab).save(root / "SegmentationClass" / h / f"{i}.png")
    got = _eval_json(capsys, [str(sift_file), "--data", str(root)])
    assert got["images"] == 3 and set(got["heads"]) == set(HEADS) and "mean_iu" not in got
    for h in HEADS:
        want = _expected([gts[h][i] for i in images], [preds[i][h].numpy() for i in images], classes[h])
        _check(got["heads"][h], want)
        assert len(got["heads"][h]["per_class_iu"]) == classes[h]
    # the text table: one per head, named
    assert cli.main(["eval", str(sift_file), "--data", str(root), "--backend", "torch", "--device", "cpu"
                     ]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(f"semantic ({SEM} classes)\n") and f"\n\ngeometric ({GEO} classes)\n" in out
    # a head without ground truth: a clear error
    (root / "SegmentationClass" / "geometric" / "sf_1.png").unlink()
    assert cli.main(["eval", str(sift_file), "--data", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"label file {root / 'SegmentationClass' / 'geometric' / 'sf_1.png'} (listed in" in err
    # the held-out synthetic split, with SIFT Flow's geometric labels of the scenes
    from fastfcn.data import heldout_scenes
    from fastfcn.evaluate import evaluate

    got = _eval_json(capsys, [str(sift_file), "--data", "synthetic", "--n", "3", "--size", "32"])
    want = evaluate(seg, heldout_scenes(3, 32, SEM, heads=HEADS), SEM + GEO)[0]
    assert want["geometric"]["mean_iu"] > 0
    for h in HEADS:
        assert got["heads"][h]["mean_iu"] == pytest.approx(want[h]["mean_iu"], abs=1e-12)


def test_eval_refuses_a_folder_of_other_classes_per_head(sift_file, tmp_path, capsys):
    # As for a net of one head: the folder's class_names.txt must count the model's classes.
    root = tmp_path / "siftflow"
    labels = {h: {"sf_0": np.zeros((16, 16), np.uint8)} for h in HEADS}
    _voc(root, {"sf_0": np.zeros((16, 16, 3), np.uint8)}, labels)
    names = [f"s{k}" for k in range(SEM + 1)] + ["sky", "horizontal", "vertical"]
    (root / "class_names.txt").write_text("\n".join(names) + "\n")
    capsys.readouterr()
    assert cli.main(["eval", str(sift_file), "--data", str(root), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"fastfcn eval: error: {root} has {SEM + 1 + GEO} classes but the model predicts {SEM + GEO}; "
        "evaluate a model trained for this dataset"
    )
    (root / "class_names.txt").write_text("\n".join(names[:SEM] + names[SEM + 1:]) + "\n")
    assert _eval_json(capsys, [str(sift_file), "--data", str(root)])["images"] == 1


def test_eval_two_input_net_pairs_files_by_stem(tmp_path, capsys):
    from PIL import Image

    from fastfcn.imageio import read_depth, read_image

    torch.manual_seed(0)
    model = fastfcn.models.build("nyud-fcn32s-color-d", width=1 / 16, num_classes=5).eval()
    ckpt = fastfcn.save(model, tmp_path / "colord.safetensors")
    rng = np.random.default_rng(4)
    ids = ("img_5001", "img_5002", "img_5003")
    images = {i: rng.integers(0, 256, (19, 23, 3), dtype=np.uint8) for i in ids}
    root = tmp_path / "nyud"
    _voc(root, images, {})
    (tmp_path / "depth").mkdir()
    for k, i in enumerate(ids):  # uint16 millimetres; one as .tif: any image suffix pairs
        d = rng.integers(500, 10000, (19, 23), dtype=np.uint16)
        Image.fromarray(d).save(tmp_path / "depth" / (f"{i}.tif" if k == 1 else f"{i}.png"))
    seg = fastfcn.Segmenter(ckpt, backend="torch", device="cpu", precision="fp32")
    depth = {i: next((tmp_path / "depth").glob(f"{i}.*")) for i in ids}
    preds = {i: seg.run(read_image(root / "JPEGImages" / f"{i}.jpg"), depth=read_depth(depth[i])).numpy()
             for i in ids}  # fmt: skip
    gts = {i: _ground_truth(preds[i], 5, seed=k) for k, i in enumerate(ids)}
    (root / "SegmentationClass").mkdir()
    for i in ids:
        Image.fromarray(gts[i]).save(root / "SegmentationClass" / f"{i}.png")
    (root / "class_names.txt").write_text("\n".join(seg.class_names) + "\n")
    got = _eval_json(capsys, [str(ckpt), "--data", str(root), "--depth", str(tmp_path / "depth")])
    assert got["images"] == 3 and got["depth"] == str(tmp_path / "depth")
    _check(got, _expected([gts[i] for i in ids], [preds[i] for i in ids], 5))
    # each image with its own file (a tiny random FCN-32s barely reads depth: checked here directly)
    from fastfcn.cli.evaluate import Paired
    from fastfcn.data import VOCSegmentation

    paired = Paired(VOCSegmentation(root), "depth", tmp_path / "depth", seg.max_pixels)
    for k, i in enumerate(ids):
        image, label, extra = paired[k]
        assert np.array_equal(label, gts[i]) and set(extra) == {"depth"}
        assert np.array_equal(extra["depth"], read_depth(depth[i])), i
    # without --depth, with --hha, or with a depth file missing: one line, nothing evaluated
    cases = (([], "nyud-fcn32s-color-d takes color images and depth: pass --depth DIR"),
             (["--hha", str(tmp_path / "depth")], "pass --depth DIR (and only it)"))
    for extra, message in cases:
        assert cli.main(["eval", str(ckpt), "--data", str(root), *extra]) == 1
        assert message in capsys.readouterr().err
    depth["img_5003"].unlink()
    assert cli.main(["eval", str(ckpt), "--data", str(root), "--depth", str(tmp_path / "depth")]) == 1
    assert f"its depth file must be {tmp_path / 'depth' / 'img_5003'}.<png|tif|...>, one file named as the " \
           "image; found none" in capsys.readouterr().err
