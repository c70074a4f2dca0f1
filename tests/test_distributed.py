"""fastfcn.distributed and `fastfcn batch`: outputs equal to Segmenter.run / segment_video,
exactly once under a killed worker, resume after an interruption, failures recorded.

One local Ray (2 CPUs) for the module; a tiny FCN-8s (width 1/16, 5 classes) at small sizes.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastfcn
from fastfcn import distributed, models
from fastfcn.cli import main
from fastfcn.errors import CheckpointError, InputError
from fastfcn.imageio import read_image
from fastfcn.paths import plan_outputs
from fastfcn.viz import overlay, side_by_side

pytest.importorskip("ray", reason="Ray Data is the ray extra: pip install 'fastfcn[ray]'")
av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'fastfcn[video]'")

from fastfcn.video import segment_video, write_video  # noqa: E402

OPTS = {"backend": "torch", "precision": "fp32"}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
             log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = models.build("fcn8s", width=0.0625, num_classes=5).eval()
    with torch.no_grad():
        model.score_pool3.weight.normal_(0, 1)  # labels follow local content: several classes
    return fastfcn.save(model, tmp_path_factory.mktemp("dist") / "m.safetensors")


@pytest.fixture(scope="module")
def seg(ckpt):
    return fastfcn.Segmenter(str(ckpt), device="cpu", **OPTS)


def photo(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 40.0 * (seed % 6))], -1)
    return np.clip(img + rng.normal(0, 40, img.shape), 0, 255).astype(np.uint8)


def images(folder: Path, n: int, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + n):
        p = folder / f"cam{i % 2}" / f"img{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(i, 24 + 4 * (i % 3), 32)).save(p)
        paths.append(p)
    return paths


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ without Ray


def test_inputs_folders_globs_and_uris(tmp_path):
    src = tmp_path / "in"
    imgs = images(src, 4)
    (src / "notes.txt").write_text("not an image")
    write_video(src / "clip.mp4", [photo(k, 32, 48) for k in range(3)])
    out = src / "out"  # inside the input folder: skipped while walking
    images(out, 1)
    found = distributed.collect_inputs([src], out)
    assert [f for f, _ in found] == sorted(map(str, [*imgs, src / "clip.mp4"]), key=lambda s: (
        Path(s).parent != src, s))  # fmt: skip
    assert {b for _, b in found} == {str(src)}
    globbed = distributed.collect_inputs([str(src / "cam*" / "*.png")], tmp_path / "o")
    assert [f for f, _ in globbed] == sorted(map(str, imgs))
    assert {b for _, b in globbed} == {str(src)}
    uri = distributed.collect_inputs([f"file://{src}/cam1"], tmp_path / "o")
    assert [f for f, _ in uri] == [f"file://{p}" for p in sorted(imgs) if p.parent.name == "cam1"]
    whole = distributed.collect_inputs([f"file://{src}"], out)  # the outputs of a run before: not inputs
    assert sorted(f for f, _ in whole) == sorted(f"file://{f}" for f, _ in found)
    with pytest.raises(InputError, match="holds the input"):
        distributed.collect_inputs([f"file://{out}/cam0"], out)
    with pytest.raises(InputError, match="no such file"):
        distributed.collect_inputs([tmp_path / "missing"], tmp_path / "o")
    with pytest.raises(InputError, match="holds the input"):
        distributed.collect_inputs([out / "cam0"], out)
    with pytest.raises(InputError, match="not an image"):
        distributed.collect_inputs([src / "notes.txt"], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        distributed.collect_inputs([src, tmp_path / "empty"], tmp_path / "o")
    with pytest.raises(InputError, match="no image or video matches"):
        distributed.collect_inputs([str(src / "*.jpg")], tmp_path / "o")
    with pytest.raises(InputError, match="no images or videos here"):
        distributed.collect_inputs([f"file://{src}/cam*/*.jpg"], tmp_path / "o")


def test_a_recursive_glob_enters_each_folder_once(tmp_path, monkeypatch):
    """``**`` lists what glob lists on a tree of folders (a link to a folder elsewhere
    followed), and a symlink loop under it neither repeats the images at every depth nor runs
    without end (glob follows both links); a link to a folder of the tree adds no second name.
    The same for a file:// folder (hidden files included, as pyarrow lists them)."""
    import glob

    root = tmp_path / "root"
    for rel in ("in/a.png", "in/.h.png", "in/.hid/b.png", "in/x/c.png", "in/x/y/d.jpg", "in/x/y/z/e.png",
                "in/w/f.png", "../ext/g.png"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "in" / "w" / "linked").symlink_to(tmp_path / "ext")
    monkeypatch.chdir(root)
    for pattern in ("in/**/*.png", "in/**", "in/**/y/*.jpg", "**/*.png", "in/*/**/*.png", "in/**/z/**/*",
                    f"{root}/in/**/*.png"):  # fmt: skip
        want = sorted(os.path.abspath(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        got = sorted(os.path.abspath(f) for f in distributed._glob(pattern) if os.path.isfile(f))
        assert got == sorted(set(want)), pattern
    before = distributed.collect_inputs(["in/**/*.png"], tmp_path / "o")
    assert [f for f, _ in before] == [str(root / "in" / r) for r in ("a.png", "w/f.png", "w/linked/g.png",
                                                                      "x/c.png", "x/y/z/e.png")]  # fmt: skip
    (root / "in" / "up").symlink_to(root)  # loops: glob would list 2^40 paths
    (root / "in" / "x" / "self").symlink_to(root / "in" / "x")
    (root / "in" / "w" / "again").symlink_to(root / "in" / "x")
    assert distributed.collect_inputs(["in/**/*.png"], tmp_path / "o") == before
    uris = distributed.collect_inputs([f"file://{root}/in"], tmp_path / "o")  # pyarrow follows links
    names = (".h.png", ".hid/b.png", "a.png", "w/f.png", "w/linked/g.png", "x/c.png", "x/y/d.jpg",
             "x/y/z/e.png")  # fmt: skip
    assert [f for f, _ in uris] == [f"file://{root}/in/{r}" for r in names]


def test_plan_names_outputs_as_segment_does(tmp_path):
    found = [(str(tmp_path / "a" / "x.png"), str(tmp_path)), (str(tmp_path / "b" / "x.jpg"), str(tmp_path)),
             (str(tmp_path / "b" / "y.mp4"), str(tmp_path))]  # fmt: skip
    tasks = distributed.plan(found, tmp_path / "o", ("overlay", "side-by-side"))
    jobs = plan_outputs([(Path(f), Path(b)) for f, b in found], tmp_path / "o")
    assert [t.outputs[:2] for t in tasks[:2]] == [(str(j.labels), str(j.overlay)) for j in jobs[:2]]
    assert tasks[0].outputs[2] == str(tmp_path / "o" / "side-by-side" / "a" / "x.png")
    assert tasks[2].kind == "video" and tasks[2].outputs == tuple(
        str(tmp_path / "o" / d / "b" / f) for d, f in
        (("labels", "y.mkv"), ("overlays", "y.mp4"), ("side-by-side", "y.mp4")))  # fmt: skip
    uri = distributed.plan([("s3://bkt/cam/z.png", "s3://bkt")], tmp_path / "o", ())
    assert uri[0].outputs == (str(tmp_path / "o" / "labels" / "cam" / "z.png"),)


def test_manifest_completeness_and_truncated_lines(tmp_path):
    out = tmp_path / "o.png"
    out.write_bytes(b"12345")
    task = distributed.Task("in.png", "image", (str(out),))
    ok = {"input": "in.png", "status": "ok", "outputs": [str(out)], "sizes": [5]}
    assert distributed.is_complete(ok, task)
    assert not distributed.is_complete({**ok, "status": "failed"}, task)
    assert not distributed.is_complete({**ok, "sizes": [4]}, task)  # cut short
    assert not distributed.is_complete(ok, distributed.Task("in.png", "image", (str(out), "ov.png")))
    out.unlink()
    assert not distributed.is_complete(ok, task)
    m = tmp_path / "manifest.jsonl"
    m.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "sizes": [9]}) + "\n" + '{"input": "b.png", "st')
    assert distributed.read_manifest(m) == {"in.png": {**ok, "sizes": [9]}}  # the last row wins
    other = {**ok, "input": "c.png"}
    manifest = distributed.Manifest(m, distributed.read_manifest(m))
    manifest.add(other)  # after the cut line, not glued onto it
    assert distributed.read_manifest(m) == {"in.png": {**ok, "sizes": [9]}, "c.png": other}
    manifest.close(["c.png"])
    assert [json.loads(line)["input"] for line in m.read_text().splitlines()] == ["c.png", "in.png"]
    # a driver killed while compacting leaves the manifest's temporary beside it: removed as stale
    left = tmp_path / f".manifest{distributed.TMP_TAG}4242-0badcafe.jsonl"
    left.write_text("half")
    keep = tmp_path / "labels" / "a.png"  # an output: kept
    keep.parent.mkdir()
    keep.write_bytes(b"x")
    assert distributed.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.png", "manifest.jsonl"]


def test_a_damaged_manifest_redoes_the_damaged_rows_only(tmp_path):
    """Lines that are no row (bytes that are not UTF-8, an input that is not a string, fields
    of the wrong type) are inputs to do again, not a crash that blocks every later run."""
    out = tmp_path / "o.png"
    out.write_bytes(b"12345")
    task = distributed.Task("in.png", "image", (str(out),))
    ok = {"input": "in.png", "status": "ok", "outputs": [str(out)], "sizes": [5]}
    m = tmp_path / "manifest.jsonl"
    m.write_bytes(b"\xff\xfe\x00garbage\n" + json.dumps(ok).encode() + b"\n"
                  + json.dumps({**ok, "input": ["in.png"]}).encode() + b"\n")
    assert distributed.read_manifest(m) == {"in.png": ok}
    for bad in ({**ok, "outputs": 5}, {**ok, "sizes": 5}, {**ok, "sizes": None}, {**ok, "outputs": None}):
        assert not distributed.is_complete(bad, task), bad
    assert distributed.is_complete(ok, task)


def test_an_input_edited_in_place_is_due_again(tmp_path):
    """A row records its local input's (and second input's) size and mtime: resume redoes an
    input rewritten or touched at the same path; a row of an older manifest, without stamps, is
    checked as before; ``stamp`` never asks about a URI (its listing stamps it)."""
    src, depth, out = tmp_path / "in.png", tmp_path / "in_depth.png", tmp_path / "o.png"
    src.write_bytes(b"image")
    depth.write_bytes(b"depth")
    out.write_bytes(b"12345")
    task = distributed.Task(str(src), "image", (str(out),), str(depth))
    row = {"input": str(src), "status": "ok", "outputs": [str(out)], "sizes": [5], "second": str(depth),
           "stamp": distributed.stamp(str(src)), "second_stamp": distributed.stamp(str(depth))}  # fmt: skip
    assert row["stamp"] == [5, os.stat(src).st_mtime_ns]
    assert distributed.is_complete(row, task)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, newer
    assert not distributed.is_complete(row, task)
    row["stamp"] = distributed.stamp(str(src))
    depth.write_bytes(b"other depth")
    assert not distributed.is_complete(row, task)
    old = {k: v for k, v in row.items() if k not in ("stamp", "second_stamp")}
    assert distributed.is_complete(old, task)  # an older manifest's row: paths and sizes only
    assert distributed.stamp("s3://bucket/a.png") is None
    assert distributed.stamp(str(tmp_path / "gone")) is None


def test_a_run_never_overwrites_the_outputs_of_another_runs_inputs(tmp_path, ckpt):
    """cam1/ then cam2/ into one folder, both holding f.png: the second run would write the
    labels/f.png the manifest records for cam1/f.png; it stops before Ray, naming both, and
    leaves the file as it was. Inputs named again, outputs gone, or the other input gone (a
    renamed file) are no clash."""
    out = tmp_path / "out"
    cam1, cam2 = tmp_path / "cam1" / "f.png", tmp_path / "cam2" / "f.png"
    for p in (cam1, cam2):
        p.parent.mkdir()
        Image.fromarray(photo(1)).save(p)
    labels = out / "labels" / "f.png"
    labels.parent.mkdir(parents=True)
    labels.write_bytes(b"cam1's labels")
    row = {"input": str(cam1), "kind": "image", "status": "ok", "outputs": [str(labels)], "sizes": [13],
           "stamp": distributed.stamp(str(cam1))}  # fmt: skip
    (out / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=rf"{cam2} would overwrite {labels}, the output of {cam1} recorded"):
        distributed.segment_dataset([cam2.parent], out, ckpt, **OPTS)
    assert labels.read_bytes() == b"cam1's labels"
    assert rows(out) == [row]
    tasks = distributed.plan([(str(cam1), str(cam1.parent))], out, ())
    distributed._check_not_claimed(tasks, tasks, {str(cam1): row}, out / "manifest.jsonl")  # its own
    gone = str(tmp_path / "cam1" / "renamed-since.png")
    moved = {gone: {**row, "input": gone}}
    tasks = distributed.plan([(str(cam2), str(cam2.parent))], out, ())
    distributed._check_not_claimed(tasks, tasks, moved, out / "manifest.jsonl")  # that input is gone
    labels.unlink()
    tasks = distributed.plan([(str(cam2), str(cam2.parent))], out, ())
    distributed._check_not_claimed(tasks, tasks, {str(cam1): row}, out / "manifest.jsonl")  # nothing to lose


def test_bad_options_and_missing_ray(tmp_path, ckpt, monkeypatch):
    bad = (({"batch_size": 0}, "batch_size"), ({"concurrency": 0}, "concurrency"), ({"mode": "x"}, "mode"),
           ({"num_gpus_per_worker": -1}, "num_gpus_per_worker"),
           ({"num_gpus_per_worker": float("nan")}, "num_gpus_per_worker"),  # it passed `< 0`: KeyError 'GPU'
           ({"num_gpus_per_worker": float("inf")}, "num_gpus_per_worker"))  # fmt: skip
    for kw, msg in bad:
        with pytest.raises(InputError, match=msg):
            distributed.segment_dataset([tmp_path], tmp_path / "o", ckpt, **kw)
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        distributed.segment_dataset([tmp_path], tmp_path / "o", ckpt, backend="tensorrt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):  # before Ray is asked for anything
        distributed.segment_dataset([tmp_path], tmp_path / "o", bad)
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="URIs are for inputs"):
        distributed.segment_dataset([tmp_path], "s3://bucket/out", ckpt)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r"fastfcn\[ray\]"):
        distributed._ray()


def test_cli_starts_a_local_ray_without_address(ckpt, tmp_path):
    """In a fresh process (this module's Ray is not running yet): Ray is started and stopped;
    the built-in model by its name."""
    import subprocess

    images(tmp_path / "in", 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    p = subprocess.run([sys.executable, "-m", "fastfcn", "batch", "demo", str(tmp_path / "in"), "--out",
                        str(tmp_path / "out"), "--workers", "1", "--backend", "torch", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "3 done, 0 skipped (complete before), 0 failed" in p.stderr
    assert len(rows(tmp_path / "out")) == 3


# --------------------------------------------------------------------------------- with Ray


def test_gpus_the_cluster_lacks_are_refused(ray_local, ckpt, tmp_path):
    images(tmp_path / "in", 1)
    with pytest.raises(InputError, match="num_gpus_per_worker=1 but the Ray cluster has 0 GPUs"):
        distributed.segment_dataset([tmp_path / "in"], tmp_path / "out", ckpt, num_gpus_per_worker=1)
    assert not (tmp_path / "out").exists()


def test_images_and_videos_equal_segmenter_and_segment_video(ray_local, ckpt, seg, tmp_path):
    src = tmp_path / "in"
    imgs = images(src, 200)
    clips = []
    for k in range(2):
        clips.append(src / "clips" / f"v{k}.mp4")
        clips[-1].parent.mkdir(exist_ok=True)
        write_video(clips[-1], [photo(10 * k + f, 32, 48) for f in range(5 + k)])
    out = tmp_path / "out"
    s = distributed.segment_dataset([src], out, ckpt, concurrency=2, batch_size=8, overlays=True, **OPTS)
    assert (s["done"], s["skipped"], s["failed"], s["images"], s["frames"]) == (202, 0, 0, 200, 11)
    for p in imgs:
        rel = p.relative_to(src)
        image = read_image(p)
        want = seg.run(image).numpy()
        got = np.array(Image.open(out / "labels" / rel))
        np.testing.assert_array_equal(got, want, err_msg=str(rel))
        np.testing.assert_array_equal(np.array(Image.open(out / "overlays" / rel)),
                                      overlay(image, want, seg.palette, 0.5))  # fmt: skip
    for k, clip in enumerate(clips):
        ref = tmp_path / f"ref{k}.mkv"
        segment_video(clip, ref, seg, mode="labels", progress=False)
        with av.open(str(ref)) as a, av.open(str(out / "labels" / "clips" / f"v{k}.mkv")) as b:
            fa = [f.to_ndarray(format="gray") for f in a.decode(video=0)]
            fb = [f.to_ndarray(format="gray") for f in b.decode(video=0)]
        assert len(fa) == len(fb) == 5 + k
        for x, y in zip(fa, fb):
            np.testing.assert_array_equal(x, y)
        with av.open(str(out / "overlays" / "clips" / f"v{k}.mp4")) as c:
            assert sum(1 for _ in c.decode(video=0)) == 5 + k
    manifest = rows(out)
    assert len(manifest) == 202 and {r["status"] for r in manifest} == {"ok"}
    assert sorted(r["input"] for r in manifest) == sorted(map(str, [*imgs, *clips]))
    assert {r["frames"] for r in manifest if r["kind"] == "video"} == {5, 6}
    assert all(r["worker"] and r["seconds"] >= 0 for r in manifest)
    assert not [f for f in files(out) if ".fastfcn-tmp-" in f]


class _KillOnce(distributed._Worker):
    """Exits its process (as a crash or an OOM kill would) on the first attempt at ``img005``."""

    def process(self, task, ready=None):
        marker = Path(task.outputs[0]).parents[3] / "killed"  # beside OUT
        if task.src.endswith("img005.png") and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().process(task, ready)


def test_killed_worker_leaves_each_input_processed_once(ray_local, ckpt, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(distributed, "_Worker", _KillOnce)
    imgs = images(tmp_path / "in", 12)
    out = tmp_path / "run" / "out"
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=2, batch_size=2, **OPTS)
    assert (tmp_path / "run" / "killed").exists()  # the worker did die
    assert (s["done"], s["failed"]) == (12, 0)
    manifest = rows(out)
    assert sorted(r["input"] for r in manifest) == sorted(map(str, imgs))  # one row each
    assert {r["status"] for r in manifest} == {"ok"}
    assert files(out) == sorted(["manifest.jsonl", *(str(Path("labels", p.relative_to(tmp_path / "in")))
                                                     for p in imgs)])  # fmt: skip


class _KillOnPoison(distributed._Worker):
    """Exits its process on every attempt at ``poison.png``, as a decoder crash would; counts them."""

    def process(self, task, ready=None):
        if task.src.endswith("poison.png"):
            with open(Path(task.outputs[0]).parents[2] / "deaths", "a") as f:  # beside OUT
                f.write(f"{os.getpid()}\n")
            os._exit(1)
        return super().process(task, ready)


def test_an_input_that_kills_its_worker_is_recorded_failed(ray_local, ckpt, tmp_path, monkeypatch):
    """Ray Data runs the batch of an actor that died again, without end: an input that kills its
    worker every time ran forever. The batch's journal sends the next run one input at a time;
    the input in flight at ATTEMPTS deaths is recorded failed, the rest of its batch is done."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(distributed, "_Worker", _KillOnPoison)
    imgs = images(tmp_path / "in", 3)
    Image.fromarray(photo(9)).save(tmp_path / "in" / "poison.png")
    out = tmp_path / "run" / "out"
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, batch_size=2, **OPTS)
    assert (s["done"], s["failed"]) == (3, 1)
    # once in its batch, then ATTEMPTS times on its own
    assert len((tmp_path / "run" / "deaths").read_text().split()) == 1 + distributed.ATTEMPTS
    by = distributed.read_manifest(out / "manifest.jsonl")
    assert {k for k, r in by.items() if r["status"] == "ok"} == set(map(str, imgs))
    error = by[str(tmp_path / "in" / "poison.png")]["error"]
    assert error.startswith(f"its worker died {distributed.ATTEMPTS} times")
    assert files(out) == sorted(["manifest.jsonl", *(str(Path("labels", p.relative_to(tmp_path / "in")))
                                                     for p in imgs)])  # no journal left behind  # fmt: skip


def test_interrupted_run_resumes_without_redoing(ray_local, ckpt, tmp_path, monkeypatch):
    images(tmp_path / "in", 10)
    out = tmp_path / "out"
    add = distributed.Manifest.add

    def add_then_stop(self, row):
        add(self, row)
        if len(self.rows) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(distributed.Manifest, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, batch_size=1, **OPTS)
    monkeypatch.undo()
    first = rows(out)
    assert len(first) == 4
    stamps = {r["input"]: os.stat(r["outputs"][0]) for r in first}
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=2, batch_size=2, **OPTS)
    assert (s["skipped"], s["done"], s["failed"]) == (4, 6, 0)
    for src, st in stamps.items():  # not rewritten: the same file (inode) and time
        now = os.stat(distributed.read_manifest(out / "manifest.jsonl")[src]["outputs"][0])
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert len(rows(out)) == 10 and {r["status"] for r in rows(out)} == {"ok"}
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=2, **OPTS)
    assert (s["skipped"], s["done"]) == (10, 0)


def test_a_run_with_another_checkpoint_redoes_the_inputs(ray_local, ckpt, tmp_path):
    """Each row records the checkpoint that wrote it (``model_key``): resume into the same folder
    with another checkpoint redoes every input rather than keeping the first model's labels; a
    row of an older manifest, without one, is checked as before."""
    imgs = images(tmp_path / "in", 2)
    out = tmp_path / "out"
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, **OPTS)
    assert (s["skipped"], s["done"]) == (0, 2)
    assert {r["model"] for r in rows(out)} == {distributed.model_key(Path(ckpt).read_bytes())}
    torch.manual_seed(1)
    other = models.build("fcn8s", width=0.0625, num_classes=5).eval()
    with torch.no_grad():
        other.score_pool3.weight.normal_(0, 1)
    other_ckpt = fastfcn.save(other, tmp_path / "other.safetensors")
    s = distributed.segment_dataset([tmp_path / "in"], out, other_ckpt, concurrency=1, **OPTS)
    assert (s["skipped"], s["done"], s["failed"]) == (0, 2, 0)
    other_seg = fastfcn.Segmenter(str(other_ckpt), device="cpu", **OPTS)
    for p in imgs:
        got = np.array(Image.open(out / "labels" / p.relative_to(tmp_path / "in")))
        np.testing.assert_array_equal(got, other_seg.run(read_image(p)).numpy())
    s = distributed.segment_dataset([tmp_path / "in"], out, other_ckpt, concurrency=1, **OPTS)
    assert (s["skipped"], s["done"]) == (2, 0)
    task = distributed.plan([(str(imgs[0]), str(tmp_path / "in"))], out, ())[0]
    row = distributed.read_manifest(out / "manifest.jsonl")[str(imgs[0])]
    assert distributed.is_complete(row, task, row["model"])
    assert not distributed.is_complete(row, task, "sha256:0")
    old = {k: v for k, v in row.items() if k != "model"}
    assert distributed.is_complete(old, task, "sha256:0")


def test_a_second_run_into_a_busy_folder_is_refused(ray_local, ckpt, tmp_path):
    """While one run writes into OUT (it holds OUT/.fastfcn-batch.lock), another run into OUT
    stops with one line naming it, and leaves the first run's temporaries and manifest alone;
    once the first run has ended the folder is free, and no lock file is left behind."""
    images(tmp_path / "in", 2)
    out = tmp_path / "out"
    live = out / "labels" / "cam0" / f".img000{distributed.TMP_TAG}123-abcd.png"  # the first run's
    live.parent.mkdir(parents=True)
    live.write_bytes(b"being written")
    (out / "manifest.jsonl").write_text("")
    with distributed._exclusive(out):
        with pytest.raises(InputError, match=r"another fastfcn batch run \(.+:\d+\) is writing into"):
            distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, **OPTS)
        assert live.read_bytes() == b"being written"
        assert (out / "manifest.jsonl").read_text() == ""
    live.unlink()
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, **OPTS)
    assert (s["done"], s["failed"]) == (2, 0)
    assert not (out / distributed.LOCK).exists()


def test_a_relative_output_folder_is_the_drivers(ray_local, ckpt, tmp_path, monkeypatch):
    """Actors keep the working folder Ray gave them (here the one this module started Ray in),
    not the driver's: a relative output folder is the driver's, the outputs are where it says,
    and rows record absolute paths; a row of an older run with relative paths, from the same
    folder, is still complete."""
    imgs = images(tmp_path / "in", 2)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    s = distributed.segment_dataset([tmp_path / "in"], "out", ckpt, concurrency=1, **OPTS)
    assert (s["done"], s["failed"]) == (2, 0)
    out = tmp_path / "work" / "out"
    assert files(out) == sorted(["manifest.jsonl", *(str(Path("labels", p.relative_to(tmp_path / "in")))
                                                     for p in imgs)])  # fmt: skip
    row = distributed.read_manifest(out / "manifest.jsonl")[str(imgs[0])]
    assert row["outputs"] == [str(out / "labels" / imgs[0].relative_to(tmp_path / "in"))]
    task = distributed.plan([(str(imgs[0]), str(tmp_path / "in"))], out, ())[0]
    old = {**row, "outputs": [os.path.relpath(p) for p in row["outputs"]]}
    assert old["outputs"][0].startswith("out") and distributed.is_complete(old, task)


def test_a_file_name_that_is_not_utf8_is_segmented_with_the_rest(ray_local, ckpt, seg, tmp_path):
    """Linux file names are bytes: one that is not UTF-8 (Latin-1 "café.png") reaches Python with
    a surrogate, which no Arrow string column holds; it is segmented like the others, its labels
    under the same bytes, and resumed as complete."""
    imgs = images(tmp_path / "in", 2)
    odd = tmp_path / "in" / os.fsdecode(b"caf\xe9.png")
    Image.fromarray(photo(5)).save(odd)
    out = tmp_path / "out"
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, **OPTS)
    assert (s["done"], s["failed"]) == (3, 0)
    labels = out / "labels" / os.fsdecode(b"caf\xe9.png")
    np.testing.assert_array_equal(np.array(Image.open(labels)), seg.run(read_image(odd)).numpy())
    assert set(distributed.read_manifest(out / "manifest.jsonl")) == {*map(str, imgs), str(odd)}
    s = distributed.segment_dataset([tmp_path / "in"], out, ckpt, concurrency=1, **OPTS)
    assert (s["skipped"], s["done"]) == (3, 0)


def test_corrupt_inputs_are_recorded_failed_the_rest_complete(ray_local, ckpt, seg, tmp_path, capsys):
    good = images(tmp_path / "in", 4)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cut = tmp_path / "in" / "cut.jpg"
    Image.fromarray(photo(1, 48, 64)).save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:300])
    clip = tmp_path / "in" / "cut.mkv"  # lossless: every frame is large, so the cut is mid-stream
    write_video(clip, [photo(k, 32, 48) for k in range(8)], lossless=True)
    clip.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    far = images(tmp_path / "far", 1)[0]  # through pyarrow's file systems, as s3:// would be
    write_video(tmp_path / "far" / "v.mp4", [photo(k, 32, 48) for k in range(3)])
    out = tmp_path / "out"
    rc = main(["batch", str(ckpt), str(tmp_path / "in"), f"file://{tmp_path / 'far'}", "--out", str(out),
               "--workers", "2", "--mode", "side-by-side", "--backend", "torch",
               "--precision", "fp32"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1
    assert "6 done, 0 skipped (complete before), 3 failed" in err
    for bad in ("bad.png", "cut.jpg", "cut.mkv"):
        assert f"failed {tmp_path / 'in' / bad}" in err
    by = distributed.read_manifest(out / "manifest.jsonl")
    assert {k for k, r in by.items() if r["status"] == "ok"} == {*map(str, good), f"file://{far}",
                                                                 f"file://{tmp_path / 'far' / 'v.mp4'}"}
    far_labels = np.array(Image.open(out / "labels" / "far" / far.relative_to(tmp_path / "far")))
    np.testing.assert_array_equal(far_labels, seg.run(read_image(far)).numpy())
    with av.open(str(out / "side-by-side" / "far" / "v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3
    for name in ("bad.png", "cut.jpg", "cut.mkv"):
        r = by[str(tmp_path / "in" / name)]
        assert r["status"] == "failed" and r["attempts"] == distributed.ATTEMPTS
        assert name in r["error"] and "InputError" in r["error"]
        assert not any(os.path.exists(p) for p in r["outputs"])  # nothing partial left behind
    assert not [f for f in files(out) if ".fastfcn-tmp-" in f]
    p = good[0]
    image = read_image(p)
    want = side_by_side(image, seg.run(image).numpy(), seg.palette)
    got = np.array(Image.open(out / "side-by-side" / "in" / p.relative_to(tmp_path / "in")))
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- two heads (SIFT Flow)


def test_plan_puts_each_head_in_a_folder_of_its_own(tmp_path):
    found = [(str(tmp_path / "a" / "x.png"), str(tmp_path)), (str(tmp_path / "b" / "y.mp4"), str(tmp_path))]
    tasks = distributed.plan(found, tmp_path / "o", ("overlay",), heads=("semantic", "geometric"))
    o = tmp_path / "o"
    assert tasks[0].outputs == tuple(str(o / d / h / "a" / "x.png") for h in ("semantic", "geometric")
                                     for d in ("labels", "overlays"))  # fmt: skip
    assert tasks[1].outputs == tuple(str(o / d / h / "b" / f) for h in ("semantic", "geometric")
                                     for d, f in (("labels", "y.mkv"), ("overlays", "y.mp4")))  # fmt: skip


@pytest.fixture(scope="module")
def sift_ckpt(tmp_path_factory):
    from test_siftflow_context import small

    return fastfcn.save(small("siftflow-fcn8s", seed=5), tmp_path_factory.mktemp("sift") / "sf.safetensors")


def test_two_headed_net_writes_each_head_and_resumes(ray_local, sift_ckpt, tmp_path, capsys):
    """Images of a SIFT Flow net through Ray: every head's labels equal Segmenter.run's, overlays and
    side-by-side in each head's colours, and the manifest lists every head's files, so resume
    redoes an input when one head's file is gone."""
    sift = fastfcn.Segmenter(sift_ckpt, device="cpu", **OPTS)
    palettes = sift.head_palettes()
    src = tmp_path / "in"
    imgs = images(src, 3)
    out = tmp_path / "out"
    rc = main(["batch", str(sift_ckpt), str(src), "--out", str(out), "--workers", "1", "--mode",
               "side-by-side", "--overlays", "--backend", "torch", "--precision", "fp32"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    for p in imgs:
        rel, image = p.relative_to(src), read_image(p)
        want = sift.run(image)
        for head in ("semantic", "geometric"):
            lab = want[head].numpy()
            np.testing.assert_array_equal(np.array(Image.open(out / "labels" / head / rel)), lab)
            np.testing.assert_array_equal(np.array(Image.open(out / "overlays" / head / rel)),
                                          overlay(image, lab, palettes[head], 0.5))  # fmt: skip
            np.testing.assert_array_equal(np.array(Image.open(out / "side-by-side" / head / rel)),
                                          side_by_side(image, lab, palettes[head]))  # fmt: skip
    assert not (out / "labels" / "cam0").exists()
    by = distributed.read_manifest(out / "manifest.jsonl")
    assert len(by) == 3 and all(r["status"] == "ok" and len(r["outputs"]) == 6 for r in by.values())
    # resume (segment_dataset's test, without a second Ray run): complete until one head's file goes
    found = distributed.collect_inputs([src], out)
    tasks = distributed.plan(found, out, ("overlay", "side-by-side"), heads=("semantic", "geometric"))
    assert all(distributed.is_complete(by[t.src], t) for t in tasks)
    assert all(r["stamp"] == distributed.stamp(r["input"]) for r in by.values())  # the workers stamp
    (out / "overlays" / "geometric" / imgs[1].relative_to(src)).unlink()
    assert [t.src for t in tasks if not distributed.is_complete(by[t.src], t)] == [str(imgs[1])]
    one_head = distributed.plan(found, out, ("overlay", "side-by-side"))
    assert not any(distributed.is_complete(by[t.src], t) for t in one_head)


def test_worker_writes_a_two_headed_video_per_head(sift_ckpt, tmp_path):
    """A video task in the worker (what each actor runs, here without Ray): each head's label
    video equals Segmenter.run on the decoded frames, each head's pictures have every frame."""
    clip = tmp_path / "in" / "v.mp4"
    clip.parent.mkdir()
    write_video(clip, [photo(f, 32, 48) for f in range(4)])
    out = tmp_path / "out"
    pictures = ("overlay", "side-by-side")
    heads = ("semantic", "geometric")
    task = distributed.plan([(str(clip), str(clip.parent))], out, pictures, heads=heads)[0]
    worker = distributed._Worker(sift_ckpt.read_bytes(), str(sift_ckpt), {"device": "cpu", **OPTS}, pictures)
    assert worker.process(task) == 4
    with av.open(str(clip)) as c:
        want = worker.seg.run(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]))
    for head in heads:
        with av.open(str(out / "labels" / head / "v.mkv")) as c:
            got = np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)])
        np.testing.assert_array_equal(got, want[head].numpy(), err_msg=head)
        for d in ("overlays", "side-by-side"):
            with av.open(str(out / d / head / "v.mp4")) as c:
                assert sum(1 for _ in c.decode(video=0)) == 4
    assert files(out) == sorted(str(Path(p).relative_to(out)) for p in task.outputs)


# ------------------------------------------------------------------ two inputs (NYUDv2 fusion)


def _fusion_net(arch: str, second) -> torch.nn.Module:
    """A tiny NYUDv2 fusion net whose labels vary over the image and follow the second input:
    He-normal convs, the depth channel's weights scaled up (log depth is ~1, colour ~100), and
    the score layers' biases centring the classes' mean logits (else one class wins every pixel)."""
    import math

    torch.manual_seed(3)
    model = models.build(arch, width=1 / 16, num_classes=5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()))
                m.bias.zero_()
        if arch == "nyud-fcn32s-color-d":
            model.conv1_1_bgrd.weight[:, 3] *= 100
        x = torch.cat([torch.from_numpy(photo(k, 40, 48)).permute(2, 0, 1)[None] for k in range(4)])
        x = x.float() - 110
        mean = model(torch.cat([x, second(x)], 1)).mean((0, 2, 3))
        for m in model.modules():  # late fusion averages a score layer per stream: each is centred
            if isinstance(m, torch.nn.Conv2d) and m.out_channels == 5:
                m.bias -= mean
    return model


def depth_map(seed: int, h: int, w: int) -> np.ndarray:
    """uint16 millimetres (0.6 to 9.6 m, NYUDv2's range): a ramp of a random slope and offset."""
    rng = np.random.default_rng(seed + 1000)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = xx / w if seed % 2 else yy / h
    mm = rng.uniform(600, 3000) + rng.uniform(500, 6000) * ramp + rng.uniform(0, 300, (h, w))
    return mm.astype(np.uint16)


@pytest.fixture(scope="module")
def depth_ckpt(tmp_path_factory):
    model = _fusion_net("nyud-fcn32s-color-d", lambda x: torch.randn(x.shape[0], 1, *x.shape[2:]))
    return fastfcn.save(model, tmp_path_factory.mktemp("nyud") / "cd.safetensors")


def fusion_inputs(root: Path, n: int, modality: str = "depth") -> tuple[list[Path], list[Path]]:
    """``n`` colour JPEGs under root/in/cam<k>/ and their second inputs at the same relative paths
    under root/<modality>/ as PNGs (the suffixes differ: any image suffix pairs); sizes alternate."""
    imgs, seconds = [], []
    for i in range(n):
        h, w = (40, 48) if i % 2 else (48, 40)
        rel = Path(f"cam{i % 2}", f"img{i:03d}")
        img, sec = root / "in" / rel.with_suffix(".jpg"), root / modality / rel.with_suffix(".png")
        for p in (img, sec):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(i, h, w)).save(img, quality=95)
        Image.fromarray(depth_map(i, h, w) if modality == "depth" else photo(i + 50, h, w)).save(sec)
        imgs.append(img)
        seconds.append(sec)
    return imgs, seconds


def test_two_input_net_pairs_files_and_matches_segmenter(ray_local, depth_ckpt, tmp_path, capsys):
    """`fastfcn batch --depth DIR` on a colour + depth net through Ray: each written label map and
    overlay equals Segmenter.run(image, depth=its paired file), the manifest records the pair,
    a second run skips everything, and another depth folder makes every input due again."""
    from fastfcn.imageio import read_depth

    seg = fastfcn.Segmenter(depth_ckpt, device="cpu", **OPTS)
    imgs, deps = fusion_inputs(tmp_path, 6)
    src, out = tmp_path / "in", tmp_path / "out"
    args = ["batch", str(depth_ckpt), str(src), "--out", str(out), "--depth", str(tmp_path / "depth"),
            "--workers", "1", "--batch-size", "4", "--overlays", "--backend", "torch", "--precision", "fp32"]
    assert main(args) == 0, capsys.readouterr().err
    assert "6 done, 0 skipped (complete before), 0 failed" in capsys.readouterr().err
    swapped = 0
    for i, (p, d) in enumerate(zip(imgs, deps)):
        rel, image = p.relative_to(src).with_suffix(".png"), read_image(p)
        want = seg.run(image, depth=read_depth(d)).numpy()
        np.testing.assert_array_equal(np.array(Image.open(out / "labels" / rel)), want, err_msg=str(rel))
        np.testing.assert_array_equal(np.array(Image.open(out / "overlays" / rel)),
                                      overlay(image, want, seg.palette, 0.5))  # fmt: skip
        other = read_depth(deps[(i + 2) % len(deps)])  # the same size: another image's depth
        swapped += int((seg.run(image, depth=other).numpy() != want).sum())
    assert swapped > 0  # the labels follow the depth: a wrong pairing would be caught above
    by = distributed.read_manifest(out / "manifest.jsonl")
    assert {k: r["second"] for k, r in by.items()} == {str(p): str(d) for p, d in zip(imgs, deps)}
    assert all(r["status"] == "ok" for r in by.values())
    assert main(args) == 0
    assert "0 done, 6 skipped (complete before), 0 failed" in capsys.readouterr().err
    # resume: complete for this pairing only; the same outputs from other depth files are due again
    found = distributed.collect_inputs([src], out)
    other = tmp_path / "depth2"
    (other / "cam0").mkdir(parents=True)
    (other / "cam1").mkdir()
    for d in deps:
        (other / d.relative_to(tmp_path / "depth")).write_bytes(d.read_bytes())
    for folder, due in ((tmp_path / "depth", 0), (other, 6)):
        tasks = distributed.plan(found, out, ("overlay",), None,
                                 distributed.pair_second(found, str(folder), "depth"))  # fmt: skip
        assert sum(not distributed.is_complete(by[t.src], t) for t in tasks) == due, folder


def test_two_input_net_refusals_before_ray(depth_ckpt, ckpt, sift_ckpt, tmp_path, monkeypatch, capsys):
    """Every way a pairing can be wrong is one error naming what was expected, found before Ray
    starts or the output folder is made: no --depth, the wrong flag, --depth for a one-input net,
    a video (no depth track), a missing or ambiguous depth file, a depth path that is no folder."""
    imgs, deps = fusion_inputs(tmp_path, 3)
    src, dep, out = tmp_path / "in", tmp_path / "depth", tmp_path / "o"
    monkeypatch.setattr(distributed, "_connected", None)  # asking Ray for anything fails the test

    def refused(match: str, inputs=(src,), model=depth_ckpt, **kw) -> None:
        with pytest.raises(InputError, match=match):
            distributed.segment_dataset(list(inputs), out, model, **OPTS, **kw)

    refused(r"^nyud-fcn32s-color-d takes color images and depth: pass depth=DIR \(and only it\)$")
    refused(r"^nyud-fcn32s-color-d takes color images and depth: pass depth=DIR \(and only it\)$", hha=dep)
    refused(r"^fcn8s takes one input \(color images\); depth= is for the two-input", model=ckpt, depth=dep)
    clip = tmp_path / "clip.mp4"
    write_video(clip, [photo(k, 32, 48) for k in range(2)])
    refused(r"clip.mp4: a video has no depth track; nyud-fcn32s-color-d takes images", (src, clip), depth=dep)
    refused(r"--depth .*img000.png: not a folder", depth=deps[0])
    (dep / "cam0" / "img002.tif").write_bytes(deps[2].read_bytes())
    refused(r"img002.jpg: its depth file must be .*cam0/img002.<png\|tif\|...>, one file named as the image; "
            r"found several \(img002.png, img002.tif\)", depth=dep)
    (dep / "cam0" / "img002.tif").unlink()
    deps[1].unlink()
    refused(r"img001.jpg: its depth file must be .*cam1/img001.<png\|tif\|...>.*found none$", depth=dep)
    deps[2].unlink()  # every pair is looked for: the first missing is named, the others counted
    refused(r"cam0/img002.jpg: its depth file .*found none; 1 more of the 3 images lack theirs too$",
            depth=dep)
    assert not out.exists()
    capsys.readouterr()
    assert main(["batch", str(depth_ckpt), str(src), "--out", str(out), "--depth", str(dep)]) == 1
    assert "img002.jpg: its depth file must be" in capsys.readouterr().err
    assert main(["batch", "--help"]) == 0
    assert "--depth DIR" in capsys.readouterr().out
    assert not out.exists()
    uri = f"file://{sift_ckpt}"  # a checkpoint URI is described from its bytes (its heads)
    info = distributed._check_model(uri, "torch", "fp32")
    assert distributed._model_heads(uri, sift_ckpt.read_bytes(), info) == ("semantic", "geometric")


def test_pair_second_mirrors_relative_paths_locally_and_at_uris(tmp_path):
    """Images in folders, named alone, by glob or at a URI; second inputs in a local folder or at
    a URI: each image's file is at its path relative to its input folder, any image suffix."""
    imgs, deps = fusion_inputs(tmp_path, 4)
    src, dep = tmp_path / "in", tmp_path / "depth"
    found = distributed.collect_inputs([src], tmp_path / "o")
    want = deps_sorted(imgs, deps, found)
    assert distributed.pair_second(found, str(dep), "depth") == [str(d) for d in want]
    at_uri = distributed.pair_second(found, f"file://{dep}", "depth")
    assert at_uri == [f"file://{d}" for d in deps_sorted(imgs, deps, found)]
    alone = distributed.collect_inputs([imgs[1]], tmp_path / "o")  # its folder is its base: DIR/<name>
    assert distributed.pair_second(alone, str(dep / "cam1"), "depth") == [str(deps[1])]
    globbed = distributed.collect_inputs([str(src / "cam*" / "*.jpg")], tmp_path / "o")
    remote = distributed.collect_inputs([f"file://{src}"], tmp_path / "o")
    for f in (globbed, remote):
        assert distributed.pair_second(f, str(dep), "depth") == [str(d) for d in deps_sorted(imgs, deps, f)]
    with pytest.raises(InputError, match="--hha file:///nowhere/at/all: not a folder"):
        distributed.pair_second(found, "file:///nowhere/at/all", "hha")
    # what a worker does with the bytes of a depth file at a URI: read_second's result and errors
    from fastfcn.imageio import decode_second, read_second

    np.testing.assert_array_equal(decode_second(deps[0].read_bytes(), "s3://b/d.png", "depth"),
                                  read_second(deps[0], "depth"))  # fmt: skip
    Image.fromarray(photo(0, 8, 8)[..., 0]).save(deps[0])  # 8 bits: no millimetres
    with pytest.raises(InputError, match=r"^s3://b/d.png: a depth image must be one channel of 16"):
        decode_second(deps[0].read_bytes(), "s3://b/d.png", "depth")


def deps_sorted(imgs: list[Path], deps: list[Path], found) -> list[Path]:
    """``deps`` in the order of ``found`` (paths or file:// URIs of ``imgs``)."""
    by = {str(p): d for p, d in zip(imgs, deps)}
    return [by[f.removeprefix("file://")] for f, _ in found]


def test_worker_reads_second_inputs_at_uris_and_refuses_videos(tmp_path):
    """What each actor runs, here without Ray, for a colour + HHA net with images and HHA files at
    URIs: a batch in one call and an input on its own both equal Segmenter.run(image, hha=...);
    a video task is refused with the reason."""
    model = _fusion_net("nyud-fcn32s-color-hha", lambda x: x)
    ckpt = fastfcn.save(model, tmp_path / "ch.safetensors")
    imgs, hhas = fusion_inputs(tmp_path, 3, "hha")
    out = tmp_path / "out"
    found = distributed.collect_inputs([f"file://{tmp_path / 'in'}"], out)
    seconds = distributed.pair_second(found, f"file://{tmp_path / 'hha'}", "hha")
    tasks = distributed.plan(found, out, (), None, seconds)
    worker = distributed._Worker(ckpt.read_bytes(), str(ckpt), {"device": "cpu", **OPTS}, second="hha")
    items = distributed.work_items(tasks[:2])  # the rows Ray Data hands the worker, as numpy columns
    batch = {k: np.array([it[k] for it in items]) for k in items[0]}
    got = [json.loads(r) for r in worker(batch)["row"]]
    assert [(r["status"], r["second"]) for r in got] == [("ok", t.second) for t in tasks[:2]]
    assert worker.process(tasks[2]) == 1  # alone: the path a retry takes
    by = {str(p): h for p, h in zip(imgs, hhas)}
    swapped = 0
    for t in tasks:
        image, hha = read_image(t.src[len("file://"):]), read_image(by[t.src[len("file://"):]])
        want = worker.seg.run(image, hha=hha).numpy()
        np.testing.assert_array_equal(np.array(Image.open(t.outputs[0])), want, err_msg=t.src)
        swapped += int((worker.seg.run(image, hha=np.ascontiguousarray(hha[::-1])).numpy() != want).sum())
    assert swapped > 0  # the labels follow the HHA image: a wrong pairing would be caught above
    Image.fromarray(photo(9, 16, 16)).save(hhas[0])  # not the image's size: that input fails alone
    rows_ = [json.loads(r) for r in worker(batch)["row"]]
    assert [r["status"] for r in rows_] == ["failed", "ok"]
    assert "every hha map must have the size of its image" in rows_[0]["error"]
    clip = distributed.Task(str(tmp_path / "v.mp4"), "video", (str(out / "labels" / "v.mkv"),))
    with pytest.raises(InputError, match=r"v.mp4: a video has no hha track"):
        worker.process(clip)


# ------------------------------------------------------------------ inputs at URIs: the listing's stamps


class _CountingFS:
    """A pyarrow file system that records what ``get_file_info`` is asked about: a path, or a
    FileSelector's folder."""

    def __init__(self, fs, calls: list):
        self._fs, self._calls = fs, calls

    def get_file_info(self, what):
        import pyarrow.fs as pafs

        self._calls.append(what.base_dir if isinstance(what, pafs.FileSelector) else what)
        return self._fs.get_file_info(what)

    def __getattr__(self, name):
        return getattr(self._fs, name)


@pytest.fixture
def info_requests(monkeypatch) -> list:
    """Every get_file_info of the file systems that fastfcn.distributed opens in this process."""
    import pyarrow.fs as pafs

    calls, real = [], pafs.FileSystem

    class Counting:
        @staticmethod
        def from_uri(uri):
            fs, path = real.from_uri(uri)
            return _CountingFS(fs, calls), path

    monkeypatch.setattr(pafs, "FileSystem", Counting)
    return calls


def rewrite(path: Path, data: bytes) -> None:
    """New bytes at the same path, its mtime a second later (a coarse clock cannot hide it)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_uri_inputs_are_stamped_by_their_listing(depth_ckpt, tmp_path, info_requests):
    """Images and depth files at file:// URIs (pyarrow's local file system, as s3:// would be): each
    row records the size and mtime that listing them gave, and resume holds each input to this
    run's listing, so an image or depth file rewritten under the same URI is redone and the others
    are not. get_file_info is asked about folders only (what each named one is, then one listing
    of each): never once per input, by the driver or the worker."""
    imgs, deps = fusion_inputs(tmp_path, 6)
    out = tmp_path / "out"

    def tasks():
        listed = {}
        found = distributed.collect_inputs([f"file://{tmp_path / 'in'}"], out, listed)
        seconds = distributed.pair_second(found, f"file://{tmp_path / 'depth'}", "depth", listed)
        return distributed.plan(found, out, (), None, seconds, listed)

    first = tasks()
    folders = [str(tmp_path / f) for f in ("in", "in", "depth", "depth/cam0", "depth/cam1")]
    assert sorted(info_requests) == sorted(folders)
    worker = distributed._Worker(depth_ckpt.read_bytes(), str(depth_ckpt), {"device": "cpu", **OPTS},
                                 second="depth")  # fmt: skip
    items = distributed.work_items(first)  # what _map hands Ray Data
    batch = {k: np.array([item[k] for item in items]) for k in items[0]}
    by = {r["input"]: r for r in map(json.loads, worker(batch)["row"])}
    assert len(info_requests) == len(folders)  # the worker read 12 files and asked about none
    for p, d in zip(imgs, deps):
        row = by[f"file://{p}"]
        assert row["status"] == "ok", row["error"]
        assert row["stamp"] == [p.stat().st_size, p.stat().st_mtime_ns]
        assert row["second_stamp"] == [d.stat().st_size, d.stat().st_mtime_ns]
    assert all(distributed.is_complete(by[t.src], t) for t in tasks())
    rewrite(imgs[1], imgs[3].read_bytes())
    rewrite(deps[4], deps[0].read_bytes()[::-1][:100] + deps[4].read_bytes()[100:])
    due = {t.src for t in tasks() if not distributed.is_complete(by[t.src], t)}
    assert due == {f"file://{imgs[1]}", f"file://{imgs[4]}"}
    assert set(info_requests) == set(folders)  # three listings, still no request per input
    # rows of older manifests: without stamps, or with None for a URI (known by URI alone)
    t = next(t for t in tasks() if t.src == f"file://{imgs[1]}")
    assert distributed.is_complete({k: v for k, v in by[t.src].items() if "stamp" not in k}, t)
    assert distributed.is_complete({**by[t.src], "stamp": None}, t)
    assert not distributed.is_complete({**by[t.src], "second_stamp": [1, 2]}, t)


def test_a_listing_without_modification_times_stamps_the_size():
    """A file system whose listing gives no mtime: the row records the size alone, and a change of
    size is still redone; one that gives no size stamps nothing."""
    import pyarrow.fs as pafs

    st = distributed.listed_stamp(pafs.FileInfo("b/k.png", pafs.FileType.File, size=5))
    assert st == [5]
    assert distributed.listed_stamp(pafs.FileInfo("b/k.png", pafs.FileType.File, size=5, mtime=1.5)) == \
        [5, 1_500_000_000]
    assert distributed.listed_stamp(pafs.FileInfo("b/k.png", pafs.FileType.File)) is None
    task = distributed.Task("s3://b/k.png", "image", (), stamp=(5,))
    row = {"input": task.src, "status": "ok", "outputs": [], "sizes": [], "stamp": st}
    assert distributed.is_complete(row, task)
    assert not distributed.is_complete(row, distributed.Task("s3://b/k.png", "image", (), stamp=(6,)))


def test_batch_resume_redoes_objects_rewritten_at_uris(ray_local, depth_ckpt, tmp_path, capsys):
    """`fastfcn batch` with images and depth files at URIs, run three times: everything, then only
    the image rewritten under its URI, then only the image whose depth file was; what is redone
    is segmented from the new bytes."""
    from fastfcn.imageio import read_depth

    seg = fastfcn.Segmenter(depth_ckpt, device="cpu", **OPTS)
    imgs, deps = fusion_inputs(tmp_path, 4)
    out = tmp_path / "out"
    args = ["batch", str(depth_ckpt), f"file://{tmp_path / 'in'}", "--out", str(out), "--depth",
            f"file://{tmp_path / 'depth'}", "--workers", "1", "--batch-size", "4", "--backend", "torch",
            "--precision", "fp32"]  # fmt: skip

    def labels(i: int) -> np.ndarray:
        return np.array(Image.open(out / "labels" / imgs[i].relative_to(tmp_path / "in").with_suffix(".png")))

    assert main(args) == 0, capsys.readouterr().err
    assert "4 done, 0 skipped (complete before), 0 failed" in capsys.readouterr().err
    Image.fromarray(photo(40, 48, 40)).save(imgs[0], quality=95)  # img000 is 48x40
    os.utime(imgs[0], ns=(imgs[0].stat().st_atime_ns, imgs[0].stat().st_mtime_ns + 10**9))
    Image.fromarray(depth_map(41, 40, 48)).save(deps[3])  # img003 is 40x48
    os.utime(deps[3], ns=(deps[3].stat().st_atime_ns, deps[3].stat().st_mtime_ns + 10**9))
    assert main(args) == 0
    assert "2 done, 2 skipped (complete before), 0 failed" in capsys.readouterr().err
    for i in (0, 3):
        want = seg.run(read_image(imgs[i]), depth=read_depth(deps[i])).numpy()
        np.testing.assert_array_equal(labels(i), want)
    by = distributed.read_manifest(out / "manifest.jsonl")
    assert by[f"file://{imgs[0]}"]["stamp"] == [imgs[0].stat().st_size, imgs[0].stat().st_mtime_ns]
    assert by[f"file://{imgs[3]}"]["second_stamp"] == [deps[3].stat().st_size, deps[3].stat().st_mtime_ns]
    assert main(args) == 0
    assert "0 done, 4 skipped (complete before), 0 failed" in capsys.readouterr().err
