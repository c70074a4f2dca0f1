"""The VOC reader on generated trees (good, missing and corrupt files) and the scene generator."""

import numpy as np
import pytest
from PIL import Image

from fastfcn import cli
from fastfcn.config import NYUD_CLASSES
from fastfcn.data import (
    DEPTH_RANGE_MM,
    HELDOUT_SEED,
    SHAPES,
    SceneLayout,
    SyntheticScenes,
    VOCSegmentation,
    heldout_scenes,
    voc_palette,
    write_voc,
)
from fastfcn.errors import InputError
from fastfcn.metrics import confusion_matrix, scores


def test_voc_palette_known_entries():
    pal = voc_palette()
    assert pal.shape == (256, 3)
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]  # person
    assert pal[255].tolist() == [224, 224, 192]  # void


def test_synthetic_deterministic_and_seeds_differ():
    a, b = SyntheticScenes(4, 48, seed=3, num_classes=4), SyntheticScenes(4, 48, seed=3, num_classes=4)
    for i in (2, 0, 3):  # any order: scene i depends only on (seed, i)
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
    c = SyntheticScenes(4, 48, seed=4, num_classes=4)
    assert not np.array_equal(a[0][0], c[0][0])
    image, label = a[1]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert label.shape == (48, 48) and label.dtype == np.uint8 and label.max() < 4


def test_synthetic_covers_classes_and_needs_more_than_colour():
    ds = SyntheticScenes(60, 64, seed=0, num_classes=6)
    counts = np.zeros(6, np.int64)
    # A per-pixel colour classifier (majority class per RGB bin), fitted on these scenes...
    bins = lambda im: ((im // 32).astype(np.int64) * [64, 8, 1]).sum(-1)  # noqa: E731
    table = np.zeros((512, 6))
    for i in range(len(ds)):
        image, label = ds[i]
        counts += np.bincount(label.ravel(), minlength=6)
        np.add.at(table, (bins(image).ravel(), label.ravel()), 1)
    assert (counts[1:] > 0.02 * counts.sum()).all(), counts  # every object class appears
    assert 0.4 < counts[0] / counts.sum() < 0.95  # background neither vanishes nor dominates
    # ...does poorly on other scenes: colour alone does not decide a pixel.
    test = SyntheticScenes(20, 64, seed=1, num_classes=6)
    cm = sum(confusion_matrix(lb, table.argmax(1)[bins(im)], 6) for im, lb in (test[i] for i in range(20)))
    assert scores(cm)["mean_iu"] < 0.6
    # Objects reach the border in some scenes (partial crops).
    edge = [ds[i][1] for i in range(20)]
    assert any((lb[0] > 0).any() or (lb[:, -1] > 0).any() for lb in edge)


def test_synthetic_bad_arguments():
    with pytest.raises(InputError, match="num_classes"):
        SyntheticScenes(1, 32, 0, len(SHAPES) + 2)
    with pytest.raises(InputError, match="8x8"):
        SyntheticScenes(1, 4, 0, 3)
    # refused before its pixel grids are made (16 bytes a pixel: --size 96000 would take 147 GB)
    with pytest.raises(InputError, match="scene size 8x2097153 is over 16777216 pixels"):
        SyntheticScenes(1, (8, 4096 * 512 + 1), 0, 3)
    with pytest.raises(IndexError):
        SyntheticScenes(2, 32, 0, 3)[2]
    assert heldout_scenes(3, 32, 3).seed == HELDOUT_SEED


SIFT = ("semantic", "geometric")


def test_synthetic_maps_of_two_headed_and_two_input_nets(tmp_path):
    """SIFT Flow's geometric labels, depth maps and HHA images of the scenes: the same for the same
    (seed, i, size, num_classes) in any order, another seed another draw; shapes, dtypes and ranges;
    the one-head scene's image and label kept (the sky replaces only the background above the far
    edge); and each map follows the one geometry: objects vertical and nearer than all they
    cover, the ground horizontal at height 0 and receding upward, the HHA channels those of the
    depth map (Gupta et al.'s encoding)."""
    size, n = (40, 56), 12
    plain = SyntheticScenes(n, size, seed=5, num_classes=4)
    kinds = {"sift": {"heads": SIFT}, "depth": {"second": "depth"}, "hha": {"second": "hha"}}
    made = {k: SyntheticScenes(n, size, seed=5, num_classes=4, **kw) for k, kw in kinds.items()}
    again = {k: SyntheticScenes(n, size, seed=5, num_classes=4, **kw) for k, kw in kinds.items()}
    assert made["sift"].num_classes == 7
    assert made["sift"].class_names == ("background", *SHAPES[:3], "sky", "horizontal", "vertical")
    assert made["depth"].num_classes == 4 and made["depth"].class_names == plain.class_names
    seen = set()
    for i in (3, 0, 11, 7, 1, 5):  # any order
        image, label = plain[i]
        sky_image, heads = made["sift"][i]
        d_image, d_label, d = made["depth"][i]
        h_image, h_label, h = made["hha"][i]
        layout = SceneLayout(size, 5, i)
        for k in made:  # deterministic
            for x, y in zip(made[k][i], again[k][i]):
                for a, b in (zip(x.values(), y.values()) if isinstance(x, dict) else [(x, y)]):
                    np.testing.assert_array_equal(a, b)
        for x in (d_image, h_image):
            np.testing.assert_array_equal(x, image)
        for x in (heads["semantic"], d_label, h_label):
            np.testing.assert_array_equal(x, label)
        sky = layout.sky_rows
        np.testing.assert_array_equal(sky_image[sky:], image[sky:])
        assert not np.array_equal(sky_image[:sky], image[:sky]) and 0.3 * 40 <= sky <= 0.6 * 40 + 1
        geo, depth, hha = heads["geometric"], d["depth"], h["hha"]
        assert list(d) == ["depth"] and list(h) == ["hha"]
        assert geo.shape == size and geo.dtype == np.uint8 and set(np.unique(geo)) <= {0, 1, 2}
        assert depth.shape == size and depth.dtype == np.uint16
        assert DEPTH_RANGE_MM[0] <= depth.min() and depth.max() <= DEPTH_RANGE_MM[1]
        assert hha.shape == (*size, 3) and hha.dtype == np.uint8
        seen |= set(np.unique(geo).tolist())
        # geometric: vertical exactly on the objects, sky above the far edge, horizontal below
        rows = np.arange(40)[:, None] * np.ones(size, int)
        np.testing.assert_array_equal(geo == 2, label > 0)
        np.testing.assert_array_equal(geo == 0, (label == 0) & (rows < sky))
        # depth: the ground recedes upward to the far plane; objects are nearer than the ground
        ground = np.where(rows >= sky, 1000 * layout.focal * layout.camera_m / np.maximum(
            rows - layout.horizon, 1e-9), 1000 * layout.far_m)  # fmt: skip
        bg = label == 0
        np.testing.assert_allclose(depth[bg], np.clip(ground[bg], *DEPTH_RANGE_MM), atol=0.5)
        assert (depth[~bg] < np.clip(ground[~bg], *DEPTH_RANGE_MM)).all()
        assert (np.diff(np.clip(ground, *DEPTH_RANGE_MM)[:, 0]) <= 0).all()
        # HHA: disparity, height above the ground, angle + 38, from this depth map
        disparity = np.clip(np.floor(31000 / np.maximum(depth / 10, 100) + 0.5), 0, 255)
        np.testing.assert_array_equal(hha[..., 0], disparity)
        np.testing.assert_array_equal(hha[..., 2], np.where(geo == 1, 38, 128))
        assert hha[..., 1][geo == 1].max() <= 1  # the ground: 0 cm (depth rounded to the mm)
        assert (hha[..., 1][geo == 2] > 0).all()  # objects stand above it
    assert seen == {0, 1, 2}
    other = SyntheticScenes(n, size, seed=6, num_classes=4, second="depth")
    assert not np.array_equal(other[0][2]["depth"], made["depth"][0][2]["depth"])
    assert not np.array_equal(SyntheticScenes(n, size, seed=6, num_classes=4, heads=SIFT)[0][1]["geometric"],
                              made["sift"][0][1]["geometric"])  # fmt: skip
    both = SyntheticScenes(n, size, seed=5, num_classes=4, heads=SIFT, second="hha")[4]
    np.testing.assert_array_equal(both[0], made["sift"][4][0])
    np.testing.assert_array_equal(both[2]["hha"], made["hha"][4][2]["hha"])
    with pytest.raises(InputError, match=r"geometric \(SIFT Flow's\) or one; got heads \('a',\)"):
        SyntheticScenes(1, 32, 0, 3, heads=("a",))
    with pytest.raises(InputError, match="a second input of depth or hha; got 'rgb'"):
        SyntheticScenes(1, 32, 0, 3, second="rgb")


@pytest.fixture
def voc_tree(tmp_path):
    ds = SyntheticScenes(5, (40, 56), seed=1, num_classes=4)
    ids = write_voc(ds, tmp_path / "VOC2012", "val")
    return tmp_path / "VOC2012", ds, ids


def test_voc_reader_round_trip(voc_tree):
    root, ds, ids = voc_tree
    voc = VOCSegmentation(root, "val")
    assert len(voc) == 5 and voc.ids == ids
    assert voc.num_classes == 4 and voc.class_names[0] == "background"
    for i in range(5):
        image, label = voc[i]
        want_image, want_label = ds[i]
        np.testing.assert_array_equal(label, want_label)  # palette PNG: exact
        assert image.shape == (40, 56, 3)
        assert np.abs(image.astype(int) - want_image).mean() < 12  # JPEG: close
    with Image.open(voc.labels[0]) as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]
    # The devkit folder above the VOC root is accepted as well.
    assert len(VOCSegmentation(root.parent, "val")) == 5


def test_voc_reader_class_names_with_spaces_round_trip(voc_tree):
    # NYUDv2's classes include "floor mat", "shower curtain" and "night stand": one per line.
    root, ds, _ = voc_tree
    ds.class_names = NYUD_CLASSES
    write_voc(ds, root, "val")
    voc = VOCSegmentation(root, "val")
    assert voc.class_names == NYUD_CLASSES and voc.num_classes == 40
    (root / "class_names.txt").write_text("background disc box triangle\n")  # one line: white space
    assert VOCSegmentation(root, "val").class_names == ("background", "disc", "box", "triangle")
    (root / "class_names.txt").write_text("\n \n")  # a net of 0 classes would be refused later, unnamed
    with pytest.raises(InputError) as e:
        VOCSegmentation(root, "val")
    names = root / "class_names.txt"
    assert str(e.value) == f"class list {names} is empty; expected the data set's class names, one a line"


def test_voc_reader_lists_with_byte_order_mark_and_crlf(voc_tree):
    # As Windows editors save them: a UTF-8 byte-order mark, CRLF line ends, a blank line.
    root, _, ids = voc_tree
    (root / "ImageSets" / "Segmentation" / "val.txt").write_bytes(
        "\ufeff".encode() + f"{ids[1]}\r\n{ids[0]}\r\n\r\n".encode())
    (root / "class_names.txt").write_bytes("\ufeff".encode() + b"background\r\ndisc\r\nbox\r\ntriangle\r\n")
    voc = VOCSegmentation(root, "val")
    assert voc.ids == [ids[1], ids[0]] and voc.class_names == ("background", "disc", "box", "triangle")
    # PowerShell's `>` writes UTF-16: named, not a bare UnicodeDecodeError
    for path in (root / "class_names.txt", root / "ImageSets" / "Segmentation" / "val.txt"):
        path.write_bytes(f"{ids[0]}\r\n".encode("utf-16"))
        with pytest.raises(InputError) as e:
            VOCSegmentation(root, "val")
        assert str(e.value).startswith(f"{'split' if path.name == 'val.txt' else 'class'} list {path} is not "
                                       "UTF-8 text (invalid start byte at byte 0); save it as UTF-8")


def test_voc_reader_ids_with_dots(voc_tree):
    # A bare id keeps its dots: "cam1.000" is cam1.000.jpg, never cam1.jpg (which exists here too).
    root, ds, ids = voc_tree
    for i, name in ((0, "cam1.000"), (1, "cam1")):
        (root / "JPEGImages" / f"{ids[i]}.jpg").rename(root / "JPEGImages" / f"{name}.jpg")
        (root / "SegmentationClass" / f"{ids[i]}.png").rename(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("cam1.000\ncam1\n/JPEGImages/cam1.jpg\n")
    voc = VOCSegmentation(root, "val")
    assert voc.ids == ["cam1.000", "cam1", "cam1"]
    np.testing.assert_array_equal(voc[0][1], ds[0][1])
    np.testing.assert_array_equal(voc[1][1], ds[1][1])


def test_voc_reader_void_label(voc_tree):
    root, _, ids = voc_tree
    p = root / "SegmentationClass" / f"{ids[0]}.png"
    with Image.open(p) as im:
        a = np.array(im)
        pal = im.getpalette()
    a[:3] = 255
    out = Image.fromarray(a, mode="P")
    out.putpalette(pal)
    out.save(p)
    assert (VOCSegmentation(root, "val")[0][1][:3] == 255).all()


def test_evaluate_names_the_label_file_with_an_id_outside_the_classes(voc_tree):
    from fastfcn.evaluate import evaluate

    class Background:  # a model that predicts class 0 everywhere
        def run(self, images, output="labels"):
            return np.zeros(images.shape[:3], np.uint8)

    root, _, ids = voc_tree
    p = root / "SegmentationClass" / f"{ids[3]}.png"
    with Image.open(p) as im:
        a, pal = np.array(im), im.getpalette()
    a[5, 7] = 30  # not a class of 4, and not void
    out = Image.fromarray(a, mode="P")
    out.putpalette(pal)
    out.save(p)
    voc = VOCSegmentation(root, "val")
    with pytest.raises(InputError) as e:
        evaluate(Background(), voc, 4, batch=2)  # the bad label is the second of the second batch
    assert str(e.value) == f"labels hold 30, outside 0..3 (and not the ignore label 255) in {p} (item 3)"
    with pytest.raises(InputError) as e:
        evaluate(Background(), [voc[i] for i in range(5)], 4, batch=2)  # no files: the item
    assert str(e.value).endswith("(and not the ignore label 255) in item 3")


def test_evaluate_names_the_image_a_model_refuses(voc_tree):
    import fastfcn
    from fastfcn.evaluate import evaluate

    root, _, ids = voc_tree
    model = fastfcn.models.build("fcn32s", num_classes=4, width=0.0625)
    seg = fastfcn.Segmenter(model, backend="torch", device="cpu", max_pixels=40 * 56 - 1)  # one pixel short
    with pytest.raises(InputError) as e:
        evaluate(seg, VOCSegmentation(root, "val"), 4, batch=2)
    assert str(e.value).endswith(f"(in {root / 'JPEGImages' / ids[0]}.jpg (item 0) and the 1 after it)")
    assert "exceeds max_pixels=2239" in str(e.value)


def test_voc_reader_missing_files(voc_tree):
    root, _, ids = voc_tree
    with pytest.raises(InputError, match=r"train\.txt is missing.*val"):
        VOCSegmentation(root, "train")
    (root / "JPEGImages" / f"{ids[2]}.jpg").unlink()
    with pytest.raises(InputError, match=f"{ids[2]}.jpg"):
        VOCSegmentation(root, "val")


def test_voc_reader_missing_label(voc_tree):
    root, _, ids = voc_tree
    (root / "SegmentationClass" / f"{ids[1]}.png").unlink()
    with pytest.raises(InputError, match=f"{ids[1]}.png"):
        VOCSegmentation(root, "val")


def test_voc_reader_corrupt_files(voc_tree):
    root, _, ids = voc_tree
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    voc = VOCSegmentation(root, "val")  # opening checks presence only; reading finds the damage
    voc[0]
    with pytest.raises(InputError, match=f"{ids[3]}.jpg: not a readable image"):
        voc[3]
    lab = root / "SegmentationClass" / f"{ids[4]}.png"
    lab.write_bytes(lab.read_bytes()[:40])  # truncated PNG
    with pytest.raises(InputError, match=f"{ids[4]}.png.*corrupt"):
        voc[4]


def test_voc_reader_rejects_rgb_labels_and_size_mismatch(voc_tree):
    root, _, ids = voc_tree
    Image.new("RGB", (56, 40)).save(root / "SegmentationClass" / f"{ids[0]}.png")
    Image.new("L", (10, 10)).save(root / "SegmentationClass" / f"{ids[1]}.png")
    voc = VOCSegmentation(root, "val")
    with pytest.raises(InputError, match="mode RGB"):
        voc[0]
    with pytest.raises(InputError, match="must match"):
        voc[1]


def test_voc_reader_sbd_augmented_list(voc_tree):
    root, _, ids = voc_tree
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    Image.new("RGB", (30, 20), (9, 9, 9)).save(root / "JPEGImages" / "2008_000001.jpg")
    Image.fromarray(np.full((20, 30), 3, np.uint8), mode="L").save(aug / "2008_000001.png")
    # DeepLab-style list: "image label" paths on each line.
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in [ids[0], "2008_000001"]]
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    voc = VOCSegmentation(root, "train_aug")
    assert len(voc) == 2 and voc.labels[1].parent.name == "SegmentationClassAug"
    assert (voc[1][1] == 3).all()


def test_not_a_voc_root(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        VOCSegmentation(tmp_path / "nope", "val")
    with pytest.raises(InputError, match="does not look like a VOC root"):
        VOCSegmentation(tmp_path, "val")


def test_data_synth_command_writes_voc_layout(tmp_path):
    out = tmp_path / "synth"
    args = ["--n", "4", "--val-n", "2", "--size", "40", "--num-classes", "3"]
    rc = cli.main(["data", "synth", str(out), *args])
    assert rc == 0
    train, val = VOCSegmentation(out, "train"), VOCSegmentation(out, "val")
    assert len(train) == 4 and len(val) == 2 and len(VOCSegmentation(out, "trainval")) == 6
    np.testing.assert_array_equal(val[1][1], heldout_scenes(2, 40, 3)[1][1])
    assert cli.main(["data", "synth", str(out), "--n", "1", "--seed", str(HELDOUT_SEED)]) == 1
