"""Two-headed (SIFT Flow) and two-input (NYUDv2) nets through the file paths: `fastfcn video` /
segment_video, `fastfcn batch` / fastfcn.distributed and `fastfcn eval` / fastfcn.evaluate.
Every file written is compared with Segmenter.run on the same input."""

import numpy as np
import pytest
from test_siftflow_context import small

import fastfcn
from fastfcn import cli
from fastfcn.errors import InputError

HEADS = ("semantic", "geometric")


@pytest.fixture(scope="module")
def sift():
    return fastfcn.Segmenter(small("siftflow-fcn8s", seed=5), backend="torch", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def sift_file(tmp_path_factory):
    return fastfcn.save(small("siftflow-fcn8s", seed=5), tmp_path_factory.mktemp("ckpt") / "sf.safetensors")


# -------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    pytest.importorskip("av")
    from test_video import make_video

    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    make_video(path, n=6)
    return path


def _want(seg, clip):
    """Each head's labels of every decoded frame of ``clip``, from Segmenter.run."""
    from test_video import decode

    frames = np.stack([f for _, f in decode(clip)])
    return seg.run(frames)


def test_video_writes_each_head(sift, clip, tmp_path):
    from test_video import audio_packets, decode

    from fastfcn.video import segment_video

    s = segment_video(clip, tmp_path / "out.mp4", sift, labels_out=tmp_path / "lab.mkv", batch_size=4,
                      progress=False)  # fmt: skip
    want = _want(sift, clip)
    assert s["frames_out"] == 6 and set(s["heads"]) == set(HEADS)
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "lab.mkv").exists()
    times = [t for t, _ in decode(clip)]
    for name in HEADS:
        assert s["heads"][name] == {"destination": str(tmp_path / f"out.{name}.mp4"),
                                    "labels_out": str(tmp_path / f"lab.{name}.mkv")}  # fmt: skip
        labels = decode(tmp_path / f"lab.{name}.mkv")
        assert [t for t, _ in labels] == times
        got = np.stack([f for _, f in labels])
        assert np.array_equal(got, want[name].numpy()), name
        pictures = decode(tmp_path / f"out.{name}.mp4")
        assert [t for t, _ in pictures] == times and pictures[0][1].shape == (48, 64, 3)
        assert audio_packets(tmp_path / f"out.{name}.mp4") == audio_packets(clip)
    # the two heads' pictures are their own: the semantic and geometric colours differ
    sem, geo = (decode(tmp_path / f"out.{n}.mp4")[0][1].astype(int) for n in HEADS)
    assert np.abs(sem - geo).mean() > 5


def test_video_label_folders_and_mapping_per_head(sift, clip, tmp_path):
    from PIL import Image

    from fastfcn.video import segment_video

    want = _want(sift, clip)
    segment_video(clip, tmp_path / "labels/", sift, mode="labels", every=2, progress=False)
    for name in HEADS:
        files = sorted((tmp_path / "labels" / name).iterdir())
        assert len(files) == 6
        for k, f in enumerate(files):  # every=2: frame k has the labels of frame k - k % 2
            assert np.array_equal(np.asarray(Image.open(f)), want[name][k - k % 2].numpy()), (name, k)
    dst = {"semantic": tmp_path / "a.mkv", "geometric": tmp_path / "b.mkv"}
    s = segment_video(clip, dst, sift, mode="labels", progress=False)
    assert s["destination"] == f"{dst['semantic']}, {dst['geometric']}"
    with pytest.raises(InputError, match=r"destination is a mapping of \['semantic'\]; expected one path per "
                                         r"head \(semantic, geometric\)"):  # fmt: skip
        segment_video(clip, {"semantic": tmp_path / "c.mkv"}, sift, mode="labels", progress=False)
    with pytest.raises(InputError, match="heads semantic and geometric would both write"):
        segment_video(clip, {"semantic": tmp_path / "c.mkv", "geometric": tmp_path / "c.mkv"}, sift,
                      mode="labels", progress=False)  # fmt: skip


def test_video_mapping_is_refused_for_one_head(clip, tmp_path):
    from fastfcn.video import segment_video

    seg = fastfcn.Segmenter(small("pascalcontext-fcn32s"), backend="torch", device="cpu")
    with pytest.raises(InputError, match=r"expected one path \(the net has one head\)"):
        segment_video(clip, {"semantic": tmp_path / "a.mkv"}, seg, mode="labels", progress=False)


def test_video_refuses_two_input_nets_before_writing(clip, tmp_path):
    from fastfcn.video import segment_video

    seg = fastfcn.Segmenter(fastfcn.models.build("nyud-fcn32s-color-d", width=1 / 16, num_classes=5).eval(),
                            backend="torch", device="cpu")  # fmt: skip
    with pytest.raises(InputError, match=r"takes two inputs \(color \+ depth\) but a video frame is one "
                                         r"image; segment image files with `fastfcn segment --depth DIR`"):
        segment_video(clip, tmp_path / "out.mp4", seg, labels_out=tmp_path / "lab.mkv", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_video_two_heads(sift_file, clip, tmp_path, capsys):
    rc = cli.main(["video", str(sift_file), str(clip), str(tmp_path / "seg.mp4"), "--mode", "side-by-side",
                   "--labels-out", str(tmp_path / "png"), "--backend", "torch", "--device", "cpu",
                   "--precision", "fp32", "--quiet"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert f"{tmp_path / 'seg.semantic.mp4'}, {tmp_path / 'seg.geometric.mp4'}" in err
    for name in HEADS:
        assert (tmp_path / f"seg.{name}.mp4").is_file()
        assert len(list((tmp_path / "png" / name).glob("frame_*.png"))) == 6
    assert cli.main(["video", "--help"]) == 0
    assert "OUT.semantic.mp4 and OUT.geometric.mp4" in " ".join(capsys.readouterr().out.split())
