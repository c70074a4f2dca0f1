"""Fuzzing the four loaders (.safetensors, .pt/.pth, .caffemodel, ONNX metadata).

Valid files of a tiny model are mutated (bytes flipped, inserted, cut; header and metadata
values replaced by arbitrary JSON; pickles and protobufs edited) and every outcome must be
a loaded model or a one-line CheckpointError naming the file: no other exception, no
crash, and no allocation past a bound (the address space is capped while the examples run,
so a memory bomb shows as a MemoryError, not as a slow machine). Seeded (derandomize) and
bounded (max_examples, deadline), so a run is repeatable and takes well under a minute.
"""

from __future__ import annotations

import copy
import io
import json
import resource
import warnings
import zipfile
from datetime import timedelta

import pytest
import torch
from helpers import caffe_fcn, tiny_onnx

import fastfcn
from fastfcn.errors import CheckpointError
from fastfcn.models import SegmentationModel, build

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=100, deadline=timedelta(seconds=20), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
# Address space allowed on top of what the process has mapped when the fuzzing starts: a
# loader that believes a mutated size allocates gigabytes and fails here.
HEADROOM = 2 * 2**30


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    cap = mapped + HEADROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _Seeds(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<seed files in {self['dir']}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid files of a tiny FCN-8s (5 classes, width 1/32): the bytes every test mutates."""
    torch.manual_seed(0)
    m = build("fcn8s", num_classes=5, width=1 / 32).eval()
    d = tmp_path_factory.mktemp("fuzz")
    out = _Seeds()
    for name in ("m.safetensors", "m.pt"):
        out[name] = fastfcn.save(m, d / name, class_names=list("abcde")).read_bytes()
    buf = io.BytesIO()
    torch.save(dict(m.state_dict()), buf, _use_new_zipfile_serialization=False)
    out["legacy.pth.tar"] = buf.getvalue()
    out["m.caffemodel"] = caffe_fcn(m, v1=False)
    out["v1.caffemodel"] = caffe_fcn(m, v1=True)
    out["config"] = m.config.to_dict()
    out["dir"] = d
    return out


def _expect_model_or_checkpoint_error(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = fastfcn.load(path, **kw)
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg, msg
            assert msg.startswith(str(path)), msg
            return None
    assert isinstance(model, SegmentationModel)
    return model


# Byte-level edits: (kind, position as a fraction of the region, bytes).
_EDIT = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "cut"]), st.floats(0, 1),
                  st.binary(min_size=1, max_size=8))  # fmt: skip


def _mutate(raw: bytes, edits, lo: int = 0, hi: int | None = None) -> bytes:
    """Apply edits at positions inside raw[lo:hi] (default: the whole file)."""
    b = bytearray(raw)
    for kind, frac, data in edits:
        end = len(b) if hi is None else min(hi, len(b))
        if end <= lo:
            break
        i = lo + int(frac * (end - lo - 1))
        if kind == "flip":
            b[i] ^= data[0] or 0xFF
        elif kind == "set":
            b[i:i + len(data)] = data
        elif kind == "insert":
            b[i:i] = data
        elif kind == "delete":
            del b[i:i + len(data)]
        else:
            del b[i:]
    return bytes(b)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _replace_somewhere(obj, path_choice: list[int], value):
    """obj with the value at a path (chosen by indices into keys/items) replaced."""
    obj = copy.deepcopy(obj)
    parent, key = None, None
    node = obj
    for c in path_choice:
        if isinstance(node, dict) and node:
            k = sorted(node)[c % len(node)]
        elif isinstance(node, list) and node:
            k = c % len(node)
        else:
            break
        parent, key, node = node, k, node[k]
    if parent is None:
        return value
    parent[key] = value
    return obj


# ----------------------------------------------------------------------------------------- safetensors


def _st_parts(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _st_join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4), header_only=st.booleans())
def test_fuzz_safetensors_bytes(seeds, edits, header_only):
    raw = seeds["m.safetensors"]
    n = int.from_bytes(raw[:8], "little")
    path = seeds["dir"] / "b.safetensors"
    path.write_bytes(_mutate(raw, edits, 0, 8 + n if header_only else None))
    _expect_model_or_checkpoint_error(path)


@FUZZ
@given(where=st.lists(st.integers(0, 50), min_size=1, max_size=4), value=_JSON,
       in_config=st.booleans())  # fmt: skip
def test_fuzz_safetensors_header_and_metadata_values(seeds, where, value, in_config):
    header, data = _st_parts(seeds["m.safetensors"])
    if in_config:
        config = json.loads(header["__metadata__"]["fastfcn"])
        header["__metadata__"]["fastfcn"] = json.dumps(_replace_somewhere(config, where, value))
    else:
        header = _replace_somewhere(header, where, value)
    path = seeds["dir"] / "h.safetensors"
    path.write_bytes(_st_join(header, data))
    _expect_model_or_checkpoint_error(path)


# --------------------------------------------------------------------------------------------- torch


def _rezip(raw: bytes, member_suffix: str, edit) -> bytes:
    """The zip with one member's bytes passed through ``edit`` (stored, as torch.save writes)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info.filename, edit(data) if info.filename.endswith(member_suffix) else data)
    return out.getvalue()


@FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4), target=st.sampled_from(["zip", "pickle", "legacy"]))
def test_fuzz_torch_files(seeds, edits, target):
    if target == "zip":
        raw, name = _mutate(seeds["m.pt"], edits), "z.pt"
    elif target == "pickle":
        raw, name = _rezip(seeds["m.pt"], "data.pkl", lambda b: _mutate(b, edits)), "p.pth"
    else:
        raw, name = _mutate(seeds["legacy.pth.tar"], edits), "checkpoint.pth.tar"
    path = seeds["dir"] / name
    path.write_bytes(raw)
    _expect_model_or_checkpoint_error(path)


@FUZZ
@given(where=st.lists(st.integers(0, 50), min_size=1, max_size=3), value=_JSON)
def test_fuzz_torch_config_values(seeds, where, value):
    obj = torch.load(io.BytesIO(seeds["m.pt"]), weights_only=True)
    obj["config"] = _replace_somewhere(obj["config"], where, value)
    path = seeds["dir"] / "c.pt"
    try:
        torch.save(obj, path)
    except Exception:  # a value torch.save itself cannot write (e.g. a huge int): not a file
        return
    _expect_model_or_checkpoint_error(path)


# ---------------------------------------------------------------------------------------- caffemodel


@FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=4), v1=st.booleans(), head=st.booleans(),
       arch=st.sampled_from([None, "fcn8s-atonce", "deconvnet"]))  # fmt: skip
def test_fuzz_caffemodel(seeds, edits, v1, head, arch):
    raw = seeds["v1.caffemodel" if v1 else "m.caffemodel"]
    # head: edits within the first 2 kB, where the layer structure (names, shapes, lengths) sits.
    path = seeds["dir"] / "m.caffemodel"
    path.write_bytes(_mutate(raw, edits, 0, 2048 if head else None))
    _expect_model_or_checkpoint_error(path, arch=arch, strict=arch is None)


# ---------------------------------------------------------------------------------------- onnx metadata


@FUZZ
@given(where=st.lists(st.integers(0, 50), min_size=1, max_size=3), value=_JSON,
       edits=st.lists(_EDIT, max_size=3), export=st.booleans())  # fmt: skip
def test_fuzz_onnx_metadata(seeds, where, value, edits, export):
    from fastfcn.config import validate_config
    from fastfcn.export import read_onnx_metadata

    config = seeds["config"]
    good_export = {"precision": "fp32", "dynamic": True, "opset": 18, "input": "input", "output": "logits"}
    if export:
        meta_export = _mutate(json.dumps(_replace_somewhere(good_export, where, value)).encode(), edits)
        meta_config = config
    else:
        meta_config = _mutate(json.dumps(_replace_somewhere(config, where, value)).encode(), edits)
        meta_export = good_export
    path = seeds["dir"] / "m.onnx"
    def text(v):
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

    tiny_onnx(path, text(meta_config), channels=config["num_classes"], export=text(meta_export))
    try:
        got = read_onnx_metadata(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)
        return
    got.pop("export")
    got.pop("fastfcn_version", None)
    # What comes back is a valid config for this graph.
    assert validate_config(got, path) == got
    assert got["num_classes"] == config["num_classes"]
