"""`fastfcn data synth OUT --arch ARCH`: the synthetic scenes on disk in the layout each net reads
(labels per head, depth / HHA folders, lossless HHA images), read back by the readers that
`fastfcn train` and `fastfcn eval` use; and nyud-fcn32s-hha fed the scenes' HHA images."""

import hashlib
import json

import numpy as np
import pytest

import fastfcn
from fastfcn import cli
from fastfcn.data import (
    SYNTHETIC_HEADS,
    Paired,
    SyntheticScenes,
    VOCSegmentation,
    heldout_scenes,
    scene_options,
    write_voc,
)
from fastfcn.errors import InputError

TINY = ["--width", "0.0625", "--batch", "2", "--dropout", "0", "--threads", "1", "--quiet"]
# Mean absolute difference per channel value between a scene and its JPEG (quality 95, 4:4:4):
# 3.2 on 24x24 scenes, where the scene against itself shifted by one pixel differs by 18.7-35.6
# (measured with VOCSegmentation on `fastfcn data synth --arch siftflow-fcn16s --size 24`).
JPEG_BOUND = 6.0

# The four layouts: SyntheticScenes' options, the second input's folder, images lossless or not.
LAYOUTS = {
    "siftflow-fcn16s": ({"heads": SYNTHETIC_HEADS}, None),
    "nyud-fcn32s-color-d": ({"second": "depth"}, "depth"),
    "nyud-fcn32s-color-hha": ({"second": "hha"}, "hha"),
    "nyud-fcn32s-hha": ({"image": "hha"}, None),
}


def _synth(capsys, out, *argv) -> str:
    assert cli.main(["data", "synth", str(out), *argv]) == 0
    return capsys.readouterr().err


def _tree_hashes(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_without_arch_the_files_are_as_before(tmp_path, capsys):
    """No --arch: the one-head colour layout (file names, lists, labels read back exactly, images
    within the JPEG bound); --arch of a one-head colour net (fcn8s, nyud-fcn32s-color) writes the
    same bytes. (Byte-identity with the writer before --arch existed was checked once by hand;
    a recorded hash would pin the installed Pillow's JPEG encoder, not this code.)"""
    argv = ["--n", "3", "--val-n", "2", "--size", "24", "--seed", "3"]
    plain = tmp_path / "plain"
    err = _synth(capsys, plain, *argv)
    assert err == f"wrote 3 train and 2 val scenes (24x24, 5 classes) to {plain}\n"
    ids = {"train": [f"train_{i:06d}" for i in range(3)], "val": [f"val_{i:06d}" for i in range(2)]}
    expected = {"class_names.txt"} | {f"ImageSets/Segmentation/{s}.txt" for s in ("train", "val", "trainval")}
    for split in ids.values():
        expected |= {f"JPEGImages/{i}.jpg" for i in split} | {f"SegmentationClass/{i}.png" for i in split}
    hashes = _tree_hashes(plain)
    assert set(hashes) == expected
    assert (plain / "ImageSets/Segmentation/trainval.txt").read_text().split() == ids["train"] + ids["val"]
    assert (plain / "class_names.txt").read_text().split() == list(SyntheticScenes(1, 24).class_names)
    for split, scenes in (("train", SyntheticScenes(3, 24, 3)), ("val", heldout_scenes(2, 24))):
        ds = VOCSegmentation(plain, split)
        assert ds.ids == ids[split]
        for i in range(len(scenes)):
            (img, lab), (want_img, want_lab) = ds[i], scenes[i]
            np.testing.assert_array_equal(lab, want_lab)
            assert np.abs(img.astype(float) - want_img).mean() < JPEG_BOUND
    for arch in ("fcn8s", "nyud-fcn32s-color"):
        _synth(capsys, tmp_path / arch, *argv, "--arch", arch)
        assert _tree_hashes(tmp_path / arch) == hashes


def test_refuses_to_write_over_a_real_data_set(tmp_path, capsys):
    # A VOC root of real images: its lists and classes must survive `data synth` pointed at it.
    argv = ["--n", "2", "--val-n", "1", "--size", "24"]
    root = tmp_path / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_000033\n2007_000042\n")
    before = _tree_hashes(root)
    assert cli.main(["data", "synth", str(root), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"fastfcn data: error: OUT {root}: {lists / 'val.txt'} lists images that data synth "
                   "did not write (2007_000033, ...); writing there would replace it: choose a new or empty "
                   "folder")  # fmt: skip
    assert _tree_hashes(root) == before
    # its own folder is written again
    _synth(capsys, tmp_path / "own", *argv)
    _synth(capsys, tmp_path / "own", *argv)


def _read_back(out, split: str, arch: str):
    """The folder's split as `fastfcn train` / `eval` open it for ``arch`` (given its --depth / --hha)."""
    options, second = LAYOUTS[arch]
    ds = VOCSegmentation(out, split, heads=options.get("heads"))
    return Paired(ds, second, out / second, None) if second else ds


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_each_layout_reads_back_as_the_scenes(tmp_path, capsys, arch):
    """Labels (per head), depth and HHA files read back bit-exact; images within the JPEG bound
    (which a one-pixel shift breaks), or bit-exact where they are HHA PNGs."""
    options, second = LAYOUTS[arch]
    out = tmp_path / "synth"
    err = _synth(capsys, out, "--arch", arch, "--n", "3", "--val-n", "2", "--size", "32", "--seed", "4",
                 "--num-classes", "4")  # fmt: skip
    if second:
        assert err.rstrip().endswith(f"; pass --{second} {out / second} to fastfcn train and eval")
    else:
        assert "pass --" not in err
    lossless = options.get("image") == "hha"
    assert sorted(p.suffix for p in (out / "JPEGImages").iterdir()) == [".png" if lossless else ".jpg"] * 5
    for split, want in (("train", SyntheticScenes(3, 32, 4, 4, **options)),
                        ("val", heldout_scenes(2, 32, 4, **options))):  # fmt: skip
        got = _read_back(out, split, arch)
        assert len(got) == len(want) and got.class_names == want.class_names
        for i in range(len(want)):
            a, b = got[i], want[i]
            assert len(a) == len(b) == (3 if second else 2)
            if options.get("heads"):
                assert list(a[1]) == list(b[1]) == list(SYNTHETIC_HEADS)
                for head in SYNTHETIC_HEADS:
                    np.testing.assert_array_equal(a[1][head], b[1][head])
            else:
                np.testing.assert_array_equal(a[1], b[1])
            if second:
                assert list(a[2]) == [second]
                # depth: float32 millimetres as read_second gives them, equal to the uint16 values
                np.testing.assert_array_equal(a[2][second], b[2][second].astype(a[2][second].dtype))
            if lossless:
                assert a[0].dtype == np.uint8
                np.testing.assert_array_equal(a[0], b[0])
                continue
            image, ref = a[0].astype(int), b[0].astype(int)
            assert np.abs(image - ref).mean() < JPEG_BOUND
            for axis in (0, 1):
                assert np.abs(np.roll(image, 1, axis) - ref).mean() > JPEG_BOUND
    if options.get("heads"):
        assert (out / "class_names.txt").read_text().split() == [*want.class_names]
        assert not list((out / "SegmentationClass").glob("*.png"))  # only the head folders


def test_arch_errors(tmp_path, capsys):
    """An unknown arch is refused before anything is written, listing the nets the scenes serve;
    so are inputs or heads the scenes cannot make (scene_options)."""
    out = tmp_path / "x"
    assert cli.main(["data", "synth", str(out), "--arch", "fcn9s"]) == 1
    err = capsys.readouterr().err
    assert "--arch fcn9s: unknown architecture; expected one of fcn32s, fcn16s, fcn8s" in err
    assert "siftflow-fcn16s" in err and "nyud-fcn32s-hha, nyud-fcn32s-color-d, nyud-fcn32s-color-hha" in err
    assert not out.exists()
    from fastfcn.cli.data import synthetic_archs

    served, refused = synthetic_archs()
    assert refused == {} and served["nyud-fcn32s-hha"] == {"heads": None, "second": None, "image": "hha"}
    assert served["nyud-fcn32s-color-d"] == {"heads": None, "second": "depth", "image": "color"}
    with pytest.raises(InputError, match="make an image of color or hha, other than the second input; got "
                                         "image 'depth'"):  # fmt: skip
        scene_options(("depth",))
    with pytest.raises(InputError, match="got image 'hha' with second 'hha'"):
        scene_options(("hha", "hha"))
    with pytest.raises(InputError, match=r"got heads \('semantic', 'parts'\)"):
        scene_options(("color",), ("semantic", "parts"))
    with pytest.raises(InputError, match="one or two inputs; got color, depth, hha"):
        scene_options(("color", "depth", "hha"))


def test_reader_takes_png_images_where_there_is_no_jpeg(tmp_path):
    """JPEGImages/<id>.png is read where <id>.jpg is absent (the .jpg first where both are); with
    neither, the message names both."""
    ds = SyntheticScenes(2, 24, 1, 3, image="hha")
    write_voc(ds, tmp_path, "val")
    voc = VOCSegmentation(tmp_path, "val")
    assert [p.name for p in voc.images] == ["val_000000.png", "val_000001.png"]
    np.testing.assert_array_equal(voc[1][0], ds[1][0])
    write_voc(SyntheticScenes(1, 24, 1, 3), tmp_path, "val")  # val_000000.jpg beside the .png
    assert [p.name for p in VOCSegmentation(tmp_path, "val").images] == ["val_000000.jpg"]
    (tmp_path / "JPEGImages" / "val_000000.png").unlink()
    (tmp_path / "JPEGImages" / "val_000000.jpg").unlink()
    missing = r"JPEGImages/val_000000.jpg \(or val_000000.png; listed in .*val.txt\) is missing"
    with pytest.raises(InputError, match=missing):
        VOCSegmentation(tmp_path, "val")


def test_hha_net_scenes_give_the_hha_encoding_as_the_image():
    """SyntheticScenes(image="hha"): the image is the HHA image that second="hha" gives, the label
    the colour scene's; the colour scene differs from it."""
    hha_net = SyntheticScenes(4, (24, 40), 2, 4, image="hha")
    fusion = SyntheticScenes(4, (24, 40), 2, 4, second="hha")
    plain = SyntheticScenes(4, (24, 40), 2, 4)
    for i in range(4):
        image, label = hha_net[i]
        np.testing.assert_array_equal(image, fusion[i][2]["hha"])
        np.testing.assert_array_equal(label, plain[i][1])
        assert not np.array_equal(image, plain[i][0])
    sift = SyntheticScenes(2, 24, 2, 4, heads=SYNTHETIC_HEADS, image="hha")[1]
    np.testing.assert_array_equal(sift[0], SyntheticScenes(2, 24, 2, 4, second="hha")[1][2]["hha"])


def _train(out, *argv):
    assert cli.main(["train", "--out", str(out), *TINY, *argv]) == 0
    return json.loads((out / "history.json").read_text())


def _eval(capsys, *argv):
    capsys.readouterr()
    argv = ["eval", *argv, "--backend", "torch", "--device", "cpu", "--precision", "fp32", "--json"]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("arch", ["siftflow-fcn16s", "nyud-fcn32s-color-d"])
def test_train_and_eval_from_the_written_folder(tmp_path, capsys, arch):
    """`fastfcn train --data OUT [--depth OUT/depth]` trains on the written folder (validating on
    its val split) and `fastfcn eval CKPT --data OUT [...]` scores it: the same numbers as the
    run's last validation on the same images and model."""
    options, second = LAYOUTS[arch]
    data = tmp_path / "synth"
    _synth(capsys, data, "--arch", arch, "--n", "4", "--val-n", "2", "--size", "32", "--num-classes", "4")
    extra = [f"--{second}", str(data / second)] if second else []
    hist = _train(tmp_path / "run", "--data", str(data), "--arch", arch, "--iters", "2", "--val-every", "2",
                  "--save-every", "2", "--val-n", "2", *extra)  # fmt: skip
    err = capsys.readouterr().err
    assert "(4 images, " in err and all(np.isfinite(v) for _, v in hist["loss"])
    ckpt = tmp_path / "run" / "final.safetensors"
    scored = _eval(capsys, str(ckpt), "--data", str(data), *extra)
    assert scored["images"] == 2 and scored["split"] == "val"
    if options.get("heads"):
        assert fastfcn.load(ckpt).config["num_classes"] == 7  # 4 semantic + 3 geometric, class_names.txt
        for head in SYNTHETIC_HEADS:
            got = scored["heads"][head]["mean_iu"]
            assert got == pytest.approx(hist["heads"][head]["val_mean_iu"][-1][1], abs=1e-9)
        return
    assert scored[second] == str(data / second)
    assert scored["mean_iu"] == pytest.approx(hist["val_mean_iu"][-1][1], abs=1e-9)


def test_hha_net_trains_and_evaluates_on_hha_images(tmp_path, capsys, monkeypatch):
    """nyud-fcn32s-hha with --data synthetic: training draws the scenes' HHA images (the data sets
    the run opens), and `eval --data synthetic` scores the held-out scenes' HHA images; from a
    folder that `data synth --arch nyud-fcn32s-hha` wrote, eval reads the same HHA images,
    bit-exact, and gives the same numbers."""
    import fastfcn.cli.evaluate as cli_eval
    from fastfcn.cli.train import check_args
    from fastfcn.evaluate import evaluate
    from fastfcn.training import loop

    argv = ["train", "--out", str(tmp_path / "run"), *TINY, "--arch", "nyud-fcn32s-hha", "--num-classes", "4",
            "--size", "32", "--iters", "1", "--val-every", "1", "--val-n", "2", "--seed", "5", "--lr", "1e-3"]
    args = cli.build_parser("train").parse_args(argv)
    check_args(args)
    run = loop.setup(args)
    np.testing.assert_array_equal(run.ds[3][0], SyntheticScenes(4, 32, 5, 4, second="hha")[3][2]["hha"])
    np.testing.assert_array_equal(run.val[1][0],
                                  SyntheticScenes(2, 32, 5 + loop.VAL_SEED_OFFSET, 4, image="hha")[1][0])
    assert cli.main(argv) == 0
    ckpt = str(tmp_path / "run" / "final.safetensors")
    scored_sets = []  # the data set each `fastfcn eval` scores
    monkeypatch.setattr(cli_eval, "evaluate", lambda seg, ds, *a, **k: (scored_sets.append(ds),
                                                                        evaluate(seg, ds, *a, **k))[1])
    scored = _eval(capsys, ckpt, "--data", "synthetic", "--n", "3", "--size", "32")
    held = heldout_scenes(3, 32, 4, image="hha")
    data = tmp_path / "synth"
    _synth(capsys, data, "--arch", "nyud-fcn32s-hha", "--n", "0", "--val-n", "3", "--size", "32",
           "--num-classes", "4")
    from_disk = _eval(capsys, ckpt, "--data", str(data))
    assert len(scored_sets) == 2 and scored["images"] == from_disk["images"] == 3
    for ds in scored_sets:
        for i in range(3):
            for got, want in zip(ds[i], held[i]):
                np.testing.assert_array_equal(got, want)
    seg = fastfcn.Segmenter(ckpt, backend="torch", device="cpu", precision="fp32")
    assert scored["mean_iu"] == pytest.approx(evaluate(seg, held, 4)[0]["mean_iu"], abs=1e-12)
    assert from_disk["confusion_matrix"] == scored["confusion_matrix"]
