"""`fastfcn segment` never loses or overwrites anything, and reads images safely.

Every run goes through ``fastfcn.cli.main`` on small generated images with a width-1/16
FCN-8s; label maps are compared with ``Segmenter.run`` on the same pixels, so a file written
for the wrong input, or from wrongly converted pixels, fails.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastfcn
from fastfcn import models
from fastfcn.cli import main
from fastfcn.errors import InputError
from fastfcn.imageio import read_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build("fcn8s", width=0.0625).eval()
    with torch.no_grad():
        model.score_pool3.weight.normal_(0, 1)  # labels follow local content: several classes
    return fastfcn.save(model, tmp_path_factory.mktemp("seg") / "m.safetensors")


@pytest.fixture(scope="module")
def seg(ckpt):
    return fastfcn.Segmenter(str(ckpt), backend="torch", device="cpu")


def photo(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * (seed % 6))], -1)
    return np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)


def write(path: Path, img: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)
    return path


def segment(ckpt, *args, capsys):
    rc = main(["segment", str(ckpt), *map(str, args), "--backend", "torch", "--device", "cpu", "--quiet"])
    return rc, capsys.readouterr().err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- never destroys


def test_refuses_an_output_folder_that_holds_its_inputs(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "a.png", photo(0))
    write(photos / "sub" / "b.png", photo(1))
    before = tree(photos)
    for out in (photos, photos / "..", tmp_path):
        rc, err = segment(ckpt, photos, "--out", out, capsys=capsys)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "holds the input" in err, err
    rc, err = segment(ckpt, photos / "sub" / "b.png", "--out", photos, capsys=capsys)
    assert rc == 1 and "holds the input" in err, err
    assert tree(photos) == before  # nothing written, nothing overwritten


def test_mirrored_output_names_never_collide(ckpt, seg, tmp_path, capsys):
    src = tmp_path / "in"
    imgs = {
        "cam1/a.png": photo(1), "cam2/a.png": photo(2),          # same name, two folders
        "cam1/x.png": photo(3), "cam1/x_overlay.png": photo(4),  # old scheme: overlay vs labels
        "cam2/b.png": photo(5), "cam2/b.jpg": photo(6),          # same stem, two formats
    }  # fmt: skip
    for rel, img in imgs.items():
        write(src / rel, img, **({"quality": 100} if rel.endswith(".jpg") else {}))
    out = tmp_path / "out"
    rc, err = segment(ckpt, src / "cam1", src / "cam2", "--out", out, capsys=capsys)
    assert rc == 0, err
    want = {"cam1/a.png": "cam1/a.png", "cam2/a.png": "cam2/a.png", "cam1/x.png": "cam1/x.png",
            "cam1/x_overlay.png": "cam1/x_overlay.png", "cam2/b.png": "cam2/b.png.png",
            "cam2/b.jpg": "cam2/b.jpg.png"}  # fmt: skip
    written = tree(out)
    assert sorted(written) == sorted([f"labels/{v}" for v in want.values()]
                                     + [f"overlays/{v}" for v in want.values()])  # fmt: skip
    for rel, name in want.items():
        pixels = np.array(Image.open(src / rel).convert("RGB"))
        got = labels_of(out / "labels" / name)
        assert np.array_equal(got, seg.run(pixels).numpy()), rel
    # The two a.png inputs differ, so their label maps must too (one did not overwrite the other).
    assert not np.array_equal(labels_of(out / "labels/cam1/a.png"), labels_of(out / "labels/cam2/a.png"))


def test_a_second_run_never_reads_its_own_outputs(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(2):
        write(photos / f"p{i}.png", photo(i))
    write(photos / "deep" / "q.png", photo(9))
    out = photos / "seg"  # inside the input folder: allowed, never walked
    for run in range(2):
        rc, err = segment(ckpt, photos, "--out", out, "--recursive", capsys=capsys)
        assert rc == 0, err
        assert "segmented 3 images" in err, (run, err)
    assert "replaced 6 files of an earlier run" in err
    assert sorted(tree(out / "labels")) == ["deep/q.png", "p0.png", "p1.png"]


def test_recursive(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "top.png", photo(0))
    write(photos / "a" / "b" / "deep.png", photo(1))
    rc, err = segment(ckpt, photos, "--out", tmp_path / "flat", capsys=capsys)
    assert rc == 0 and "segmented 1 image " in err, err
    assert sorted(tree(tmp_path / "flat" / "labels")) == ["top.png"]
    rc, err = segment(ckpt, photos, "--out", tmp_path / "rec", "--recursive", capsys=capsys)
    assert rc == 0 and "segmented 2 images" in err, err
    assert sorted(tree(tmp_path / "rec" / "labels")) == ["a/b/deep.png", "top.png"]


# ----------------------------------------------------------------------------- bad images


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(photo(7, 64, 64)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_on_error_skip_reports_and_counts_stop_ends(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "a_good.png", photo(0))
    truncated_jpeg(photos / "b_truncated.jpg")
    (photos / "c_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    write(photos / "d_good.png", photo(1))
    out = tmp_path / "skip"
    rc, err = segment(ckpt, photos, "--out", out, capsys=capsys)
    lines = err.strip().splitlines()
    assert rc == 1, err  # skipped images are not silent: the exit status says so
    assert [ln.split(": ")[1].split("/")[-1] for ln in lines[:2]] == ["b_truncated.jpg", "c_garbage.png"]
    assert all(ln.startswith("fastfcn segment: skipped ") for ln in lines[:2])
    assert "segmented 2 images" in lines[-1] and "skipped 2 of 4" in lines[-1]
    assert sorted(tree(out / "labels")) == ["a_good.png", "d_good.png"]

    out = tmp_path / "stop"
    rc, err = segment(ckpt, photos, "--out", out, "--on-error", "stop", capsys=capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "b_truncated.jpg" in err, err
    assert sorted(tree(out / "labels")) == ["a_good.png"]  # what was done before the error stays


def test_a_run_that_writes_nothing_leaves_no_folder(ckpt, tmp_path, capsys):
    bad = truncated_jpeg(tmp_path / "t.jpg")
    out = tmp_path / "out" / "nested"
    rc, err = segment(ckpt, bad, "--out", out, capsys=capsys)
    assert rc == 1 and "skipped 1 of 1" in err, err
    assert not (tmp_path / "out").exists()


def test_fifos_are_refused_without_opening(ckpt, tmp_path, capsys):
    photos = tmp_path / "photos"
    write(photos / "good.png", photo(0))
    os.mkfifo(photos / "pipe.png")  # opening it for reading would block until a writer comes
    result = {}

    def run(*args):
        result[args] = segment(ckpt, *args, capsys=capsys)

    for args in ((photos / "pipe.png", "--out", tmp_path / "o1"), (photos, "--out", tmp_path / "o2")):
        t = threading.Thread(target=run, args=args, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), f"segment blocked on a FIFO: {args}"
    rc, err = result[(photos / "pipe.png", "--out", tmp_path / "o1")]
    assert rc == 1 and "FIFO" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o1").exists()
    rc, err = result[(photos, "--out", tmp_path / "o2")]
    assert rc == 1 and "pipe.png: is a FIFO" in err and "segmented 1 image " in err, err


def png_claiming(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h (8-bit RGB) with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("w, h", [(20000, 20000), (5000, 4000)])  # over Pillow's bomb limit; under it
def test_oversized_headers_are_refused_before_decoding(tmp_path, w, h):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(w, h))
    assert len(path.read_bytes()) < 80
    with pytest.raises(InputError, match=r"bomb\.png: .*(header|decod)"):
        read_image(path, max_pixels=4096 * 4096)


def test_max_pixels_option(ckpt, tmp_path, capsys):
    path = write(tmp_path / "in" / "big.png", photo(0, 40, 50))
    rc, err = segment(ckpt, path, "--out", tmp_path / "o", "--max-pixels", 1999, capsys=capsys)
    assert rc == 1 and "50x40 = 2000 pixels, over the limit of 1999" in err, err
    rc, err = segment(ckpt, path, "--out", tmp_path / "o", "--max-pixels", 2000, capsys=capsys)
    assert rc == 0, err


# ----------------------------------------------------------------------------- conversions


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
    want = np.repeat(np.round(values / 257).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(values).save(tmp_path / "g16.png")  # opens as "I;16"
    Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    Image.fromarray(values.astype(np.int32), "I").save(tmp_path / "g32.tif")  # older Pillows' 16-bit PNGs
    for name in ("g16.png", "g16b.tif", "g32.tif"):
        got = read_image(tmp_path / name)
        assert got.shape == (2, 4, 3) and np.array_equal(got, want), name


def test_palette_greyscale_rgba_cmyk(tmp_path):
    rgb = photo(3, 6, 5)
    pal = Image.fromarray(rgb).quantize(colors=16)  # a "P" image; its palette holds the colours
    pal.save(tmp_path / "p.png")
    want_p = np.asarray(pal.convert("RGB"))
    assert len(np.unique(want_p.reshape(-1, 3), axis=0)) > 4
    assert np.array_equal(read_image(tmp_path / "p.png"), want_p)

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    assert np.array_equal(read_image(tmp_path / "l.png"), np.repeat(grey[..., None], 3, -1))

    alpha = np.zeros(rgb.shape[:2] + (1,), np.uint8)  # fully transparent: colours kept as stored
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)

    Image.fromarray(np.stack([grey, alpha[..., 0]], -1), "LA").save(tmp_path / "la.png")
    assert np.array_equal(read_image(tmp_path / "la.png"), np.repeat(grey[..., None], 3, -1))
    Image.fromarray(grey > 127).save(tmp_path / "bw.png")  # mode "1"
    bw = np.where(grey > 127, 255, 0).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "bw.png"), np.repeat(bw[..., None], 3, -1))

    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    want_c = np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 255], [0, 0, 0]]], np.uint8)
    assert np.array_equal(read_image(tmp_path / "c.tif"), want_c)


@pytest.mark.parametrize("orientation, turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                               (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = photo(4, 6, 10)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "e.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "e.png"), turn(stored))


def test_devices_are_refused_without_reading():
    with pytest.raises(InputError, match="/dev/zero: is a device"):
        read_image("/dev/zero")  # reading it would never end


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.ones((4, 4), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(InputError, match=r"f\.tif: 32-bit float"):
        read_image(tmp_path / "f.tif")


def test_exif_orientation_beside_a_tag_pillow_cannot_write_back(ckpt, tmp_path, capsys):
    # XResolution (0x011A, RATIONAL by the standard) stored as ASCII text: Pillow reads it, but
    # ImageOps.exif_transpose writes the EXIF back after turning the image and fails on it.
    stored = photo(5, 6, 10)
    entries = (struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)  # Orientation, SHORT: 6 (turn 90 degrees clockwise)
               + struct.pack(">HHII", 0x011A, 2, 8, 8 + 2 + 2 * 12 + 4))  # XResolution, ASCII, 8 bytes
    raw = b"Exif\0\0MM\0*" + struct.pack(">IH", 8, 2) + entries + struct.pack(">I", 0) + b"caption\0"
    path = write(tmp_path / "in" / "e.png", stored, exif=raw)
    assert Image.open(path).getexif()[0x011A] == "caption"
    assert np.array_equal(read_image(path), np.rot90(stored, -1))
    rc, err = segment(ckpt, path, "--out", tmp_path / "o", capsys=capsys)
    assert rc == 0, err
    assert labels_of(tmp_path / "o" / "labels" / "e.png").shape == (10, 6)
