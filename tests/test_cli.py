"""The `fastfcn` command end to end: info, export, segment on generated images, error exits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastfcn
from fastfcn import models
from fastfcn.cli import main

WIDTH = 0.125


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A width-0.125 FCN-8s checkpoint (custom palette) and a directory of PNG and JPEG images."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = models.build("fcn8s", width=WIDTH).eval()
    with torch.no_grad():
        # A strong pool3 skip makes the labels follow local image content (several classes
        # per image), so that comparing label maps means something.
        model.score_pool3.weight.normal_(0, 1)
    palette = [[(37 * i) % 256, (91 * i) % 256, (13 * i + 50) % 256] for i in range(21)]
    ckpt = fastfcn.save(model, root / "fcn8s.safetensors", palette=palette)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 56), (33, 47), (64, 31)]):
        # Smooth gradients plus noise: a photo-like image whose labels are not all one class.
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w) + 60], -1)
        img = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(images / (f"img{i}.png" if i != 1 else f"img{i}.jpg"), quality=95)
    (images / "notes.txt").write_text("not an image; ignored by suffix")
    return {"root": root, "ckpt": ckpt, "images": images, "palette": palette, "model": model}


def run_cli(*args, capsys=None):
    rc = main([str(a) for a in args])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def test_info_safetensors(work, capsys):
    rc, out = run_cli("info", work["ckpt"], capsys=capsys)
    assert rc == 0, out.err
    text = out.out
    for needle in ("fcn8s", "safetensors", "21 (background", "0.125", "104.007", "BGR", "params"):
        assert needle in text, (needle, text)
    rc, out = run_cli("info", work["ckpt"], "--json", capsys=capsys)
    info = json.loads(out.out)
    assert info["arch"] == "fcn8s" and info["num_classes"] == 21 and info["params"] == sum(
        p.numel() for p in work["model"].parameters()
    )
    assert info["file_size"] == work["ckpt"].stat().st_size


@pytest.fixture(scope="module")
def onnx_file(work):
    out = work["root"] / "fcn8s.onnx"
    unrelated = work["root"] / "fcn8s.onnx.tmp"  # someone else's file: export must not touch it
    unrelated.write_text("keep me")
    rc = main(["export", str(work["ckpt"]), str(out)])
    assert rc == 0 and out.is_file()
    assert unrelated.read_text() == "keep me"
    assert sorted(p.name for p in work["root"].glob("*.tmp")) == ["fcn8s.onnx.tmp"]  # no leftovers
    return out


def test_export_and_info_onnx(work, onnx_file, capsys):
    rc, out = run_cli("info", onnx_file, capsys=capsys)
    assert rc == 0, out.err
    for needle in ("fcn8s", "onnx (opset", "fp32", "dynamic", "input input", "batch", "height", "width"):
        assert needle in out.out, (needle, out.out)
    rc, out = run_cli("info", onnx_file, "--json", capsys=capsys)
    info = json.loads(out.out)
    # The graph's weights are the checkpoint's parameters (fixed upsampling included).
    assert info["params"] == sum(p.numel() for p in work["model"].parameters())


def _check_outputs(outdir, images, seg, palette):
    files = sorted(p for p in images.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(files) == 3
    for f in files:
        lab_path, ov_path = outdir / "labels" / f"{f.stem}.png", outdir / "overlays" / f"{f.stem}.png"
        assert lab_path.is_file() and ov_path.is_file()
        lab = Image.open(lab_path)
        assert lab.mode == "P"
        assert lab.getpalette()[: 3 * 21] == [v for c in palette for v in c]
        img = np.array(Image.open(f).convert("RGB"))
        want = seg.run(img).cpu().numpy()
        got = np.asarray(lab)
        assert got.shape == img.shape[:2] and np.array_equal(got, want), f.name
        assert len(np.unique(got)) > 1, "degenerate test image: one class everywhere"
        ov = np.asarray(Image.open(ov_path).convert("RGB")).astype(np.float32)
        expect = 0.5 * img + 0.5 * np.asarray(palette, np.float32)[got]
        assert np.abs(ov - expect).max() <= 1.0


def test_segment_directory(work, capsys):
    out = work["root"] / "seg_torch"
    rc, cap = run_cli("segment", work["ckpt"], work["images"], "--out", out, "--backend", "torch",
                      "--device", "cpu", capsys=capsys)
    assert rc == 0, cap.err
    assert "3/3" in cap.err and "segmented 3 images" in cap.err  # the progress bar and summary
    seg = fastfcn.Segmenter(str(work["ckpt"]), backend="torch", device="cpu")
    _check_outputs(out, work["images"], seg, work["palette"])


def test_segment_with_onnx_file(work, onnx_file, capsys):
    out = work["root"] / "seg_onnx"
    rc, cap = run_cli("segment", onnx_file, work["images"], "--out", out, "--quiet", capsys=capsys)
    assert rc == 0, cap.err
    assert "/3" not in cap.err  # --quiet: no progress bar
    seg = fastfcn.Segmenter(str(work["ckpt"]), backend="torch", device="cpu")
    _check_outputs(out, work["images"], seg, work["palette"])


def test_errors_exit_nonzero_with_one_line(work, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    cases = [
        (["info", tmp_path / "missing.safetensors"], "missing.safetensors"),
        (["export", tmp_path / "missing.safetensors", tmp_path / "x.onnx"], "missing.safetensors"),
        (["export", work["ckpt"], tmp_path / "x.txt"], ".onnx"),
        (["segment", work["ckpt"], bad, "--out", tmp_path / "o", "--backend", "torch", "--on-error", "stop"],
         "broken.png"),
        (["segment", work["ckpt"], tmp_path / "nothing.png", "--out", tmp_path / "o"], "nothing.png"),
        (["segment", work["ckpt"], work["images"], "--out", tmp_path / "o", "--backend", "nope"], "nope"),
        (["info", bad], "broken.png"),
    ]
    for argv, needle in cases:
        rc, cap = run_cli(*argv, capsys=capsys)
        assert rc != 0, argv
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in cap.err, (argv, cap.err)


def test_subprocess_entry_point(work):
    r = subprocess.run([sys.executable, "-m", "fastfcn", "info", str(work["ckpt"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fcn8s" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "fastfcn", "info", str(work["root"] / "nope.pt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("fastfcn info: error:") and "nope.pt" in r.stderr


@pytest.fixture()
def bad_paths(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("a file, not a folder")
    not_json = tmp_path / "results.json"
    not_json.write_text("this is not JSON")
    img = tmp_path / "in" / "img.png"
    img.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    return {"file": a_file, "json": not_json, "img": img, "run": tmp_path / "run"}


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["export", "{ckpt}", "{run}/x.onnx", "--opset", "7"], "--opset 7"),
        (["export", "{ckpt}", "{file}/x.onnx"], "afile is a file"),
        (["eval", "{ckpt}", "--data", "synthetic", "--backend", "onnx"], "'onnx'"),
        (["eval", "{ckpt}", "--data", "synthetic"], "scenes have 2..9 classes (background + shapes) but the "
                                                    "model predicts 21; evaluate it on its own data set"),
        (["train", "--arch", "fcn8", "--out", "{run}"], "'fcn8'"),
        (["train", "--width", "0", "--out", "{run}"], "--width 0"),
        (["train", "--lr", "-1", "--out", "{run}"], "--lr -1"),
        (["train", "--iters", "0", "--out", "{run}"], "--iters 0"),
        (["train", "--seed", "-1", "--out", "{run}"], "--seed -1: expected >= 0"),
        (["train", "--scale-max", "inf", "--out", "{run}"], "--scale-max inf: expected a finite number"),
        (["data", "synth", "{run}", "--seed", "-1"], "seed must be >= 0; got -1"),
        (["train", "--stages", "fcn32s:5,fcn4s:5", "--out", "{run}"], "'fcn4s'"),
        (["train", "--out", "{file}/run"], "afile is a file"),
        (["train", "--out", "{run}", "--export", "{file}/m.safetensors"], "afile is a file"),
        (["bench-report", "{json}"], "results.json is not JSON"),
        (["bench-report", "{json}", "--markdown", "{file}/t.md"], "afile is a file"),
        (["segment", "{ckpt}", "{img}", "--out", "{file}/x"], "afile is a file"),
        (["segment", "{ckpt}", "{img}", "--out", "{run}", "--precision", "fp8"], "'fp8'"),
        (["segment", "{ckpt}", "{img}", "--out", "{run}", "--on-error", "ignore"], "'ignore'"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line_exit_1_and_write_nothing(work, bad_paths, capsys, argv, needle):
    names = {k: str(v) for k, v in bad_paths.items()} | {"ckpt": str(work["ckpt"])}
    rc = main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert lines[0].startswith(f"fastfcn {argv[0]}: error:")
    assert not bad_paths["run"].exists()  # validation comes before anything is written


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    from fastfcn.cli import bench_report

    def boom(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(bench_report, "main", boom)
    assert main(["bench-report"]) == 1
    err = capsys.readouterr().err
    assert err == ("fastfcn bench-report: error: unexpected RuntimeError: first line second line "
                   "(set FASTFCN_TRACEBACK=1 to see the traceback)\n")
    monkeypatch.setenv("FASTFCN_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="first line"):
        main(["bench-report"])


def test_odd_input_names(work, tmp_path, capsys):
    """``..png`` (Pillow sees no suffix in it) and ``.hidden.png`` segment like any other name."""
    src = tmp_path / "in"
    src.mkdir()
    img = np.zeros((9, 7, 3), np.uint8)
    for name in ("..png", ".hidden.png"):
        Image.fromarray(img).save(src / name, format="PNG")
    rc, cap = run_cli("segment", work["ckpt"], src, "--out", tmp_path / "o", "--backend", "torch",
                      "--quiet", capsys=capsys)  # fmt: skip
    assert rc == 0, cap.err
    for name in ("..png", ".hidden.png"):
        assert Image.open(tmp_path / "o" / "labels" / name).size == (7, 9)
        assert Image.open(tmp_path / "o" / "overlays" / name).size == (7, 9)


def test_layout_commands_live_in_cli_and_the_runtime_holds_no_io():
    """kernels -> ops -> models -> runtime -> cli: every command's module is in fastfcn.cli, and
    the runtime holds no argument parsing, image file IO or palette code (fastfcn.imageio,
    fastfcn.viz hold those)."""
    from pathlib import Path

    from fastfcn.cli import COMMANDS

    assert all(module.startswith("fastfcn.cli.") for module, _ in COMMANDS.values())
    pkg = Path(fastfcn.__file__).parent
    for path in (pkg / "runtime").glob("*.py"):
        text = path.read_text()
        for needle in ("argparse", "add_arguments", "from PIL", "import PIL", "read_image(", "putpalette",
                       "save_labels", "palette_bytes"):
            assert needle not in text, f"{path.name} holds {needle!r}"
    for path in [*(pkg / "models").glob("*.py"), *(pkg / "runtime").glob("*.py")]:
        text = path.read_text()
        assert "from ..cli" not in text and "fastfcn.cli" not in text, path.name
        if path.parent.name == "models":
            assert "from ..runtime" not in text and "import fastfcn.runtime" not in text, path.name
