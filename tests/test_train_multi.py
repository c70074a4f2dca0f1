"""Training the two-headed (SIFT Flow) and two-input (NYUDv2 fusion) nets: the per-head loss against
F.cross_entropy on each head's slice, per-head validation against `fastfcn eval`, resume, stages,
the second input fed exactly as inference feeds it and augmented with the image and labels, and
the refusals. Tiny nets (width 1/16) on small VOC-layout folders written here."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastfcn
from fastfcn import cli
from fastfcn.errors import InputError
from fastfcn.training import plot_curves, segmentation_loss, tile
from fastfcn.training.augment import open_dataset

TINY = ["--width", "0.0625", "--batch", "2", "--dropout", "0", "--threads", "1", "--quiet", "--val-n", "4"]
SIFT_NAMES = ["s0", "s1", "s2", "s3", "sky", "horizontal", "vertical"]  # 4 semantic + 3 geometric
NYUD_NAMES = ["c0", "c1", "c2", "c3", "c4"]
H, W = 24, 28  # labels constant on 4x4 blocks, so halving keeps every block whole


def geometric(lab: np.ndarray) -> np.ndarray:
    return ((lab.astype(int) * 2 + 1) % 3).astype(np.uint8)


def depth_of(lab: np.ndarray) -> np.ndarray:
    """Millimetres that encode the label: 1000 * (id + 1)."""
    return (1000 * (lab.astype(np.uint16) + 1)).astype(np.uint16)


def write_voc(root, n_train=6, n_val=2, *, heads=False, second=None, names=None, seed=0, block=4):
    """A VOC-layout folder of random block label maps (ids 0..3) with images coloured by label;
    ``heads``: SIFT Flow's per-head folders (geometric = f(semantic)); ``second``: "depth" or "hha",
    written to ``root.parent / second``. Returns that folder (or None)."""
    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    folder = root.parent / second if second else None
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{k}" for k in range(n)]
        for i in ids:
            cells = rng.integers(0, 4, (-(-H // block), -(-W // block)))
            lab = np.kron(cells, np.ones((block, block), int))[:H, :W].astype(np.uint8)
            ids_ = lab.astype(int)
            img = np.stack([ids_ * 60, 255 - ids_ * 60, (ids_ * 97) % 256], -1).astype(np.uint8)
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=100, subsampling=0)
            maps = {"semantic": lab, "geometric": geometric(lab)} if heads else {"": lab}
            for head, m in maps.items():
                (root / "SegmentationClass" / head).mkdir(parents=True, exist_ok=True)
                Image.fromarray(m).save(root / "SegmentationClass" / head / f"{i}.png")
            if second:
                folder.mkdir(exist_ok=True)
                extra = (
                    depth_of(lab) if second == "depth" else rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                )
                Image.fromarray(extra).save(folder / f"{i}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    if names:
        (root / "class_names.txt").write_text("\n".join(names) + "\n")
    return folder


def _train(out, *argv):
    rc = cli.main(["train", "--out", str(out), *TINY, *argv])
    assert rc == 0
    return json.loads((out / "history.json").read_text())


def _same_weights(a, b):
    a, b = fastfcn.load(a).state_dict(), fastfcn.load(b).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _eval_json(capsys, argv):
    assert (
        cli.main(["eval", *argv, "--backend", "torch", "--device", "cpu", "--precision", "fp32", "--json"])
        == 0
    )
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------ the loss


def test_each_heads_loss_is_cross_entropy_over_its_own_slice():
    torch.manual_seed(0)
    heads = (("semantic", 4), ("geometric", 3))
    logits = torch.randn(2, 7, 5, 6, requires_grad=True)
    labels = torch.stack([torch.randint(0, 4, (2, 5, 6)), torch.randint(0, 3, (2, 5, 6))], 1)
    labels[0, 0, :2] = 255
    labels[1, 1, :, :3] = 255
    for reduction in ("mean", "sum"):
        total, parts = segmentation_loss(logits, labels, heads, reduction)
        sem = F.cross_entropy(logits[:, :4], labels[:, 0], ignore_index=255, reduction=reduction)
        geo = F.cross_entropy(logits[:, 4:], labels[:, 1], ignore_index=255, reduction=reduction)
        assert torch.equal(parts["semantic"], sem) and torch.equal(parts["geometric"], geo)
        assert torch.equal(total, sem + geo)
    # a softmax over all 7 channels is another loss: the slice is what makes each head's own
    whole = F.cross_entropy(logits, labels[:, 1] + torch.where(labels[:, 1] == 255, 0, 4), ignore_index=255)
    assert not torch.isclose(whole, parts["geometric"])
    # the geometric labels move only the geometric channels
    total.backward()
    g = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits[:, :4], labels[:, 0], ignore_index=255, reduction="sum").backward()
    assert torch.equal(g[:, :4], logits.grad[:, :4]) and not logits.grad[:, 4:].any()
    # one head: the plain loss
    one, parts = segmentation_loss(logits[:, :4], labels[:, 0])
    assert torch.equal(one, F.cross_entropy(logits[:, :4], labels[:, 0], ignore_index=255))
    assert list(parts) == [None]


def test_a_head_with_no_labelled_pixel_adds_nothing_not_nan():
    """A batch whose geometric map is all 255 (unlabelled): that head adds 0 and no gradient (the
    reference's unnormalised sum gives 0 too), where the mean would be 0 / 0 = NaN; one head alike."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 36, 5, 6, generator=g, requires_grad=True)
    sem = torch.randint(0, 33, (2, 5, 6), generator=g)
    labels = torch.stack([sem, torch.full_like(sem, 255)], 1)
    total, parts = segmentation_loss(logits, labels, (("semantic", 33), ("geometric", 3)))
    want = F.cross_entropy(logits[:, :33], sem, ignore_index=255)
    assert torch.equal(parts["geometric"], torch.zeros(())) and torch.equal(total, want)
    total.backward()
    assert torch.equal(logits.grad[:, 33:], torch.zeros(2, 3, 5, 6)) and logits.grad[:, :33].abs().sum() > 0
    loss, _ = segmentation_loss(logits, torch.full_like(sem, 255))
    assert loss.item() == 0.0


def test_label_ids_beyond_a_heads_classes_are_refused():
    labels = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    labels[0, 1, 1, 1] = 3  # geometric has 3 classes: 0..2
    with pytest.raises(
        InputError, match=r"class ids \[3\] but head 'geometric' has 3 classes: expected ids 0\.\.2"
    ):
        segmentation_loss(torch.zeros(1, 7, 3, 3), labels, (("semantic", 4), ("geometric", 3)))
    with pytest.raises(InputError, match=r"do not fit the heads"):
        segmentation_loss(torch.zeros(1, 6, 3, 3), labels, (("semantic", 4), ("geometric", 3)))


# ------------------------------------------------------------------------------ two heads


def test_siftflow_trains_validates_per_head_and_resumes(tmp_path, capsys):
    root = tmp_path / "sift"
    write_voc(root, heads=True, names=SIFT_NAMES)
    common = ["--data", str(root), "--arch", "siftflow-fcn16s", "--val-every", "2", "--save-every", "2",
              "--scale-min", "0.75"]  # fmt: skip
    hist = _train(tmp_path / "a", *common, "--iters", "4")
    err = capsys.readouterr().err
    assert "(6 images, 7 classes: semantic 4, geometric 3)" in err
    assert "val mean IU semantic " in err and " geometric " in err
    heads = hist["heads"]
    assert list(heads) == ["semantic", "geometric"] and hist["val_mean_iu"] == []
    # the loss is the heads' sum, step by step; the score layers start at zero, so the first
    # step's logits are 0 and each head's mean cross-entropy is log(its classes)
    for (s, total), (s1, sem), (s2, geo) in zip(
        hist["loss"], heads["semantic"]["loss"], heads["geometric"]["loss"]
    ):
        assert s == s1 == s2 and total == pytest.approx(sem + geo, rel=1e-6)
    assert heads["semantic"]["loss"][0][1] == pytest.approx(np.log(4), rel=1e-6)
    assert heads["geometric"]["loss"][0][1] == pytest.approx(np.log(3), rel=1e-6)
    assert (
        [s for s, _ in heads["semantic"]["val_mean_iu"]]
        == [2, 4]
        == [s for s, _ in heads["geometric"]["val_mean_iu"]]
    )
    final = tmp_path / "a" / "final.safetensors"
    model = fastfcn.load(final)
    assert model.config["arch"] == "siftflow-fcn16s" and model.config["num_classes"] == 7
    assert model.config["class_names"] == SIFT_NAMES
    assert (tmp_path / "a" / "curves.png").is_file()
    # the last validation is what `fastfcn eval` measures on the same split, per head
    got = _eval_json(capsys, [str(final), "--data", str(root)])
    for name in ("semantic", "geometric"):
        assert got["heads"][name]["mean_iu"] == pytest.approx(heads[name]["val_mean_iu"][-1][1], abs=1e-12)
    # stopped after 2 and resumed: the same run
    _train(tmp_path / "b", *common, "--iters", "2")
    resumed = _train(tmp_path / "b", *common, "--iters", "4", "--resume")
    assert resumed == hist
    _same_weights(final, tmp_path / "b" / "final.safetensors")


def test_siftflow_loss_falls_on_both_heads(tmp_path):
    root = tmp_path / "sift"
    write_voc(root, n_train=8, heads=True, names=SIFT_NAMES, block=12)
    hist = _train(tmp_path / "run", "--data", str(root), "--arch", "siftflow-fcn8s", "--iters", "30",
                  "--val-every", "0")  # fmt: skip
    for name, classes in (("semantic", 4), ("geometric", 3)):
        loss = [v for _, v in hist["heads"][name]["loss"]]
        assert loss[0] == pytest.approx(np.log(classes), rel=1e-6)  # zero score layers: uniform
        assert np.mean(loss[-8:]) < 0.9 * np.log(classes), (name, loss)


def test_siftflow_stages_and_refusals(tmp_path, capsys):
    root = tmp_path / "sift"
    write_voc(root, n_train=2, n_val=1, heads=True, names=SIFT_NAMES)
    _train(
        tmp_path / "s",
        "--data",
        str(root),
        "--stages",
        "siftflow-fcn32s:1,siftflow-fcn16s:1",
        "--val-every",
        "0",
    )
    assert "siftflow-fcn16s initialised from the previous stage" in capsys.readouterr().err
    assert fastfcn.load(tmp_path / "s" / "final.safetensors").config["arch"] == "siftflow-fcn16s"
    cases = [
        (["--data", str(root), "--stages", "siftflow-fcn32s:1,fcn16s:1"],
         "every stage's net must have the same heads and inputs"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main(["train", "--out", str(tmp_path / "x"), *TINY, "--iters", "1", *argv]) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(InputError, match=r"synthetic scenes have the heads semantic, geometric"):
        open_dataset("synthetic", "", n=2, size=16, seed=0, num_classes=3, heads=("semantic",))
    # class names that leave the semantic head 1 class for ids 0..3; too few for both heads
    argv = ["train", "--out", str(tmp_path / "x"), *TINY, "--iters", "1", "--data", str(root),
            "--arch", "siftflow-fcn32s", "--val-every", "0"]  # fmt: skip
    (root / "class_names.txt").write_text("s0\nsky\nhorizontal\nvertical\n")
    assert cli.main(argv) == 1
    assert "but head 'semantic' has 1 classes: expected ids 0..0 and 255" in capsys.readouterr().err
    (root / "class_names.txt").write_text("a\nb\nc\n")
    assert cli.main(argv) == 1
    assert "its geometric head alone takes 3" in capsys.readouterr().err
    # a head's ground truth missing: named before anything runs
    (root / "class_names.txt").write_text("\n".join(SIFT_NAMES))
    (root / "SegmentationClass" / "geometric" / "train_1.png").unlink()
    argv[2] = str(tmp_path / "y")
    assert cli.main(argv) == 1
    assert (
        f"label file {root / 'SegmentationClass' / 'geometric' / 'train_1.png'} (listed in"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------- two inputs


def test_color_depth_trains_end_to_end_and_resumes(tmp_path, capsys):
    root = tmp_path / "nyud"
    depth = write_voc(root, second="depth", names=NYUD_NAMES)
    common = ["--data", str(root), "--arch", "nyud-fcn32s-color-d", "--depth", str(depth), "--val-every", "2",
              "--save-every", "2", "--mosaic", "2", "--lr", "3e-3"]  # fmt: skip
    hist = _train(tmp_path / "a", *common, "--iters", "4")
    assert f"with depth from {depth} (6 images, 5 classes)" in capsys.readouterr().err
    assert len(hist["loss"]) == 4 and len(hist["val_mean_iu"]) == 2 and "heads" not in hist
    assert hist["loss"][0][1] == pytest.approx(np.log(5), rel=1e-6)  # zero score layers at the start
    final = tmp_path / "a" / "final.safetensors"
    assert fastfcn.load(final).config["arch"] == "nyud-fcn32s-color-d"
    got = _eval_json(capsys, [str(final), "--data", str(root), "--depth", str(depth)])
    assert got["mean_iu"] == pytest.approx(hist["val_mean_iu"][-1][1], abs=1e-12)
    _train(tmp_path / "b", *common, "--iters", "2")
    assert _train(tmp_path / "b", *common, "--iters", "4", "--resume") == hist
    _same_weights(final, tmp_path / "b" / "final.safetensors")


def test_second_input_refusals(tmp_path, capsys):
    root = tmp_path / "nyud"
    depth = write_voc(root, n_train=2, n_val=1, second="depth", names=NYUD_NAMES)
    base = [
        "train",
        "--out",
        str(tmp_path / "x"),
        *TINY,
        "--iters",
        "1",
        "--data",
        str(root),
        "--val-every",
        "0",
    ]
    nope = tmp_path / "nope"
    cases = [
        (["--arch", "nyud-fcn32s-color-d"],
         "nyud-fcn32s-color-d takes color images and depth: pass --depth DIR"),
        (["--arch", "nyud-fcn32s-color-d", "--hha", str(depth)], "pass --depth DIR (and only it)"),
        (["--arch", "nyud-fcn32s-color-hha", "--depth", str(depth)],
         "takes color images and hha: pass --hha DIR"),
        (["--arch", "fcn8s", "--depth", str(depth)],
         "fcn8s takes one input (color images); --depth is for the"),
        (["--arch", "nyud-fcn32s-color-d", "--depth", str(nope)], f"--depth {nope}: not a folder"),
        (["--arch", "nyud-fcn32s-color-d", "--depth", str(depth), "--data", "synthetic"],
         "--data synthetic makes each scene's depth for nyud-fcn32s-color-d; --depth DIR is for a VOC-layout "
         "--data folder"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main([*base, *argv]) == 1
        assert message in capsys.readouterr().err, argv
    (depth / "train_1.png").unlink()
    assert cli.main([*base, "--arch", "nyud-fcn32s-color-d", "--depth", str(depth)]) == 1
    assert (
        f"its depth file must be {depth / 'train_1'}.<png|tif|...>, one file named as the image; found none"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "y").exists()


def test_a_second_input_of_another_size_than_its_image_is_named(tmp_path, capsys):
    from fastfcn.data import Paired, VOCSegmentation

    root = tmp_path / "nyud"
    depth = write_voc(root, n_train=2, n_val=1, second="depth", names=NYUD_NAMES)
    Image.fromarray(np.full((H - 4, W), 1000, np.uint16)).save(depth / "train_1.png")
    image = root / "JPEGImages" / "train_1.jpg"
    want = f"depth file {depth / 'train_1.png'} is {W}x{H - 4} but image {image} is {W}x{H}; they must match"
    ds = Paired(VOCSegmentation(root, "train"), "depth", depth, None)
    assert ds[0][2]["depth"].shape == (H, W)
    with pytest.raises(InputError) as e:
        ds[1]
    assert str(e.value) == want
    argv = ["--data", str(root), "--arch", "nyud-fcn32s-color-d", "--depth", str(depth), "--val-every", "0"]
    assert cli.main(["train", "--out", str(tmp_path / "x"), *TINY, *argv, "--iters", "2"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"fastfcn train: error: {want}"


@pytest.mark.parametrize("arch", ["siftflow-fcn16s", "nyud-fcn32s-color-d", "nyud-fcn32s-color-hha"])
def test_two_headed_and_two_input_nets_train_on_synthetic_scenes(tmp_path, capsys, arch):
    """`fastfcn train --data synthetic` for a SIFT Flow net (semantic + geometric labels of the
    scenes) and the NYUDv2 fusion nets (each scene's depth map / HHA image): a finite loss that
    starts at log(classes) per head (zero score layers), validation on the scenes of seed + 7919
    with the same maps (what fastfcn.evaluate measures there with the written model), and a
    checkpoint that loads, runs with the second input and is scored by `fastfcn eval --data
    synthetic` on the held-out scenes with the same maps."""
    from fastfcn.config import arch_inputs
    from fastfcn.data import SyntheticScenes, heldout_scenes
    from fastfcn.evaluate import evaluate
    from fastfcn.training.loop import VAL_SEED_OFFSET

    out = tmp_path / "run"
    hist = _train(out, "--data", "synthetic", "--arch", arch, "--num-classes", "4", "--size", "32", "--iters",
                  "2", "--val-every", "2", "--save-every", "2", "--seed", "3")  # fmt: skip
    err = capsys.readouterr().err
    assert all(np.isfinite(v) for _, v in hist["loss"]) and len(hist["loss"]) == 2
    model = fastfcn.load(out / "final.safetensors")
    assert model.config["arch"] == arch
    seg = fastfcn.Segmenter(out / "final.safetensors", backend="torch", device="cpu", precision="fp32")
    sift = arch.startswith("siftflow")
    second = None if sift else arch_inputs(arch)[1]
    heads = ("semantic", "geometric") if sift else None
    val = SyntheticScenes(4, 32, 3 + VAL_SEED_OFFSET, 4, heads=heads, second=second)
    held = evaluate(seg, heldout_scenes(3, 32, 4, heads=heads, second=second), 7 if sift else 4)[0]
    final = str(out / "final.safetensors")
    scored = _eval_json(capsys, [final, "--data", "synthetic", "--n", "3", "--size", "32"])
    for name, want in held.items() if sift else [(None, held)]:
        got = scored["heads"][name] if sift else scored
        assert got["mean_iu"] == pytest.approx(want["mean_iu"], abs=1e-12)
    if sift:
        assert "(100000 images, 7 classes: semantic 4, geometric 3)" in err
        assert model.config["num_classes"] == 7
        assert model.config["class_names"][4:] == ["sky", "horizontal", "vertical"]
        for name, classes in (("semantic", 4), ("geometric", 3)):
            assert hist["heads"][name]["loss"][0][1] == pytest.approx(np.log(classes), rel=1e-6)
        got = evaluate(seg, val, 7)[0]
        for name in ("semantic", "geometric"):
            assert got[name]["mean_iu"] == pytest.approx(hist["heads"][name]["val_mean_iu"][-1][1], abs=1e-9)
        return
    assert f"on synthetic with {second} from the scenes (100000 images, 4 classes)" in err
    assert model.config["num_classes"] == 4 and "heads" not in hist
    assert hist["loss"][0][1] == pytest.approx(np.log(4), rel=1e-6)
    assert evaluate(seg, val, 4)[0]["mean_iu"] == pytest.approx(hist["val_mean_iu"][-1][1], abs=1e-9)
    image, _, extra = val[0]
    assert seg.run(image, **extra).shape == (32, 32)
    assert scored[second] == "synthetic"
    argv = ["eval", final, "--data", "synthetic", f"--{second}", str(tmp_path)]
    assert cli.main(argv) == 1
    assert f"--{second} DIR is for a VOC-layout --data folder" in capsys.readouterr().err


def _run(tmp_path, root, arch, *argv):
    """A training Run (fastfcn.training.loop.setup) on ``root`` and its model's Preprocessor."""
    from fastfcn.cli.train import check_args
    from fastfcn.runtime.preprocess import Preprocessor
    from fastfcn.training import loop

    argv = [
        "train",
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "--data",
        str(root),
        "--arch",
        arch,
        "--lr",
        "1e-3",
        *argv,
    ]
    args = cli.build_parser("train").parse_args(argv)
    check_args(args)
    run = loop.setup(args)
    model = loop.build_model(run, 0, arch, None)
    return run, model, Preprocessor(model.config, run.device)


@pytest.mark.parametrize("arch, second", [("nyud-fcn32s-color-d", "depth"), ("nyud-fcn32s-color-hha", "hha")])
def test_training_feeds_the_net_what_inference_feeds(tmp_path, arch, second):
    from fastfcn.training.loop import training_batch

    root = tmp_path / "nyud"
    folder = write_voc(root, n_train=1, n_val=1, second=second, names=NYUD_NAMES)
    run, model, pre = _run(tmp_path, root, arch, f"--{second}", str(folder), "--batch", "1", "--no-flip",
                           "--scale-max", "0")  # fmt: skip
    x, y = training_batch(run, pre, 0)
    # inference from the same files, through the Segmenter (reference backend, fp32): its net input
    seg = fastfcn.Segmenter(model.eval(), backend="torch", device="cpu", precision="fp32")
    seen = []
    seg._backend.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    seg.run(str(root / "JPEGImages" / "train_0.jpg"), **{second: str(folder / "train_0.png")})
    assert x.shape == seen[0].shape == (1, 4 if second == "depth" else 6, H, W)
    assert torch.equal(x, seen[0])
    assert torch.equal(
        y[0], torch.from_numpy(np.array(Image.open(root / "SegmentationClass" / "train_0.png"))).long()
    )


@pytest.mark.parametrize("arch", ["nyud-fcn32s-color-d", "siftflow-fcn32s"])
def test_flips_scaling_and_mosaic_move_every_input_and_label_together(tmp_path, arch):
    from fastfcn.training.loop import training_batch

    root = tmp_path / "data"
    if arch.startswith("nyud"):
        folder = write_voc(root, n_train=1, n_val=1, second="depth", names=NYUD_NAMES)
        argv = ["--depth", str(folder), "--mosaic", "2"]
    else:
        write_voc(root, n_train=1, n_val=1, heads=True, names=SIFT_NAMES)
        argv = []
    # one training image, four copies per batch, each flipped or not; scaled by exactly 0.5
    run, _, pre = _run(
        tmp_path, root, arch, *argv, "--batch", "4", "--scale-min", "0.5", "--scale-max", "0.5"
    )
    x, y = training_batch(run, pre, 0)
    k = 2 if arch.startswith("nyud") else 1  # the mosaic's tiles per side
    assert x.shape[-2:] == (k * H // 2, k * W // 2)
    semantic = y if y.dim() == 3 else y[:, 0]
    flipped = [not torch.equal(semantic[i], semantic[0]) for i in range(4)]
    assert any(flipped) and not all(flipped)
    for i in range(4):  # every copy is the first or its mirror image
        assert torch.equal(semantic[i], semantic[0]) or torch.equal(semantic[i], semantic[0].flip(-1))
    if arch.startswith("nyud"):
        # the depth channel went with the labels, pixel for pixel: (log(1000 (id + 1)) - 7.844) / 1
        want = torch.log(1000.0 * (semantic.double() + 1)) - 7.844
        torch.testing.assert_close(x[:, 3].double(), want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(y[:, 1], torch.from_numpy(geometric(y[:, 0].numpy())).long())


def test_tile_puts_every_input_in_the_same_place():
    t = torch.arange(8).view(8, 1, 1, 1).expand(8, 2, 3, 2).contiguous()  # (N, H, W, K)
    a = tile(t, 2)
    assert a.shape == (2, 4, 6, 2)
    assert (a[1, 2:4, 3:6] == 7).all() and (a[0, :2, 3:] == 1).all() and (a[0, 2:, :3] == 2).all()
    d = tile(t[..., 0].float(), 2)  # (N, H, W) depth
    assert torch.equal(d, a[..., 0].float())


def test_curves_png_draws_a_line_per_head(tmp_path):
    hist = {"loss": [[1, 2.0], [2, 1.0]], "val_mean_iu": [],
            "heads": {"semantic": {"loss": [], "val_mean_iu": [[1, 0.2], [2, 0.4], [3, 0.5]]},
                      "geometric": {"loss": [], "val_mean_iu": [[1, 0.6], [2, 0.3], [3, 0.7]]}}}  # fmt: skip
    plot_curves(hist, tmp_path / "c.png", "t")
    with Image.open(tmp_path / "c.png") as im:
        a = np.asarray(im.convert("RGB")).astype(int)
    for colour in ((40, 90, 200), (40, 160, 70)):  # semantic blue, geometric green
        assert (np.abs(a - colour).sum(-1) < 30).sum() > 50, colour
