"""ONNX export: every arch at dynamic sizes against the reference forward, the checker,
metadata, static and fp16 export, and the onnxruntime backend.

Exports are slow (torch.export on symbolic shapes), so each model is exported once per
session (the ``exported`` fixture of conftest.py) and every test reuses the file.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from helpers import export_model, tiny_onnx

import fastfcn
from fastfcn import models
from fastfcn.errors import BackendUnavailableError, CheckpointError, InputError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fastfcn.export import export_onnx, read_onnx_metadata  # noqa: E402
from fastfcn.runtime.ort import OnnxRuntimeBackend, available  # noqa: E402
from fastfcn.runtime.registry import backend_spec  # noqa: E402

WIDTH = 0.125
# Sizes other than the traced one (2x3x259x291): odd sides, batch 2, a 1x1 image, and one
# side over 224 (DeconvNet pads to 256 there instead of 224; its fc6 map is 2 wide, not 1).
SIZES = [(2, 37, 51), (1, 1, 1), (1, 250, 61)]
# fp32 graph vs eager fp32: max |error| relative to the logits' range. Measured 4e-8 to
# 1.3e-6 over all archs and sizes up to 300x260 (largest: dilated-context, whose context
# module sums over 67x67 windows; float32 eps is 1.2e-7 and the two differ only in the
# order of the same float32 additions); 1e-5 leaves an 8x margin.
FP32_TOL = 1e-5


def _model(arch: str, width: float = WIDTH):
    return export_model(arch, width)


def _input(n, h, w, seed=1, channels=3):
    g = torch.Generator().manual_seed(seed)
    # Preprocessed Caffe-style input: BGR minus mean, unscaled, roughly -120..130.
    return torch.rand(n, channels, h, w, generator=g) * 255 - 120


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def agreement(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(max |out - ref| / range(ref), fraction of identical labels, fraction of pixels whose
    label differs although the reference's top-2 margin exceeds twice the max error)."""
    rng = float(ref.max() - ref.min()) or 1.0
    err = float(np.abs(out - ref).max()) / rng
    lo, lr = out.argmax(1), ref.argmax(1)
    same = float((lo == lr).mean())
    top2 = np.sort(ref, axis=1)
    margin = (top2[:, -1] - top2[:, -2]) / rng
    clear_flips = float(((lo != lr) & (margin > 2 * err)).mean())
    return err, same, clear_flips


# Every arch but three whose graphs hold no op the others lack (an export costs 12-37 s here):
# siftflow-fcn16s's heads are siftflow-fcn8s's minus a stage; the PASCAL-Context nets are the
# VOC graphs with 60 channels (pascalcontext-fcn8s is exported, and the VOC fcn32s / fcn16s).
EXPORT_ARCHS = [a for a in models.available()
                if a not in ("siftflow-fcn16s", "pascalcontext-fcn32s", "pascalcontext-fcn16s")]


@pytest.mark.slow
@pytest.mark.parametrize("arch", EXPORT_ARCHS)
def test_dynamic_export_matches_reference(arch, exported):
    model, path = exported(arch)
    sess = _session(path)
    for n, h, w in SIZES:
        x = _input(n, h, w, channels=model.in_channels)  # NYUDv2 fusion: 4 or 6 channels
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(["logits"], {"input": x.numpy()})[0]
        assert out.shape == ref.shape == (n, model.num_classes, h, w), (arch, (n, h, w))
        err, same, clear_flips = agreement(out, ref)
        assert err <= FP32_TOL, f"{arch} at {(n, h, w)}: relative logit error {err:.2e}"
        # A label may flip only where the reference itself is tied to within the error.
        assert clear_flips == 0, f"{arch} at {(n, h, w)}: labels differ ({same:.6f} identical)"


def test_graph_is_valid_and_named(exported):
    _, path = exported("deconvnet")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert dims(proto.graph.input[0]) == ["batch", 3, "height", "width"]
    assert dims(proto.graph.output[0]) == ["batch", 21, "height", "width"]
    ops = {n.op_type for n in proto.graph.node}
    # Unpooling is exported as a scatter into per-plane positions, never as ONNX MaxUnpool
    # (whole-tensor indices, and no kernel in ORT's CUDA provider).
    assert "MaxUnpool" not in ops and "ScatterND" in ops, sorted(ops)


def test_unpool_indices_are_per_image(exported):
    """Batch > 1 with different images: each image's result equals its result alone. A graph
    that used PyTorch's per-plane indices as ONNX whole-tensor ones would scatter image 1's
    values into image 0's planes."""
    model, path = exported("deconvnet")
    sess = _session(path)
    x = _input(3, 45, 70, seed=7)
    both = sess.run(["logits"], {"input": x.numpy()})[0]
    for i in range(3):
        alone = sess.run(["logits"], {"input": x[i : i + 1].numpy()})[0]
        np.testing.assert_allclose(both[i : i + 1], alone, rtol=0, atol=1e-5 * float(np.ptp(alone)))


def test_metadata_round_trip(exported):
    model, path = exported("dilated-context")
    meta = read_onnx_metadata(path)
    export = meta.pop("export")
    assert meta.pop("fastfcn_version") == fastfcn.__version__
    assert meta == json.loads(json.dumps(model.config.to_dict()))
    assert export["precision"] == "fp32" and export["dynamic"] is True
    assert export["input"] == "input" and export["output"] == "logits" and export["opset"] >= 18


def test_metadata_missing_or_not_onnx(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g), str(plain))
    with pytest.raises(CheckpointError, match="no fastfcn metadata"):
        read_onnx_metadata(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        read_onnx_metadata(junk)
    with pytest.raises(FileNotFoundError):
        read_onnx_metadata(tmp_path / "missing.onnx")


def test_static_export_from_checkpoint(tmp_path):
    model = _model("fcn16s")
    ckpt = fastfcn.save(model, tmp_path / "m.safetensors", class_names=[f"c{i}" for i in range(21)])
    path = export_onnx(ckpt, tmp_path / "static.onnx", dynamic=False, input_size=(45, 61), batch_size=2)
    sess = _session(path)
    assert sess.get_inputs()[0].shape == [2, 3, 45, 61]
    x = _input(2, 45, 61)
    with torch.no_grad():
        ref = model(x).numpy()
    err, _, flips = agreement(sess.run(["logits"], {"input": x.numpy()})[0], ref)
    assert err <= FP32_TOL and flips == 0
    meta = read_onnx_metadata(path)
    assert meta["class_names"][3] == "c3" and meta["export"]["dynamic"] is False
    assert meta["export"]["input_shape"] == [2, 3, 45, 61]


def test_export_leaves_the_model_alone(exported):
    model = _model("fcn32s").train().set_impl("reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="precision"):
        export_onnx(model, "unused.onnx", precision="bf16")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, "unused.onnx", opset=11)
    with pytest.raises(TypeError, match="fastfcn model"):
        export_onnx(torch.nn.Conv2d(3, 3, 1), "unused.onnx")
    with pytest.raises(CheckpointError):
        export_onnx(__file__, "unused.onnx")  # not a checkpoint
    assert model.training and model.impl == "reference"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("before,after", [(186, 186), (186, 193), (33, 33), (0, 5), (3, 0), (40, 1)])
def test_symbolic_reflect_pad_matches_loop(before, after):
    """The dilated net's reflect padding as exported (an index gather) equals the eager loop
    of repeated reflections, sides of 1 (replicated) included."""
    from fastfcn.models.dilated import _reflect_index, reflect_pad

    for n in list(range(1, 40)) + [93, 186, 187, 250]:
        x = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1)
        want = reflect_pad(x, before, after, 0, 0)[0, 0, :, 0].long()
        assert torch.equal(_reflect_index(n, before, after, "cpu"), want), n


# ----------------------------------------------------------------------- onnxruntime backend


def test_backend_available_reports_reason():
    assert available("cpu", "fp32") == (True, "")
    ok, why = available("cpu", "tf32")
    assert not ok and "CUDA" in why
    ok, why = available("cpu", "bf16")
    assert not ok and "precision" in why
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        ok, why = available("cuda", "fp32")
        assert not ok and "onnxruntime-gpu" in why
        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            OnnxRuntimeBackend("whatever.onnx", "cuda", "fp32")


def test_backend_from_onnx_file(exported):
    model, path = exported("fcn8s-atonce")
    be = OnnxRuntimeBackend(path, "cpu", "auto")
    assert be.precision == "fp32" and be.config["arch"] == "fcn8s-atonce"
    x = _input(2, 41, 29)
    with torch.no_grad():
        ref = model(x)
    logits = be(x, "logits")
    assert isinstance(logits, torch.Tensor) and logits.dtype == torch.float32 and logits.shape == ref.shape
    err, _, flips = agreement(logits.numpy(), ref.numpy())
    assert err <= FP32_TOL and flips == 0
    labels = be(x, "labels")
    assert labels.dtype == torch.uint8 and labels.shape == (2, 41, 29)
    assert torch.equal(labels, logits.argmax(1).to(torch.uint8))
    probs = be(x, "probs")
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 41, 29), rtol=0, atol=1e-5)
    with pytest.raises(BackendUnavailableError, match="exported at fp32"):
        OnnxRuntimeBackend(path, "cpu", "fp16")
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        be(torch.zeros(1, 4, 8, 8))
    with pytest.raises(InputError, match="float"):
        be(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="output"):
        be(x, "scores")


# fp16 agreement against the fp32 reference, measured on FCN-8s at width 0.25 with these
# inputs: relative logit error 5.9e-4 at every size and 99.87 .. 99.90% identical labels
# (torch's own fp16 forward on the CPU: 1.0e-3 and 99.79 .. 99.89%; the flips sit on
# near-ties). Bounds: 5e-3 (8x the measured error, 10x fp16's unit roundoff 4.9e-4) and
# 99.5% identical labels; and no worse than 2x torch's fp16 error at the same inputs.
FP16_TOL = backend_spec("onnxruntime").tolerance["fp16"].logits
FP16_LABELS = backend_spec("onnxruntime").tolerance["fp16"].labels


def test_fp16_export_agreement():
    model = _model("fcn8s", width=0.25)
    be = OnnxRuntimeBackend(model, "cpu", "fp16")
    assert be.precision == "fp16" and be.config["export"]["precision"] == "fp16"
    proto = onnx.load(str(be.onnx_path))
    inits = {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer if len(t.dims) == 4}
    assert inits == {"FLOAT16"}, inits  # conv weights really are half precision
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    half = copy.deepcopy(model).half()
    for n, h, w in [(2, 75, 61), (1, 128, 97)]:
        x = _input(n, h, w, seed=h)
        with torch.no_grad():
            ref = model(x).numpy()
            torch_half = half(x.half()).float().numpy()
        out = be(x, "logits").numpy()
        assert out.dtype == np.float32
        err, same, _ = agreement(out, ref)
        torch_err, torch_same, _ = agreement(torch_half, ref)
        assert err <= FP16_TOL and same >= FP16_LABELS, (n, h, w, err, same)
        assert err <= 2 * torch_err, (err, torch_err)


# ------------------------------------------------------------------------- metadata and graph validated


def _config(**kw):
    config = models.build("fcn32s", num_classes=5, width=0.0625).config.to_dict()
    config.update(kw)
    return config


def test_tiny_graph_with_valid_metadata_loads_and_runs(tmp_path):
    path = tiny_onnx(tmp_path / "t.onnx", _config())
    meta = read_onnx_metadata(path)
    assert meta["num_classes"] == 5 and meta["export"]["dynamic"] is True
    labels = OnnxRuntimeBackend(path)(torch.randn(2, 3, 7, 9), output="labels")
    assert labels.shape == (2, 7, 9)


@pytest.mark.parametrize(
    "config, problem",
    [
        ("{not json", "corrupt fastfcn metadata"),
        ("[1, 2]", r"not a JSON object"),
        ('{"arch": "fcn32s"}', "num_classes must be an int"),
        ('{"arch": ["fcn32s"], "num_classes": 5, "width": 1}', r"unknown arch \['fcn32s'\]"),
        (_config(mean=[float("nan"), 0.0, 0.0]), "mean must be 3 finite numbers"),
        (_config(std=[1e-30, 1.0, 1.0]), r"std must be positive, in \[0.0001, 10000\]"),
        (_config(num_classes=50_000_000), r"num_classes must be an int in 1..4096"),
        (_config(width=4.5), r"width must be a number in \(0, 4\]"),
        (_config(options={"dropout": "half"}), r"options.dropout must be a number"),
        (_config(options=[1]), "options must be a dict"),
        (_config(class_names=["a"] * 4), "class_names has 4 entries"),
        (_config(input_scale=float("inf")), "input_scale must be a positive number"),
        ("[" * 50_000 + "]" * 50_000, "nested deeper than 32 levels"),
        (json.dumps(_config(meta={"pad": "x" * (4 * 2**20)})), r"fastfcn metadata is 4194\d{3} bytes"),
    ],
)
def test_onnx_metadata_goes_through_the_checkpoint_validator(tmp_path, config, problem):
    path = tiny_onnx(tmp_path / "t.onnx", config, channels=5)
    with pytest.raises(CheckpointError, match=f"t.onnx: .*{problem}") as e:
        read_onnx_metadata(path)
    assert "\n" not in str(e.value)
    # The backend and the Segmenter read the file through the same function.
    with pytest.raises(CheckpointError, match=problem):
        OnnxRuntimeBackend(path)


@pytest.mark.parametrize(
    "kw, problem",
    [
        ({"channels": 3}, "the output has 3 channels; the metadata says num_classes=5"),
        ({"input_dims": [1, 3, 8, 8]}, r"recorded as dynamic but the input has fixed dims \[1, 8, 8\]"),
        ({"input_dims": ["batch", 4, "height", "width"]}, "the input has 4 channels; expected 3"),
        ({"output_dims": ["batch", 5, "height"]}, "output 'logits' is not 4-D"),
        ({"export": {"dynamic": False, "input_shape": [1, 3, 8, 8]}, "input_dims": [1, 3, 8, 9],
          "output_dims": [1, 5, 8, 9]}, r"the input is \[1, 3, 8, 9\]; the metadata says \[1, 3, 8, 8\]"),
        ({"export": {"dynamic": False, "input_shape": [1, 3, 8, 8]}, "input_dims": [1, 3, 8, 8],
          "output_dims": [1, 5, 4, 8]}, "the output's H is 4 for an input H of 8"),
        ({"export": {"precision": "fp64"}}, "precision must be one of"),
        ({"export": {"input": "x"}}, "the input is named 'input'; the metadata says 'x'"),
    ],
)
def test_forged_metadata_on_another_graph_is_refused(tmp_path, kw, problem):
    path = tiny_onnx(tmp_path / "t.onnx", _config(), **kw)
    with pytest.raises(CheckpointError, match=problem):
        read_onnx_metadata(path)


def test_static_graph_matching_its_metadata_loads(tmp_path):
    path = tiny_onnx(tmp_path / "t.onnx", _config(), input_dims=[2, 3, 8, 8], output_dims=[2, 5, 8, 8],
                     export={"dynamic": False, "input_shape": [2, 3, 8, 8]})  # fmt: skip
    assert read_onnx_metadata(path)["export"]["input_shape"] == [2, 3, 8, 8]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_static_graph_refuses_other_shapes_with_an_input_error(tmp_path, backend):
    # Every ONNX backend answers a static graph's wrong input shape alike, with one InputError
    # line (ONNX Runtime raised its own InvalidArgument).
    if backend == "openvino":
        pytest.importorskip("openvino")
    path = tiny_onnx(tmp_path / "t.onnx", _config(), input_dims=[2, 3, 8, 8], output_dims=[2, 5, 8, 8],
                     export={"dynamic": False, "input_shape": [2, 3, 8, 8]})  # fmt: skip
    seg = fastfcn.Segmenter(path, device="cpu", backend=backend, precision="fp32")
    assert seg.run(np.zeros((2, 8, 8, 3), np.uint8)).shape == (2, 8, 8)
    for images, got in ((np.zeros((1, 8, 8, 3), np.uint8), "(1, 3, 8, 8)"),
                        (np.zeros((2, 8, 9, 3), np.uint8), "(2, 3, 8, 9)")):  # fmt: skip
        want = f"t.onnx was exported with the static input shape (2, 3, 8, 8); got {got}"
        with pytest.raises(InputError, match=re.escape(want)) as e:
            seg.run(images)
        assert "\n" not in str(e.value)


def _external_weight(path, location: str):
    """The tiny graph of ``path`` with its weight moved to external data at ``location``."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(path))
    w = proto.graph.initializer[0]
    data = numpy_helper.to_array(w).tobytes()
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("length", str(len(data)))):
        w.external_data.add(key=key, value=value)
    onnx.save(proto, str(path))
    return data


@pytest.mark.parametrize("location", ["../secret.bin", "/tmp/secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path, location):
    # A hostile .onnx naming a file outside its folder: refused by name before any runtime opens
    # it (OpenVINO's own refusal was a multi-line C++ trace, as BackendUnavailableError).
    (tmp_path / "models").mkdir()
    path = tiny_onnx(tmp_path / "models" / "t.onnx", _config())
    _external_weight(path, location)
    want = f"t.onnx: tensor 'w' keeps its data in {location!r}, outside the model's folder"
    for load in (read_onnx_metadata, fastfcn.Segmenter):
        with pytest.raises(CheckpointError, match=re.escape(want)) as e:
            load(path)
        assert "\n" not in str(e.value)


def test_external_data_of_a_constant_node_is_checked_too(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    path = tiny_onnx(tmp_path / "t.onnx", _config())
    proto = onnx.load(str(path))
    c = helper.make_tensor("k", TensorProto.FLOAT, [1], [0.0])
    c.ClearField("float_data")
    c.data_location = TensorProto.EXTERNAL
    c.external_data.add(key="location", value="../../etc/passwd")
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["unused"], value=c))
    onnx.save(proto, str(path))
    with pytest.raises(CheckpointError, match="tensor 'k' keeps its data in '../../etc/passwd'"):
        read_onnx_metadata(path)


def test_external_data_beside_the_model_runs(tmp_path):
    path = tiny_onnx(tmp_path / "t.onnx", _config())
    x = np.zeros((1, 4, 5, 3), np.uint8)
    want = fastfcn.Segmenter(path, device="cpu").run(x, output="logits")
    (tmp_path / "t.weights").write_bytes(_external_weight(path, "t.weights"))
    got = fastfcn.Segmenter(path, device="cpu").run(x, output="logits")
    assert torch.equal(got, want)


def test_result_shape_checked_at_run_time(tmp_path):
    # Declared (N, 5, H, W), computes (N, 5, H/2, W/2): only the run shows it.
    path = tiny_onnx(tmp_path / "t.onnx", _config(), stride=2)
    backend = OnnxRuntimeBackend(path)
    want = (r"t.onnx: the graph returned \(\(1, 5, 4, 5\), torch.float32\) for an input of \(1, 3, 8, 9\); "
            r"expected float32 \(1, 5, 8, 9\)")
    with pytest.raises(CheckpointError, match=want):
        backend(torch.randn(1, 3, 8, 9))
