"""fastfcn.viz: class colours, overlay, side by side, palette PNGs; the video progress line."""

import io

import numpy as np
import pytest
from PIL import Image

from fastfcn import viz
from fastfcn.models import voc_palette
from fastfcn.progress import Progress


def test_colourize_uses_the_palette_then_voc():
    lab = np.array([[0, 1], [2, 3]])
    out = viz.colourize(lab, [[10, 20, 30], [40, 50, 60]])
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [40, 50, 60]
    assert out[1, 1].tolist() == list(voc_palette(4)[3])


def test_overlay_blends_and_checks_shapes():
    img = np.full((2, 3, 3), 100, np.uint8)
    lab = np.array([[0, 1, 1], [1, 0, 0]])
    pal = [[0, 0, 0], [200, 0, 0]]
    o = viz.overlay(img, lab, pal, alpha=0.25)
    assert o[0, 1].tolist() == [125, 75, 75] and o[0, 0].tolist() == [75, 75, 75]
    with pytest.raises(ValueError, match="same height and width"):
        viz.overlay(img, lab[:, :2], pal)
    from fastfcn.cli import segment

    assert segment.overlay is viz.overlay  # `fastfcn segment` and the demo share it


def test_side_by_side():
    img = np.zeros((4, 5, 3), np.uint8)
    lab = np.ones((4, 5), np.int64)
    out = viz.side_by_side(img, lab, [[0, 0, 0], [1, 2, 3]], gap=2)
    assert out.shape == (4, 12, 3)
    assert out[0, 5].tolist() == [255, 255, 255] and out[0, 7].tolist() == [1, 2, 3]


def test_palette_png_round_trip(tmp_path):
    lab = np.arange(12, dtype=np.uint8).reshape(3, 4)
    viz.save_labels(lab, [[1, 2, 3]], tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P" and im.getpalette()[:6] == [1, 2, 3] + list(voc_palette(2)[1])
        np.testing.assert_array_equal(np.array(im), lab)
    big = np.array([[0, 300]])
    viz.save_labels(big, None, tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        np.testing.assert_array_equal(np.array(im), big)



def test_class_ids_out_of_range_are_refused_not_wrapped(tmp_path):
    """-1 (an ignore index) was coloured and saved as class 255, 70000 saved as 4464; a bool mask
    is classes 0 / 1; a float map stopped with numpy's IndexError."""
    img = np.zeros((1, 2, 3), np.uint8)
    for bad, message in ((np.array([[-1, 0]]), "class ids 0..65535; got values from -1 to 0"),
                         (np.array([[70000, 1]]), "class ids 0..65535; got values from 1 to 70000"),
                         (np.array([[0.0, 1.5]]), "integer class ids; got dtype float64")):  # fmt: skip
        calls = ((viz.save_labels, bad, None, tmp_path / "l.png"), (viz.colourize, bad, None),
                 (viz.overlay, img, bad, None), (viz.side_by_side, img, bad, None))
        for f, *args in calls:
            with pytest.raises(ValueError, match=f"^labels must be {message}$"):
                f(*args)
    assert not (tmp_path / "l.png").exists()
    mask = np.array([[True, False]])
    np.testing.assert_array_equal(viz.overlay(img, mask, None), viz.overlay(img, mask.astype(np.uint8), None))
    viz.save_labels(mask, None, tmp_path / "m.png")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "m.png")), [[1, 0]])
    top = np.array([[65535, 0]])
    viz.save_labels(top, None, tmp_path / "t.png")
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "t.png")), top)

def test_video_progress_line():
    # A known frame count: the bar, as every command draws it.
    buf = io.StringIO()
    bar = Progress(10, "video", stream=buf, unit="frames")
    bar.step(n=4)
    line = buf.getvalue()
    assert line.startswith("video [#########") and "4/10" in line and "frames/s" in line and "eta" in line
    # An unknown frame count (a container without one): a count, no bar; finish() draws the end.
    buf = io.StringIO()
    bar = Progress(None, "video", stream=buf, unit="frames")
    bar.step(n=3)
    assert buf.getvalue() == ""  # not a terminal: at most one line per LOG_EVERY_S
    bar.finish()
    bar.finish()
    assert buf.getvalue().splitlines() == [buf.getvalue().splitlines()[0]]
    assert buf.getvalue().startswith("video 3 frames") and "[" not in buf.getvalue()


def test_progress_estimate_exceeded_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = Progress(2, stream=tty)
    for _ in range(3):  # a video's frame count is an estimate: one more frame than announced
        bar.step()
    bar.finish()
    assert tty.getvalue().count("\n") == 1 and tty.getvalue().endswith("\n")
    assert bar.interrupt() == ""


def test_chart_scales_map_values_to_pixels():
    from fastfcn.charts import Scale

    lin = Scale(0.0, 10.0, 100.0, 200.0)
    assert lin(5.0) == 150.0 and lin.ticks(3) == [0.0, 5.0, 10.0]
    up = Scale(0.0, 1.0, 300.0, 100.0)  # a y axis: larger values higher up
    assert up(1.0) == 100.0 and up(0.25) == 250.0
    log = Scale.decades(3.0, 250.0, 0.0, 300.0)
    assert (log.lo, log.hi) == (1.0, 1000.0) and log.ticks() == [1.0, 10.0, 100.0, 1000.0]
    assert abs(log(10.0) - 100.0) < 1e-9 and abs(log(100.0) - 200.0) < 1e-9
    flat = Scale.padded(2.0, 2.0, 0.0, 10.0)
    assert (flat.lo, flat.hi) == pytest.approx((1.45, 2.55)) and flat(2.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="hi > lo"):
        Scale(1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="lo > 0"):
        Scale(0.0, 10.0, 0.0, 1.0, log=True)
