"""Training: the loss falls, resume continues exactly, the staged schedule, 2-process gloo DDP,
augmentation, curves; and the shipped demo model's accuracy on the held-out split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastfcn
from fastfcn import cli, models
from fastfcn.data import HELDOUT_SEED
from fastfcn.runtime.preprocess import Preprocessor
from fastfcn.training import augment, init_weights, mosaic, plot_curves

TINY = ["--data", "synthetic", "--width", "0.0625", "--num-classes", "3", "--size", "32", "--batch", "2",
        "--dropout", "0", "--threads", "1", "--val-n", "4", "--quiet"]  # fmt: skip


def _train(tmp_path, *extra):
    rc = cli.main(["train", "--out", str(tmp_path), *TINY, *extra])
    assert rc == 0
    return json.loads((tmp_path / "history.json").read_text())


def test_short_run_loss_falls(tmp_path):
    hist = _train(tmp_path, "--iters", "30", "--lr", "3e-3", "--val-every", "30")
    loss = [v for _, v in hist["loss"]]
    assert len(loss) == 30
    assert np.mean(loss[-8:]) < 0.8 * np.mean(loss[:4]), loss
    assert len(hist["val_mean_iu"]) == 1
    model = fastfcn.load(tmp_path / "final.safetensors")
    assert model.config["arch"] == "fcn8s" and model.config["num_classes"] == 3
    assert model.config["meta"]["trained"]["iterations"] == 30
    assert model.config["class_names"] == ["background", "disc", "box"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_the_same_run(tmp_path):
    # With training BatchNorm: its statistics must be restored too, not only the folded weights.
    common = ["--iters", "4", "--val-every", "0", "--save-every", "2", "--scale-min", "0.8", "--batchnorm"]
    _train(tmp_path / "a", *common)
    _train(tmp_path / "b", *common[:1], "2", *common[2:])
    hist = _train(tmp_path / "b", *common, "--resume")
    assert [s for s, _ in hist["loss"]] == [1, 2, 3, 4]
    a = fastfcn.load(tmp_path / "a" / "final.safetensors").state_dict()
    b = fastfcn.load(tmp_path / "b" / "final.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert cli.main(["train", "--out", str(tmp_path / "c"), *TINY, "--iters", "2", "--resume"]) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through Linux's /proc")
def test_every_save_point_is_on_disk_before_it_replaces_the_last(tmp_path, monkeypatch):
    # Both files of a resume point are fsynced before their rename: after a power loss the
    # renamed train_state.pt is never an empty file beside a complete checkpoint.
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _train(tmp_path, "--iters", "2", "--save-every", "1", "--val-every", "0")
    names = [os.path.basename(p) for p in synced]
    for stem, suffix in (("last", ".safetensors"), ("train_state", ".pt")):
        assert sum(n.startswith(f".{stem}.fastfcn-tmp-") and n.endswith(suffix) for n in names) == 2, names


def test_resume_point_keeps_the_cuda_generators(tmp_path, monkeypatch):
    """A run on a GPU draws its dropout masks from the CUDA generators: the resume point keeps
    their states and a resume puts them back (CUDA faked: torch's calls are recorded)."""
    saved = [torch.tensor([1, 2, 3], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    _train(tmp_path, "--device", "cpu", "--iters", "2", "--val-every", "0")
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert len(state["cuda_rng"]) == 1 and torch.equal(state["cuda_rng"][0], saved[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    _train(tmp_path, "--device", "cpu", "--iters", "3", "--val-every", "0", "--resume")
    assert len(restored) == 1 and torch.equal(restored[0][0], saved[0])


def test_resume_refuses_a_run_of_other_options_in_one_line(tmp_path, capsys):
    base = ["--arch", "fcn32s", "--val-every", "0", "--iters"]
    _train(tmp_path, *base, "2")
    for other, why in ((["--arch", "fcn16s"], "--arch fcn32s (now fcn16s)"),
                       (["--width", "0.125"], "--width 0.0625 (now 0.125)"),
                       (["--num-classes", "4"], "classes 3 (now 4)"),
                       (["--optimizer", "sgd"], "--optimizer adam (now sgd)"),
                       (["--batchnorm"], "--batchnorm off (now on)"),
                       (["--learnable-upsampling"], "--learnable-upsampling off (now on)"),
                       (["--stages", "fcn32s:1,fcn32s:3"], "stage 1 (now 2)")):  # fmt: skip
        capsys.readouterr()
        assert cli.main(["train", "--out", str(tmp_path), *TINY, *base, "4", "--resume", *other]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"fastfcn train: error: --resume: the run in {tmp_path} stopped at step 2 with "
                              f"{why}; resume it with the options"), err  # fmt: skip
    assert json.loads((tmp_path / "history.json").read_text())["loss"][-1][0] == 2  # nothing overwritten


def test_resume_refuses_a_damaged_state_file_in_one_line(tmp_path, capsys):
    _train(tmp_path, "--iters", "2", "--val-every", "0")
    state = tmp_path / "train_state.pt"
    data = state.read_bytes()
    for damaged, why in ((data[: len(data) // 2], "not a readable training state (truncated or damaged"),
                         (b"garbage\n", "not a readable training state (truncated or damaged"),
                         (_saved({"step": 2}), "not a training state of fastfcn train (it lacks stage")):
        state.write_bytes(damaged)
        capsys.readouterr()
        assert cli.main(["train", "--out", str(tmp_path), *TINY, "--iters", "4", "--resume"]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"fastfcn train: error: --resume: {state}") and why in err, err


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_staged_schedule_initialises_from_coarser_net(tmp_path, capsys):
    _train(tmp_path, "--stages", "fcn32s:2,fcn16s:2", "--val-every", "0")
    err = capsys.readouterr().err
    assert "fcn16s initialised from the previous stage" in err
    assert fastfcn.load(tmp_path / "final.safetensors").config["arch"] == "fcn16s"


def test_resume_at_a_stage_end_starts_the_next_stage_from_it(tmp_path, capsys):
    # A run stopped after its save at the end of a stage (before the next stage's first save):
    # the resumed run must initialise the next stage from that stage, as the run that went on.
    stages = ["--stages", "fcn32s:2,fcn16s:2", "--val-every", "0", "--save-every", "2"]
    whole = _train(tmp_path / "a", *stages)
    _train(tmp_path / "b", *stages[:1], "fcn32s:2", *stages[2:])
    capsys.readouterr()
    assert _train(tmp_path / "b", *stages, "--resume") == whole
    assert "stage 2: fcn16s initialised from the previous stage" in capsys.readouterr().err
    a = fastfcn.load(tmp_path / "a" / "final.safetensors").state_dict()
    b = fastfcn.load(tmp_path / "b" / "final.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_mixed_sizes_name_the_options_that_train_on_them(tmp_path, capsys):
    from fastfcn.data import SyntheticScenes, write_voc

    root = tmp_path / "voc"
    ids = write_voc(SyntheticScenes(2, 32, num_classes=3), root, "train")
    ids += write_voc(SyntheticScenes(2, (24, 40), num_classes=3), root, "train", start=2)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids))
    argv = ["train", *TINY, "--data", str(root), "--arch", "fcn32s", "--iters", "2", "--val-every", "0",
            "--batch", "1"]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--mosaic", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "differ in size ([(24, 40, 3), (32, 32, 3)]); use --batch 1 and --mosaic 1 for" in err, err
    assert cli.main([*argv, "--out", str(tmp_path / "b"), "--mosaic", "1"]) == 0  # the advice works


def test_init_from_a_checkpoint_of_another_width_is_refused(tmp_path, capsys):
    donor = tmp_path / "donor"
    _train(donor, "--arch", "fcn32s", "--iters", "1", "--val-every", "0")
    init = str(donor / "final.safetensors")
    argv = ["train", *TINY, "--arch", "fcn16s", "--iters", "1", "--val-every", "0", "--init", init]
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "a"), "--width", "0.125"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fastfcn train: error: --init {init} is a net of width 0.0625, this run trains width 0.125: its "
        "layers do not fit; expected a checkpoint of --width 0.125"
    )
    # the same width: the backbone is copied (and fcn16s' new layers start afresh)
    assert cli.main([*argv, "--out", str(tmp_path / "b"), "--lr", "1e-12"]) == 0
    assert f"fcn16s initialised from {init} (" in capsys.readouterr().err
    a, b = fastfcn.load(init).state_dict(), fastfcn.load(tmp_path / "b" / "final.safetensors").state_dict()
    torch.testing.assert_close(b["conv3_1.weight"], a["conv3_1.weight"], rtol=0, atol=1e-6)


def test_a_label_outside_the_classes_is_named(tmp_path, capsys):
    from PIL import Image

    from fastfcn.data import SyntheticScenes, write_voc

    root = tmp_path / "voc"
    write_voc(SyntheticScenes(3, 32, num_classes=3), root, "train")
    bad = root / "SegmentationClass" / "train_000001.png"
    with Image.open(bad) as im:
        a, pal = np.array(im), im.getpalette()
    a[3, 4] = 7  # a class id the 3 classes of class_names.txt do not have, and not void
    out = Image.fromarray(a, mode="P")
    out.putpalette(pal)
    out.save(bad)
    argv = ["train", *TINY, "--data", str(root), "--arch", "fcn32s", "--iters", "4", "--val-every", "0",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "the labels hold class ids [7] but the net has 3 classes: expected ids 0..2 and 255 (ignored); check "
        f"the data's class_names.txt or label PNGs (in {bad} (item 1))"
    )


def test_refuses_the_heldout_seed(tmp_path):
    args = ["--iters", "1", "--seed", str(HELDOUT_SEED)]
    assert cli.main(["train", "--out", str(tmp_path), *TINY, *args]) == 1


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    # One SGD step on a global batch of 4: two gloo ranks with 2 images each must give the
    # weights that one process gets with all 4 (DDP averages the ranks' mean gradients).
    args = [*TINY, "--iters", "2", "--batch", "4", "--val-every", "0", "--optimizer", "sgd", "--lr", "0.05",
            "--scale-min", "1", "--scale-max", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastfcn", "train", "--out", str(tmp_path / "ddp"), *args]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in p.stderr
    assert "ddp: 2 processes (gloo), parameters in sync" in p.stderr
    assert cli.main(["train", "--out", str(tmp_path / "one"), *args]) == 0
    a = fastfcn.load(tmp_path / "ddp" / "final.safetensors").state_dict()
    b = fastfcn.load(tmp_path / "one" / "final.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.manual_seed(0)
    init = models.build("fcn8s", num_classes=3, width=0.0625, dropout=0.0)
    init_weights(init)
    assert not torch.allclose(init.conv1_1.weight, a["conv1_1.weight"])  # training did move the backbone


def test_preprocess_follows_the_config():
    # Training feeds the model through the runtime's Preprocessor, as the Segmenter does.
    cpu = torch.device("cpu")
    img = torch.tensor([[[[10, 20, 30]]]], dtype=torch.uint8)  # (1, 1, 1, 3) RGB
    cfg = {"color_order": "BGR", "mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0], "input_scale": 255.0}
    assert Preprocessor(cfg, cpu)(img).flatten().tolist() == [29.0, 18.0, 7.0]
    cfg = {"color_order": "RGB", "mean": [0.0, 0.0, 0.0], "std": [2.0, 2.0, 2.0], "input_scale": 1.0}
    torch.testing.assert_close(Preprocessor(cfg, cpu)(img).flatten(), torch.tensor([10, 20, 30]) / 255 / 2)
    import fastfcn.training.loop as loop

    assert loop.Preprocessor is Preprocessor and not hasattr(loop, "preprocess")


def test_augment_scales_and_flips_labels_with_images():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    y = torch.arange(2 * 4 * 6).view(2, 4, 6) % 5
    xa, ya = augment(x, y, 1.0, torch.tensor([True, False]))
    assert torch.equal(ya[0], y[0].flip(-1)) and torch.equal(ya[1], y[1])
    assert torch.equal(xa[0], x[0].flip(-1))
    xs, ys = augment(x, y, 0.5, torch.tensor([False, False]))
    assert xs.shape == (2, 3, 2, 3) and ys.shape == (2, 2, 3) and ys.dtype == torch.long
    assert set(ys.unique().tolist()) <= set(y.unique().tolist())  # nearest: no blended ids


def test_mosaic_tiles_in_order():
    im = torch.arange(8 * 2 * 3 * 3).view(8, 2, 3, 3).to(torch.uint8)
    lb = torch.arange(8).view(8, 1, 1).expand(8, 2, 3).contiguous()
    a, b = mosaic(im, lb, 2)
    assert a.shape == (2, 4, 6, 3) and b.shape == (2, 4, 6)
    assert torch.equal(a[1, 2:4, 3:6], im[7]) and (b[0, :2, 3:] == 1).all()


def test_curves_png(tmp_path):
    plot_curves({"loss": [[1, 2.0], [2, 1.0], [3, 0.5]], "val_mean_iu": []}, tmp_path / "c.png", "t")
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:
        a = np.asarray(im.convert("RGB"))
    assert (np.abs(a.astype(int) - [200, 60, 40]).sum(-1) < 30).sum() > 50  # the loss line is drawn
