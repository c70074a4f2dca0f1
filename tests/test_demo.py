"""The shipped demo model (accuracy on the held-out split), `fastfcn eval`, and `fastfcn demo` end to end."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import fastfcn
from fastfcn import cli
from fastfcn.data import heldout_scenes
from fastfcn.demo import DEMO_MODEL
from fastfcn.runtime.registry import available_backends
from fastfcn.training import evaluate_model
from fastfcn.viz import overlay


@pytest.fixture(scope="module")
def demo_model():
    if not DEMO_MODEL.is_file():
        pytest.fail(f"the shipped demo model {DEMO_MODEL} is missing")
    return fastfcn.load(DEMO_MODEL)


def test_shipped_model_is_small_and_described(demo_model):
    assert DEMO_MODEL.stat().st_size < 10 * 2**20
    cfg = demo_model.config
    assert cfg["arch"] == "fcn8s" and cfg["width"] <= 0.25
    assert cfg["class_names"][0] == "background" and len(cfg["class_names"]) == cfg["num_classes"]


def test_shipped_model_mean_iu_on_heldout_split(demo_model):
    # A subset of the held-out split (the README states the number on all 500 scenes).
    ds = heldout_scenes(100, num_classes=demo_model.config["num_classes"])
    r = evaluate_model(demo_model, ds, demo_model.config["num_classes"])
    assert r["mean_iu"] >= 0.90, r
    assert np.nanmin(r["per_class_iu"]) >= 0.75, r["per_class_iu"]


def test_eval_command_json(capsys):
    args = ["--data", "synthetic", "--n", "16", "--backend", "torch", "--json"]
    rc = cli.main(["eval", str(DEMO_MODEL), *args])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["images"] == 16 and obj["split"] == "heldout"
    assert 0.8 < obj["mean_iu"] <= 1.0 and obj["pixel_acc"] >= obj["mean_iu"] - 0.1
    assert set(obj["per_class_iu"]) == set(fastfcn.load(DEMO_MODEL).config["class_names"])
    assert np.array(obj["confusion_matrix"]).sum() == 16 * 96 * 96


def test_eval_command_on_voc_layout(tmp_path, capsys):
    out = tmp_path / "voc"
    assert cli.main(["data", "synth", str(out), "--n", "0", "--val-n", "6"]) == 0
    assert cli.main(["eval", str(DEMO_MODEL), "--data", str(out), "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "mean IU" in text and "disc" in text


def test_overlay_keeps_background():
    img = np.full((2, 2, 3), 100, np.uint8)
    lab = np.array([[0, 1], [1, 0]])
    pal = np.array([[0, 0, 0], [200, 0, 0]], np.uint8)
    o = overlay(img, lab, pal, alpha=0.5, skip_background=True)
    assert o[0, 0].tolist() == [100, 100, 100] and o[0, 1].tolist() == [150, 50, 50]


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo-out"
    rc = cli.main(["demo", "--n", "3", "--out", str(out), "--repeats", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "torch" in text and "agree vs torch" in text and str(out) in text
    torch_row = next(line for line in text.splitlines() if line.startswith("torch "))
    assert "100.000%" in torch_row
    for b in available_backends():  # each backend either ran or says why not
        assert any(line.startswith(b) for line in text.splitlines()), text
    files = sorted(out.glob("scene_*.png"))
    assert len(files) == 3
    with Image.open(files[0]) as im:
        assert im.size == (2 * (3 * 96 + 8), 2 * 96)
    av = pytest.importorskip("av")
    assert "stream_overlay.mp4" in text
    with av.open(str(out / "stream_overlay.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 75 and frames[0].shape == (128, 192, 3)  # 3 s at 25 frames/s


def test_moving_scenes_move_rotate_and_are_segmented(demo_model):
    from fastfcn.data import MovingScenes
    from fastfcn.metrics import confusion_matrix, scores

    clip = MovingScenes(30, num_classes=demo_model.config["num_classes"])
    a, b = clip[0], clip[29]
    assert a[0].shape == (128, 192, 3) and a[1].shape == (128, 192)
    np.testing.assert_array_equal(clip[5][1], MovingScenes(30, num_classes=5)[5][1])  # deterministic
    assert (a[1] != b[1]).mean() > 0.05  # the objects moved
    for o in clip.objects:  # each turns, and its centre stays inside the frame (bouncing)
        th = [clip._place(o, k)[2] for k in (0, 29)]
        assert abs(th[1] - th[0]) > 0.5
        for k in range(0, 300, 7):
            y, x, _ = clip._place(o, k)
            assert 0 <= y <= 128 and 0 <= x <= 192
    seg = fastfcn.Segmenter(demo_model, device="cpu")
    frames = [clip[k] for k in range(0, 30, 3)]
    preds = [p.numpy() for p in seg.stream([f for f, _ in frames], batch_size=4)]
    iu = scores(confusion_matrix(np.stack([g for _, g in frames]), np.stack(preds), 5))["mean_iu"]
    assert iu > 0.85, iu  # the demo model on moving scenes (93% mean IU over the 75-frame clip)


def test_demo_skips_a_backend_that_cannot_run_with_its_reason(tmp_path, monkeypatch):
    from fastfcn.demo import run_demo
    from fastfcn.errors import BackendUnavailableError

    real = fastfcn.Segmenter

    def fake(checkpoint, backend="auto", **kw):
        if backend == "onnxruntime":
            raise BackendUnavailableError("onnxruntime is not installed; pip install onnxruntime")
        return real(checkpoint, backend=backend, **kw)

    monkeypatch.setattr(fastfcn, "Segmenter", fake)
    res = run_demo(tmp_path, n=2, backends=["torch", "onnxruntime"], repeats=1, stream=io.StringIO())
    rows = {r["backend"]: r for r in res["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["agreement"] == 1.0
    assert rows["onnxruntime"]["status"] == "skipped" and "not installed" in rows["onnxruntime"]["reason"]
    assert len(res["overlays"]) == 2
