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
from fastfcn.runtime.commands import overlay
from fastfcn.train import evaluate_model


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
    for b in ("fused", "onnxruntime", "compile", "openvino"):  # each backend either ran or says why not
        assert any(line.startswith(b) for line in text.splitlines()), text
    files = sorted(out.glob("scene_*.png"))
    assert len(files) == 3
    with Image.open(files[0]) as im:
        assert im.size == (2 * (3 * 96 + 8), 2 * 96)


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
