"""Everyday use: paths and PIL images into Segmenter.run, built-in models by name, tiled
inference, the CLI's choices/defaults/examples, one progress bar, a torch-free --help."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastfcn
from fastfcn import cli, names
from fastfcn.imageio import read_image
from fastfcn.progress import Progress
from fastfcn.runtime.tiling import check_tiling, plan, spans
from fastfcn.zoo import BUILTIN, builtin_path

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _py(code: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo():
    return fastfcn.Segmenter("demo", backend="torch", device="cpu")


def _photo(h=70, w=90, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------ names and the CLI


def test_names_match_the_registries():
    from fastfcn.models import available
    from fastfcn.runtime.backends import PRECISIONS, available_backends

    assert set(names.BACKENDS) == set(available_backends())
    assert names.PRECISIONS == tuple(PRECISIONS)
    assert names.ARCHS == tuple(available())


def test_help_does_not_import_torch(tmp_path):
    code = """
        import sys
        from fastfcn import cli
        for argv in (["--help"], ["segment", "--help"], ["info", "--help"], ["export", "--help"]):
            assert cli.main(argv) == 0, argv
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
        print("ok")
    """
    r = _py(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_has_an_example(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"fastfcn {command}" in out.split("examples:")[1]


def test_segment_help_shows_defaults_and_new_options(capsys):
    assert cli.main(["segment", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--backend {auto,torch,fused,compile,onnxruntime,openvino}" in out
    assert "(default: auto)" in out
    assert "--batch-size BATCH_SIZE" in out and "(default: 1)" in out
    assert "--tile H W" in out and "--overlap OVERLAP" in out


@pytest.mark.parametrize("argv, needle", [
    (["segment", "demo", "x.png", "--out", "o", "--device", "gpu"], "'gpu' is not a device"),
    (["segment", "demo", "x.png", "--out", "o", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
    (["segment", "demo", "x.png", "--out", "o", "--precision", "int8"], "invalid choice: 'int8'"),
    (["info", "demo", "--arch", "unet"], "invalid choice: 'unet'"),
])
def test_bad_choices_fail_while_parsing(argv, needle, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


# ------------------------------------------------------------------------------- progress bar


def test_one_progress_bar():
    import fastfcn.cli.segment as segment
    import fastfcn.training.loop as loop
    import fastfcn.video as video

    assert loop.Progress is Progress and segment.Progress is Progress and video.Progress is Progress
    # eval imports it in main(); no module defines a bar of its own.
    defined = [p.relative_to(REPO).as_posix() for p in (REPO / "fastfcn").rglob("*.py")
               if "class Progress" in p.read_text()]
    assert defined == ["fastfcn/progress.py"]


def test_progress_logs_tenths_and_redraws_on_a_terminal():
    log = io.StringIO()
    bar = Progress(100, "eval", stream=log, unit="img")
    for _ in range(100):
        bar.step()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("eval [" + "#" * 24 + "] 100/100")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress(3, stream=tty)
    for _ in range(3):
        bar.step("x")
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")
    quiet = io.StringIO()
    bar = Progress(5, stream=quiet, enabled=False)
    bar.step()
    assert quiet.getvalue() == "" and bar.done == 1


# ----------------------------------------------------------------------------- built-in models


def test_builtin_name_loads_the_packaged_file():
    path = builtin_path("demo")
    assert path.is_file() and path.name == BUILTIN["demo"][0]
    assert path.parent.parent == Path(fastfcn.__file__).parent
    model = fastfcn.load("demo")
    assert model.config["arch"] == "fcn8s"
    with pytest.raises(fastfcn.CheckpointError, match="not a built-in model"):
        builtin_path("nope")


def test_builtin_files_are_package_data():
    """A wheel (non-editable install) carries the built-in models: they match the package-data
    globs that setuptools installs, and zoo finds them through importlib.resources."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["fastfcn"]
    for name, (file, _) in BUILTIN.items():
        assert any(fnmatch.fnmatch(f"assets/{file}", g) for g in globs), (name, globs)


def test_builtin_name_wins_over_a_file_of_that_name(tmp_path, monkeypatch, capsys):
    other = fastfcn.models.build("fcn32s", num_classes=3, width=0.0625)
    fastfcn.save(other, tmp_path / "other.safetensors")
    (tmp_path / "other.safetensors").rename(tmp_path / "demo")  # load sniffs the format
    monkeypatch.chdir(tmp_path)
    assert fastfcn.load("demo").config["arch"] == "fcn8s"
    assert fastfcn.load("./demo").config["arch"] == "fcn32s"
    assert fastfcn.Segmenter("./demo", backend="torch").num_classes == 3
    assert cli.main(["info", "./demo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "fcn32s"


def test_info_demo_from_another_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastfcn", "info", "demo", "--json"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "fcn8s" and info["num_classes"] == 5
    assert Path(info["file"]) == builtin_path("demo")


def test_segment_demo_from_another_folder(tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(_photo(40 + 8 * i, 56, seed=i)).save(photos / f"p{i}.png")
    Image.fromarray(_photo(40, 56, seed=9)).convert("L").save(photos / "grey.png")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["segment", "demo", "photos", "--out", "seg", "--backend", "torch", "--batch-size", "3"])
    assert rc == 0, capsys.readouterr().err
    seg = fastfcn.Segmenter("demo", backend="torch")
    for name in ("p0", "p1", "p2", "grey"):
        got = np.asarray(Image.open(tmp_path / "seg" / "labels" / f"{name}.png"))
        want = seg.run(tmp_path / "photos" / f"{name}.png").numpy()
        np.testing.assert_array_equal(got, want)
    capsys.readouterr()
    assert cli.main(["eval", "demo", "--data", "synthetic", "--n", "2", "--backend", "torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2


# ----------------------------------------------------------------- paths and PIL images in run()


def test_run_takes_paths_pil_images_and_mixed_lists(demo, tmp_path):
    img = _photo()
    Image.fromarray(img).save(tmp_path / "a.png")
    want = demo.run(img)
    for batch in (str(tmp_path / "a.png"), tmp_path / "a.png", Image.fromarray(img),
                  Image.fromarray(img).convert("RGBA")):
        assert torch.equal(demo.run(batch), want), type(batch)
    grey = Image.fromarray(img).convert("L")
    out = demo.run([tmp_path / "a.png", grey, img, str(tmp_path / "a.png")])
    assert isinstance(out, list) and len(out) == 4
    assert torch.equal(out[0], want) and torch.equal(out[2], want) and torch.equal(out[3], want)
    assert torch.equal(out[1], demo.run(np.repeat(np.asarray(grey)[..., None], 3, axis=-1)))


@pytest.mark.parametrize("mode", ["L", "P", "LA", "I;16", "1", "CMYK"])
def test_run_takes_pil_images_of_any_mode(demo, tmp_path, mode):
    im = Image.fromarray(_photo(33, 47))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
    else:
        im = im.convert(mode)
    im.save(tmp_path / "x.tiff")
    got = demo.run(im)
    assert got.shape == (33, 47) and got.dtype == torch.uint8
    assert torch.equal(got, demo.run(read_image(tmp_path / "x.tiff")))


def test_run_names_a_bad_path(demo, tmp_path):
    with pytest.raises(fastfcn.InputError, match="nope.png: no such file"):
        demo.run(str(tmp_path / "nope.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(fastfcn.InputError, match="notes.png: not a readable image"):
        demo.run([_photo(), tmp_path / "notes.png"])
    with pytest.raises(fastfcn.InputError, match="is a folder"):
        demo.run(tmp_path)


def test_num_classes(demo):
    assert demo.num_classes == 5 == len(demo.class_names)
    assert demo.run(_photo(), "logits").shape[0] == demo.num_classes


# ----------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("size, tile, overlap", [(10, 4, 1), (7, 4, 1), (500, 224, 64), (4, 8, 2),
                                                 (1000, 256, 0), (257, 256, 255)])
def test_spans_partition_the_axis(size, tile, overlap):
    sp = spans(size, tile, overlap)
    t = min(tile, size)
    owned = [i for _, lo, hi in sp for i in range(lo, hi)]
    assert owned == list(range(size))
    for s, lo, hi in sp:
        assert 0 <= s <= lo < hi <= s + t <= size
    starts = [s for s, _, _ in sp]
    assert starts == sorted(set(starts)) and starts[-1] == size - t
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_plan_and_argument_checks():
    tiles = plan(100, 300, (64, 128), 16)
    assert {(t.h, t.w) for t in tiles} == {(64, 128)}
    cover = np.zeros((100, 300), int)
    for t in tiles:
        cover[t.y0:t.y1, t.x0:t.x1] += 1
    assert (cover == 1).all()
    assert check_tiling(32, 8) == ((32, 32), 8)
    with pytest.raises(fastfcn.InputError, match="pass tile="):
        fastfcn.Segmenter("demo", backend="torch").run(_photo(), overlap=16)
    assert check_tiling((500, 300)) == ((500, 300), 64) and check_tiling((40, 90)) == ((40, 90), 20)
    for bad, overlap, msg in [((0, 4), 0, "two ints >= 1"), ((4,), 0, "two ints"), ((8, 8), 8, "smaller"),
                              ((8, 8), -1, "overlap must be"), ((8.0, 8), 0, "two ints")]:
        with pytest.raises(fastfcn.InputError, match=msg):
            check_tiling(bad, overlap)


def test_a_tile_as_large_as_the_image_is_untiled(demo):
    img = _photo(60, 80)
    assert torch.equal(demo.run(img, tile=(60, 80)), demo.run(img))
    assert torch.equal(demo.run(img, "logits", tile=(100, 100)), demo.run(img, "logits"))


def test_tiled_agrees_with_untiled_on_the_demo_model(demo):
    from fastfcn.data import heldout_scenes

    img = heldout_scenes(1, 160)[0][0]
    whole = demo.run(img)
    probs = demo.run(img, "probs", tile=(96, 96), overlap=32)
    assert probs.shape == (5, 160, 160)
    torch.testing.assert_close(probs.sum(0), torch.ones(160, 160))
    tiled = demo.run(img, tile=(96, 96), overlap=32)
    assert tiled.dtype == whole.dtype and torch.equal(probs.argmax(0).to(torch.uint8), tiled)
    agree = (tiled == whole).float().mean().item()
    # Measured 100.00% here (benchmarks/tiling_agreement.py gives the table per family).
    assert agree > 0.99, agree


def test_max_pixels_applies_per_tile(tmp_path):
    seg = fastfcn.Segmenter("demo", backend="torch", max_pixels=64 * 64)
    img = _photo(100, 120)
    Image.fromarray(img).save(tmp_path / "big.png")
    with pytest.raises(fastfcn.InputError, match="max_pixels"):
        seg.run(img)
    with pytest.raises(fastfcn.InputError, match="over the limit"):
        seg.run(tmp_path / "big.png")
    a = seg.run(img, tile=(64, 64), overlap=16)
    b = seg.run(tmp_path / "big.png", tile=(64, 64), overlap=16)
    assert a.shape == (100, 120) and torch.equal(a, b)
    with pytest.raises(fastfcn.InputError, match="max_pixels"):
        seg.run(img, tile=(80, 80), overlap=16)


def test_tiled_preprocessed_float_input(demo):
    img = _photo(90, 90)
    x = demo._pre(torch.from_numpy(img)[None])
    assert torch.equal(demo.run(x, preprocessed=True, tile=(64, 64), overlap=32),
                       demo.run(img[None], tile=(64, 64), overlap=32))


def test_segment_cli_tile_and_batch_size(tmp_path, capsys):
    ckpt = builtin_path("demo")
    for i in range(3):
        Image.fromarray(_photo(150, 130, seed=i)).save(tmp_path / f"im{i}.png")
    files = [str(tmp_path / f"im{i}.png") for i in range(3)]
    rc = cli.main(["segment", str(ckpt), *files, "--out", str(tmp_path / "o"), "--backend", "torch",
                   "--tile", "96", "96", "--overlap", "32", "--max-pixels", str(96 * 96),
                   "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    seg = fastfcn.Segmenter("demo", backend="torch")
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "o" / "labels" / f"im{i}.png"))
        np.testing.assert_array_equal(got, seg.run(files[i], tile=(96, 96), overlap=32).numpy())
    assert cli.main(["segment", str(ckpt), files[0], "--out", str(tmp_path / "p"),
                     "--tile", "32", "32", "--overlap", "32"]) == 1
    assert "overlap 32 must be smaller" in capsys.readouterr().err


def test_10k_by_10k_runs_in_bounded_memory(tmp_path):
    """A 10,000 x 10,000 image through run_tiled (the Segmenter's tiled path) with a stand-in for
    the Segmenter's batch path that checks each call's tiles and labels them by a threshold.
    The process may grow by the labels (100 MB) and a batch of tiles, not by a whole-image
    result: C x H x W float32 logits would be 8.4 GB at 21 classes."""
    code = """
        import resource, torch
        from fastfcn.runtime.tiling import TILE_BATCH, run_tiled
        torch.set_num_threads(1)
        seen = []

        def run(x, kind, output):
            assert kind == "u8" and output == "labels" and x.dtype == torch.uint8
            seen.append(tuple(x.shape))
            return (x[..., 0] > 100).to(torch.uint8)

        # One row broadcast to 10,000 rows: the image costs no memory (and no seconds to fill),
        # so what the process grows by is the tiled path's own.
        row = torch.full((1, 1, 10_000, 3), 128, dtype=torch.uint8)
        row[:, :, 5000:] = 30
        t = row.expand(1, 10_000, 10_000, 3)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        labels = run_tiled(run, t, "u8", "labels", (1024, 1024), 64)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        assert labels.shape == (10_000, 10_000) and labels.dtype == torch.uint8
        assert {s[1:] for s in seen} == {(1024, 1024, 3)} and max(s[0] for s in seen) == TILE_BATCH
        assert sum(s[0] for s in seen) == 11 * 11
        assert bool((labels[:, :5000] == 1).all()) and bool((labels[:, 5000:] == 0).all())
        print(f"grown {grown:.0f} MB, {len(seen)} calls")
        assert grown < 200, grown
    """
    r = _py(code, tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "grown" in r.stdout
