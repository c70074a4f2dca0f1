"""fastfcn.video.segment_video and `fastfcn video`: frames, timestamps, audio, labels, errors."""

import fractions
import os
import re
import threading

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'fastfcn[video]'")

import fastfcn  # noqa: E402
from fastfcn import cli  # noqa: E402
from fastfcn.demo import DEMO_MODEL  # noqa: E402
from fastfcn.errors import InputError  # noqa: E402
from fastfcn.video import segment_video, write_depth_video, write_video  # noqa: E402

MS = fractions.Fraction(1, 1000)


def write_flat_frames(out, vs, n, step, base=0, fmt="rgb24"):
    """``n`` flat frames of value ``base + step * k`` at pts k into the video stream ``vs`` of
    ``out``; ``fmt``: "rgb24" or "gray"."""
    shape = (vs.height, vs.width, 3) if fmt == "rgb24" else (vs.height, vs.width)
    for k in range(n):
        f = av.VideoFrame.from_ndarray(np.full(shape, base + step * k, np.uint8), format=fmt)
        f.pts = k
        for p in vs.encode(f):
            out.mux(p)
    for p in vs.encode(None):
        out.mux(p)


def write_tone(out, a, packets):
    """``packets`` x 1024 samples of a 16 kHz mono tone into the AAC stream ``a`` of ``out``."""
    for i in range(packets):
        tone = np.sin(np.arange(i * 1024, (i + 1) * 1024) * 0.05).astype(np.float32)[None]
        af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        af.sample_rate, af.pts, af.time_base = 16000, i * 1024, fractions.Fraction(1, 16000)
        for p in a.encode(af):
            out.mux(p)
    for p in a.encode(None):
        out.mux(p)


def make_video(path, n=12, size=(48, 64), audio=True, codec="libx264", step=(40, 40, 73)):
    """A VFR video: frame k at a timestamp that advances 40, 40, 73 ms, ... ; noise-free
    gradients that move, so frames differ. Returns the timestamps in ms."""
    h, w = size
    out = av.open(str(path), "w")
    vs = out.add_stream(codec, rate=25)
    vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
    vs.time_base = vs.codec_context.time_base = MS
    a = out.add_stream("aac", rate=16000) if audio else None
    yy, xx = np.mgrid[0:h, 0:w]
    pts, stamps = 0, []
    for k in range(n):
        img = np.stack([(xx * 4 + 9 * k) % 256, (yy * 5) % 256, ((xx + yy) * 3 + 20 * k) % 256], -1)
        f = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
        f.pts, f.time_base = pts, MS
        stamps.append(pts)
        pts += step[k % len(step)]
        for p in vs.encode(f):
            out.mux(p)
    for p in vs.encode(None):
        out.mux(p)
    if a is not None:
        write_tone(out, a, int(pts / 1000 * 16000 / 1024) + 1)
    out.close()
    return stamps


def decode(path):
    """[(time in s, (H, W, 3) RGB or (H, W) gray)] of the first video stream."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        fmt = "gray" if s.codec_context.pix_fmt == "gray" else "rgb24"
        return [(f.time, f.to_ndarray(format=fmt)) for f in c.decode(s)]


def audio_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.dts is not None]


@pytest.fixture(scope="module")
def seg():
    return fastfcn.Segmenter(DEMO_MODEL, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    make_video(path)
    return path


def test_overlay_keeps_every_frame_timestamp_and_audio(seg, clip, tmp_path):
    out = tmp_path / "out.mp4"
    s = segment_video(clip, out, seg, batch_size=3, progress=False)
    src, dst = decode(clip), decode(out)
    assert s["frames_in"] == s["frames_out"] == s["segmented"] == len(src) == len(dst) == 12
    assert [t for t, _ in dst] == pytest.approx([t for t, _ in src], abs=1e-6)  # VFR: 40, 40, 73 ms
    assert audio_packets(out) == audio_packets(clip) and len(audio_packets(clip)) > 5
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.name, cc.pix_fmt, cc.width, cc.height) == ("h264", "yuv420p", 64, 48)
    assert 0 < s["fps"] and abs(s["decode_share"] + s["inference_share"] + s["encode_share"] - 1) < 1e-9


def test_label_video_round_trip_is_exact(seg, clip, tmp_path):
    out = tmp_path / "labels.mkv"
    segment_video(clip, out, seg, mode="labels", batch_size=8, progress=False)
    src, lab = decode(clip), decode(out)
    assert len(lab) == len(src)
    expect = seg.run([f for _, f in src])
    for (t, got), (ts, _), e in zip(lab, src, expect):
        assert abs(t - ts) < 1e-6 and got.dtype == np.uint8
        np.testing.assert_array_equal(got, e.cpu().numpy())
    assert len({g.tobytes() for _, g in lab}) > 1  # the frames differ, so order is checked


def test_every_reuses_labels_and_png_labels_out(seg, clip, tmp_path):
    out, pngs = tmp_path / "sbs.mp4", tmp_path / "labels"
    s = segment_video(clip, out, seg, mode="side-by-side", every=5, labels_out=pngs, progress=False)
    assert s["frames_out"] == 12 and s["segmented"] == 3  # frames 0, 5, 10
    from PIL import Image

    files = sorted(pngs.glob("frame_*.png"))
    assert len(files) == 12
    maps = [np.array(Image.open(f)) for f in files]
    src = decode(clip)
    for k, m in enumerate(maps):
        np.testing.assert_array_equal(m, seg.run(src[k - k % 5][1]).cpu().numpy())
    assert decode(out)[0][1].shape == (48, 128, 3)



def test_a_label_folder_holds_this_runs_frames_only(seg, clip, tmp_path):
    """A second, shorter run into the label folder of a first one: the folder holds the second
    run's frames only, as a label video would (the first run's frame_000005.png ... are not left
    beside them as if they were frames of this run); other files stay."""
    from PIL import Image

    pngs = tmp_path / "labels"
    segment_video(clip, tmp_path / "a.mkv", seg, mode="labels", labels_out=pngs, progress=False)
    assert len(list(pngs.glob("frame_*.png"))) == 12
    (pngs / "notes.txt").write_text("mine")
    (pngs / "frame_12.png").write_bytes(b"not one of ours")
    s = segment_video(clip, tmp_path / "b.mkv", seg, mode="labels", labels_out=pngs, duration=0.2,
                      progress=False)  # fmt: skip
    files = sorted(f.name for f in pngs.iterdir())
    assert s["frames_out"] == 5
    assert files == [f"frame_{k:06d}.png" for k in range(5)] + ["frame_12.png", "notes.txt"]
    for f, (_, lab) in zip(sorted(pngs.glob("frame_0*.png")), decode(tmp_path / "b.mkv")):
        np.testing.assert_array_equal(np.array(Image.open(f)), lab)

def test_start_and_duration_select_by_time(seg, clip, tmp_path):
    out = tmp_path / "part.mkv"
    s = segment_video(clip, out, seg, mode="labels", start=0.1, duration=0.3, progress=False)
    want = [t for t, _ in decode(clip) if 0.1 <= t < 0.4]
    got = [t for t, _ in decode(out)]
    assert got == pytest.approx(want, abs=1e-3) and s["frames_out"] == len(want) == 6



def test_start_in_an_mpeg_ts_keeps_every_frame_of_the_range(seg, tmp_path):
    """MPEG-TS (.ts / .mts: camcorders, broadcast, DVRs) has no index: a seek to start lands on
    a packet near it, not on the keyframe before it, and the frames up to the next keyframe
    were lost (start=1.5: 1 frame of 15 written, from 2.08 s)."""
    src = tmp_path / "cam.ts"
    with av.open(str(src), "w") as c:
        s = c.add_stream("libx264", rate=25, options={"g": "25", "keyint_min": "25", "sc_threshold": "0"})
        s.height, s.width, s.pix_fmt = 48, 64, "yuv420p"
        for k in range(100):  # a keyframe every second
            f = av.VideoFrame.from_ndarray(np.random.default_rng(k).integers(0, 256, (48, 64, 3), np.uint8),
                                           format="rgb24")  # fmt: skip
            f.pts = k
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    stored = decode(src)
    for start in (1.5, 2.3):
        want = [(t, a) for t, a in stored if start <= t < start + 0.6]
        out = tmp_path / "labels.mkv"
        summary = segment_video(src, out, seg, mode="labels", start=start, duration=0.6, progress=False)
        got = decode(out)
        assert summary["frames_out"] == len(got) == len(want) == 15
        assert [t for t, _ in got] == pytest.approx([t for t, _ in want], abs=1e-6)
        expect = seg.run([a for _, a in want])
        assert all(np.array_equal(g, e.numpy()) for (_, g), e in zip(got, expect))

def test_odd_size_is_encoded(seg, tmp_path):
    src = tmp_path / "odd.mkv"
    make_video(src, n=4, size=(33, 45), audio=False, codec="ffv1")
    out = tmp_path / "odd.mp4"
    segment_video(src, out, seg, progress=False)
    frames = decode(out)
    assert len(frames) == 4 and frames[0][1].shape == (33, 45, 3)


def test_a_range_without_frames_is_an_error_not_an_empty_success(seg, clip, tmp_path):
    """start past the end, a range between two frames, a file whose video stream holds no frame:
    InputError saying nothing was written (an earlier run's file stays as it was, no label folder
    is left behind), not a summary of 0 frames naming a destination that was never written."""
    out = tmp_path / "seg.mp4"
    out.write_bytes(b"an earlier run's video")
    labels = tmp_path / "labels" / "run"
    for kwargs, message in (
        ({"start": 5}, r"no frame from 5\.000 s to its end \(start / duration, in seconds of the video's "
                       r"timeline\): the last frame before it is at 0\.539 s; nothing was written$"),
        ({"start": 0.01, "duration": 0.02},
         r"no frame from 0\.010 s to 0\.030 s .*: the last frame before it is at 0\.000 s, the first frame "
         r"after it at 0\.040 s; nothing"),
    ):  # fmt: skip
        with pytest.raises(InputError, match=f"^{re.escape(str(clip))}: {message}"):
            segment_video(clip, out, seg, labels_out=labels, progress=False, **kwargs)
        assert out.read_bytes() == b"an earlier run's video" and not (tmp_path / "labels").exists()
    silent = tmp_path / "no_frames.mkv"  # a video stream and an audio stream, frames only in the audio
    with av.open(str(silent), "w") as c:
        v = c.add_stream("ffv1", rate=25)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        f.sample_rate, f.pts = 8000, 0
        for p in [*a.encode(f), *a.encode(None)]:
            c.mux(p)
    nothing = "has no video frames; nothing was written$"
    with pytest.raises(InputError, match=f"^{re.escape(str(silent))}: {nothing}"):
        segment_video(silent, out, seg, labels_out=labels, progress=False)
    assert out.read_bytes() == b"an earlier run's video" and not (tmp_path / "labels").exists()


def test_a_rotated_video_stays_rotated(seg, tmp_path):
    """A phone's portrait video stores landscape frames and a display rotation players apply: the
    outputs, stored as the input's frames are, carry the same rotation, so they play upright as
    the input does (they played sideways)."""
    src = tmp_path / "phone.mp4"
    with av.open(str(src), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(90)
        write_flat_frames(c, s, 3, 60)
    segment_video(src, tmp_path / "o.mp4", seg, labels_out=tmp_path / "l.mkv", progress=False)
    for path in (src, tmp_path / "o.mp4", tmp_path / "l.mkv"):
        with av.open(str(path)) as c:
            frames = list(c.decode(video=0))
        assert [(f.rotation, f.width, f.height) for f in frames] == [(90, 64, 48)] * 3, path

def test_corrupt_video_writes_frames_before_the_damage(seg, tmp_path):
    src = tmp_path / "clip.mp4"
    make_video(src, n=40, audio=False)
    data = bytearray(src.read_bytes())
    at = data.find(b"mdat")  # garbage in the middle of the coded frames (the index stays intact)
    mid = at + int.from_bytes(data[at - 4:at], "big") // 2
    data[mid:mid + 1000] = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    with pytest.raises(InputError, match=r"corrupt or truncated at frame \d+ \(t=") as e:
        segment_video(bad, out, seg, progress=False)
    n = int(re.search(r"at frame (\d+)", str(e.value)).group(1))
    assert 0 < n < 40
    assert len(decode(out)) == n  # closed and playable, every frame before the damage
    assert not [t for t in threading.enumerate() if t.name.startswith("fastfcn-stream")]


def test_truncated_video_is_reported(seg, tmp_path):
    src = tmp_path / "clip.mkv"
    make_video(src, n=40, audio=False)
    cut = tmp_path / "cut.mkv"
    data = src.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "out.mkv"
    with pytest.raises(InputError, match="truncated at frame"):
        segment_video(cut, out, seg, mode="labels", progress=False)
    assert 0 < len(decode(out)) < 40


@pytest.mark.parametrize("codec", ["libx264", "ffv1"])
@pytest.mark.parametrize("frac", [0.3, 0.5, 0.8])
def test_truncated_video_with_audio_is_reported(seg, tmp_path, codec, frac):
    """Matroska records no frame count and its header's duration is the whole file's, which may
    be the audio's: a file with audio cut short was taken as complete (half of it written, exit
    0). What was read now ends at the later of the last frame and the audio."""
    src = tmp_path / "clip.mkv"
    make_video(src, n=30, size=(16, 16), codec=codec)
    cut = tmp_path / "cut.mkv"
    data = src.read_bytes()
    cut.write_bytes(data[: int(len(data) * frac)])
    out = tmp_path / "out.mkv"
    with pytest.raises(InputError, match="truncated at frame"):
        segment_video(cut, out, seg, mode="labels", progress=False)
    assert len(decode(out)) < 30


def test_whole_video_with_longer_audio_is_complete(seg, tmp_path):
    """The file's declared end is its audio's, 2 s past the last frame: not a truncation."""
    src = tmp_path / "clip.mkv"
    out = av.open(str(src), "w")
    vs = out.add_stream("libx264", rate=25)
    vs.width, vs.height, vs.pix_fmt = 16, 16, "yuv420p"
    a = out.add_stream("aac", rate=16000)
    write_flat_frames(out, vs, 10, 20)
    write_tone(out, a, 40)  # 40 x 64 ms = 2.56 s of audio beside 0.4 s of video
    out.close()
    with av.open(str(src)) as c:
        assert c.duration / 1e6 > 2.0  # the header's end is the audio's
    summary = segment_video(src, tmp_path / "out.mkv", seg, mode="labels", progress=False)
    assert summary["frames_out"] == 10 and len(decode(tmp_path / "out.mkv")) == 10


def test_a_label_video_the_encoder_refuses_says_what_to_do(seg, tmp_path):
    """FFV1 refuses a 1-pixel-wide frame taller than 1 with "Function not implemented": the error
    names the first frame's size and the encoder, and offers the folder of PNGs, which works."""
    src = tmp_path / "thin.nut"
    with av.open(str(src), "w") as c:
        s = c.add_stream("png", rate=25)
        s.width, s.height, s.pix_fmt = 1, 8, "rgb24"
        write_flat_frames(c, s, 3, 50)
    with pytest.raises(InputError, match=r"at its first frame, 1x8, with FFmpeg.s ffv1 encoder; .* of PNGs"):
        segment_video(src, tmp_path / "l.mkv", seg, mode="labels", progress=False)
    summary = segment_video(src, tmp_path / "labels/", seg, mode="labels", progress=False)
    assert summary["frames_out"] == 3 and len(list((tmp_path / "labels").glob("frame_*.png"))) == 3


def test_timestamps_that_go_back_are_named_in_the_input(seg, tmp_path):
    """Two MPEG-TS files joined end to end (`cat a.ts b.ts`, as recorded segments are joined):
    the second part's timestamps start again. A video output stopped with "o.mkv: cannot write
    the output video (Invalid argument)", blaming the output; now the input's frame is named,
    after the frames before it; a folder of PNGs, which has no timestamps, takes every frame."""
    part = tmp_path / "part.ts"
    make_video(part, n=10, audio=False)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(part.read_bytes() * 2)
    times = [t for t, _ in decode(joined)]
    assert len(times) == 20 and times[10] < times[9]
    out = tmp_path / "o.mkv"
    message = (f"^{re.escape(str(joined))}: frame 10 is at {times[10]:.3f} s, not after frame 9 at "
               f"{times[9]:.3f} s: its timestamps go back .* the 10 frames before it were written$")
    with pytest.raises(InputError, match=message):
        segment_video(joined, out, seg, mode="labels", batch_size=4, progress=False)
    assert [t for t, _ in decode(out)] == pytest.approx(times[:10], abs=1e-6)
    s = segment_video(joined, tmp_path / "pngs", seg, mode="labels", progress=False)
    assert s["frames_out"] == len(list((tmp_path / "pngs").glob("frame_*.png"))) == 20

def test_cli_writes_overlay_and_summary(clip, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    rc = cli.main(["video", str(DEMO_MODEL), str(clip), str(out), "--batch-size", "4", "--device", "cpu",
                   "--labels-out", str(tmp_path / "l.mkv")])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "12 frames in, 12 out" in err and "frames/s" in err
    assert len(decode(out)) == len(decode(tmp_path / "l.mkv")) == 12


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("text", "not a readable video"),
        ("audio_only", "no video stream"),
        ("same", "is the input"),
        ("no_folder", "does not exist"),
        ("label_suffix", "lossless FFV1"),
        ("webm", "o.webm: the webm format cannot hold H.264 video, which mode 'overlay' writes; expected"),
        ("folder_out", "o.mp4: is a folder; mode 'overlay' writes one video file (.mp4"),
        ("no_suffix", "o: no video format has the suffix ''; mode 'overlay' writes one H.264 video file"),
    ],
)
def test_cli_bad_input_one_line_status_1(clip, tmp_path, capsys, case, message):
    src, out = clip, tmp_path / "o.mp4"
    extra = []
    if case == "missing":
        src = tmp_path / "nope.mp4"
    elif case == "text":
        src = tmp_path / "notes.mp4"
        src.write_text("not a video\n" * 50)
    elif case == "audio_only":
        src = tmp_path / "tone.wav"
        with av.open(str(src), "w") as c:
            a = c.add_stream("pcm_s16le", rate=8000)
            f = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            f.sample_rate = 8000
            for p in a.encode(f):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
    elif case == "same":
        out = clip
    elif case == "no_folder":
        out = tmp_path / "missing" / "o.mp4"
    elif case == "label_suffix":
        extra = ["--labels-out", str(tmp_path / "labels.mp4")]
    elif case in ("webm", "no_suffix"):  # these failed at the first frame, after the model loaded
        out = tmp_path / ("o.webm" if case == "webm" else "o")
    elif case == "folder_out":
        out.mkdir()
    rc = cli.main(["video", str(DEMO_MODEL), str(src), str(out), "--device", "cpu", "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err
    assert os.path.getsize(clip) > 0


def test_bad_options(seg, clip, tmp_path):
    for kw, msg in (({"mode": "mask"}, "mode"), ({"alpha": 2}, "alpha"), ({"every": 0}, "every"),
                    ({"batch_size": 0}, "batch_size"), ({"duration": 0}, "duration")):  # fmt: skip
        with pytest.raises(InputError, match=msg):
            segment_video(clip, tmp_path / "o.mp4", seg, progress=False, **kw)


def test_stream_accepts_video_frames(seg, clip):
    with av.open(str(clip)) as c:
        frames = list(c.decode(video=0))
    got = list(seg.stream(frames, batch_size=5))
    assert len(got) == len(frames)
    for f, r in zip(frames, got):
        assert torch.equal(r, seg.run(f.to_ndarray(format="rgb24")).cpu())


def test_thousand_vfr_frames_in_order_with_their_timestamps(tmp_path):
    torch.manual_seed(0)
    model = fastfcn.models.build("fcn-alexnet", width=0.03125, num_classes=3).eval()
    tiny = fastfcn.Segmenter(model, device="cpu", precision="fp32")
    src = tmp_path / "many.mkv"
    stamps = make_video(src, n=1000, size=(16, 16), audio=False, codec="ffv1", step=(40, 33, 51, 40))
    out = tmp_path / "labels.mkv"
    s = segment_video(src, out, tiny, mode="labels", batch_size=16, progress=False)
    got = decode(out)
    assert s["frames_in"] == s["frames_out"] == len(got) == 1000
    assert [round(t * 1000) for t, _ in got] == stamps
    expect = tiny.run([f for _, f in decode(src)])
    assert all(np.array_equal(g, e.numpy()) for (_, g), e in zip(got, expect))



def test_raw_h264_without_timestamps_is_timed_by_its_frame_rate(seg, tmp_path):
    """A raw H.264 stream (.h264: what Raspberry Pi cameras and many dashcams write) stores no
    timestamps: its frames are k / rate, as FFmpeg plays them, and start / duration select by
    those times (the file cannot be seeked by time; it is decoded from its first frame)."""
    src = tmp_path / "cam.h264"
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (10, 48, 64, 3), dtype=np.uint8)
    with av.open(str(src), "w", format="h264") as c:
        s = c.add_stream("libx264", rate=25, options={"crf": "0"})
        s.height, s.width, s.pix_fmt = 48, 64, "yuv444p"
        for k, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = k
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    with av.open(str(src)) as c:
        stored = [f for f in c.decode(video=0)]
        assert len(stored) == 10 and all(f.pts is None for f in stored)
        stored = [f.to_ndarray(format="rgb24") for f in stored]
    for kwargs, ks in (({}, range(10)), ({"start": 0.2, "duration": 0.2}, range(5, 10)),
                       ({"start": 0.1, "duration": 0.1}, range(3, 5))):  # fmt: skip
        out = tmp_path / "labels.mkv"
        summary = segment_video(src, out, seg, mode="labels", progress=False, **kwargs)
        got = decode(out)
        assert summary["frames_out"] == len(got) == len(ks), kwargs
        assert [t for t, _ in got] == pytest.approx([k / 25 for k in ks], abs=1e-6)
        expect = seg.run([stored[k] for k in ks])
        assert all(np.array_equal(g, e.numpy()) for (_, g), e in zip(got, expect))
    over = tmp_path / "over.mp4"
    segment_video(src, over, seg, progress=False)
    assert [t for t, _ in decode(over)] == pytest.approx([k / 25 for k in range(10)], abs=1e-6)

# ------------------------------------------------------------------- RGB-D: depth and HHA videos

RGBD = {"depth": "nyud-fcn32s-color-d", "hha": "nyud-fcn32s-color-hha"}


@pytest.fixture(scope="module")
def rgbd():
    from helpers import rgbd_net

    return {kw: fastfcn.Segmenter(rgbd_net(arch), device="cpu", backend="torch", precision="fp32")
            for kw, arch in RGBD.items()}  # fmt: skip


def rgbd_clip(folder, keyword, n=8, second_n=None, size=(24, 32), seed=0):
    """A lossless colour video of ``n`` random frames at 25 fps and its second video (depth:
    uint16 millimetres, FFV1 gray16le; HHA: lossless RGB) of ``second_n`` frames (default n).
    Returns (colour path, second path, colour frames, second frames)."""
    rng = np.random.default_rng(seed)
    h, w = size
    color = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    m = n if second_n is None else second_n
    second = folder / f"{keyword}.mkv"
    if keyword == "depth":
        maps = rng.integers(500, 10000, (m, h, w), dtype=np.uint16)
        write_depth_video(second, maps)
    else:
        maps = rng.integers(0, 256, (m, h, w, 3), dtype=np.uint8)
        write_video(second, maps, lossless=True)
    write_video(folder / "color.mkv", color, lossless=True)
    return folder / "color.mkv", second, color, maps


def assert_paired(seg, keyword, labels, color, second, index):
    """labels[k] == run(color[index[k]], keyword=second[index[k]]), and the check can fail: the
    labels of some frame change when it is given its neighbour's second input."""
    assert len(labels) == len(index)
    for lab, i in zip(labels, index):
        np.testing.assert_array_equal(lab, seg.run(color[i], **{keyword: second[i]}).numpy())
    used = sorted(set(index))
    moved = [seg.run(color[i], **{keyword: second[(i + 1) % len(second)]}).numpy() for i in used]
    assert sum(not np.array_equal(m, labels[index.index(i)]) for m, i in zip(moved, used)) >= 1


def test_depth_video_round_trips_uint16_exactly(tmp_path):
    rng = np.random.default_rng(1)
    maps = rng.integers(0, 65536, (3, 10, 14), dtype=np.uint16)
    maps[0, 0, :3] = (0, 1, 65535)
    path = tmp_path / "d.mkv"
    assert write_depth_video(path, [maps[0], torch.from_numpy(maps[1].astype(np.int32)),
                                    maps[2].astype(np.float64)[..., None]], fps=30) == 3  # fmt: skip
    with av.open(str(path)) as c:
        cc = c.streams.video[0].codec_context
        assert (cc.name, cc.pix_fmt) == ("ffv1", "gray16le")
        got = [f.to_ndarray(format="gray16le") for f in c.decode(video=0)]
    assert len(got) == 3 and all(g.dtype == np.uint16 and np.array_equal(g, m) for g, m in zip(got, maps))
    bad = [
        ([maps[0].astype(np.uint8)], "depth map 0 has dtype uint8; .*8-bit depth holds no millimetres"),
        ([maps[0] + 0.5], "not whole millimetres in 0..65535"),
        ([maps[0].astype(np.int32) - 1], "not whole millimetres in 0..65535"),
        ([maps[0].astype(np.int64) + 70000], "not whole millimetres in 0..65535"),
        ([maps[0], maps[1][:, :12]], "depth map 1 is 12x10 but depth map 0 is 14x10"),
        ([maps[0][None]], r"has shape \(1, 10, 14\); expected \(H, W\)"),
    ]
    for frames, message in bad:
        with pytest.raises(InputError, match=message):
            write_depth_video(tmp_path / "bad.mkv", frames)
    with pytest.raises(InputError, match="a depth video is lossless FFV1 in .mkv"):
        write_depth_video(tmp_path / "d.mp4", maps)


@pytest.mark.parametrize("keyword", ["depth", "hha"])
def test_rgbd_video_labels_equal_run(rgbd, tmp_path, keyword):
    seg = rgbd[keyword]
    color, second, frames, maps = rgbd_clip(tmp_path, keyword)
    out = tmp_path / "labels.mkv"
    s = segment_video(color, out, seg, mode="labels", batch_size=3, progress=False, **{keyword: second})
    assert s["frames_in"] == s["frames_out"] == s["segmented"] == 8
    assert_paired(seg, keyword, [lab for _, lab in decode(out)], frames, maps, list(range(8)))


def test_rgbd_start_and_every_pair_the_same_frames(rgbd, tmp_path):
    seg = rgbd["depth"]
    color, depth, frames, maps = rgbd_clip(tmp_path, "depth", n=10)
    out = tmp_path / "part.mkv"
    # 25 fps: frames 2..7 of both (t = 0.08 .. 0.28 s); every 2: frames 2, 4, 6 segmented
    s = segment_video(color, out, seg, mode="labels", start=0.08, duration=0.24, every=2, batch_size=2,
                      depth=depth, progress=False)  # fmt: skip
    assert (s["frames_in"], s["frames_out"], s["segmented"]) == (6, 6, 3)
    assert_paired(seg, "depth", [lab for _, lab in decode(out)], frames, maps, [2, 2, 4, 4, 6, 6])


def test_rgbd_side_by_side_shows_the_colour_frames_with_their_audio(rgbd, clip, tmp_path):
    src = decode(clip)
    hha = tmp_path / "hha.mkv"
    write_video(hha, [f[::-1, ::-1].copy() for _, f in src], lossless=True)  # another picture
    out = tmp_path / "sbs.mp4"
    s = segment_video(clip, out, rgbd["hha"], mode="side-by-side", hha=hha, progress=False)
    got = decode(out)
    assert s["frames_out"] == len(got) == 12 and audio_packets(out) == audio_packets(clip)
    for (_, o), (_, c) in zip(got, src):
        left = o[:, :64].astype(int)
        # H.264 at crf 20: 2.4-3.6 mean from the colour frame (measured), 78-105 from the HHA one
        assert np.abs(left - c).mean() < 6 and np.abs(left - c[::-1, ::-1]).mean() > 40


@pytest.mark.parametrize("second_n, message", [
    (5, "depth.mkv has 5 frames, .*color.mkv 8: the depth video ends early"),
    (10, "depth.mkv has 10 frames, .*color.mkv 8: the depth video runs longer"),
])  # fmt: skip
def test_depth_video_of_another_length_is_an_error_after_the_paired_frames(rgbd, tmp_path, second_n, message):
    seg = rgbd["depth"]
    color, depth, frames, maps = rgbd_clip(tmp_path, "depth", n=8, second_n=second_n)
    out = tmp_path / "labels.mkv"
    paired = min(8, second_n)
    with pytest.raises(InputError, match=f"{message} .*; the {paired} paired frames were written$"):
        segment_video(color, out, seg, mode="labels", batch_size=3, depth=depth, progress=False)
    assert_paired(seg, "depth", [lab for _, lab in decode(out)], frames, maps, list(range(paired)))
    assert not [t for t in threading.enumerate() if t.name.startswith("fastfcn-stream")]
    # from 0.04 s: one frame fewer of each
    ranged = f"has {second_n - 1} frames in the range \\(start / duration\\), .*color.mkv 7"
    with pytest.raises(InputError, match=ranged):
        segment_video(color, tmp_path / "l2.mkv", seg, mode="labels", start=0.04, depth=depth, progress=False)


def _gray8_video(path, n=3, size=(24, 32)):
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = size[1], size[0], "gray"
        write_flat_frames(c, s, n, 1, base=40, fmt="gray")


def test_rgbd_refusals_before_anything_is_written(rgbd, seg, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    color, depth, _, _ = rgbd_clip(inputs, "depth", n=3)
    gray8, narrow = inputs / "gray8.mkv", inputs / "narrow.mkv"
    _gray8_video(gray8)
    write_depth_video(narrow, np.full((3, 24, 30), 900, np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    esc = lambda p: re.escape(str(p))  # noqa: E731
    cases = [
        (rgbd["depth"], {"depth": gray8}, InputError,
         f"^{esc(gray8)}: the depth video's pixel format is gray; depth videos are 16-bit greyscale"),
        (rgbd["depth"], {"depth": color}, InputError,
         f"^{esc(color)}: the depth video's pixel format is bgr0;"),
        (rgbd["depth"], {"depth": narrow}, InputError,
         f"^{esc(narrow)} is 30x24 but {esc(color)} is 32x24; the depth video must have"),
        (rgbd["depth"], {"hha": depth}, InputError,
         r"^nyud-fcn32s-color-d takes color images and depth: pass depth=VIDEO \(and only it\)$"),
        (rgbd["depth"], {"depth": depth, "hha": depth}, InputError, "pass depth=VIDEO"),
        (rgbd["hha"], {"depth": depth}, InputError,
         "nyud-fcn32s-color-hha takes color images and hha: pass hha="),
        (seg, {"depth": depth}, InputError,
         r"^fcn8s takes one input \(color images\); depth= is for the two-input nets"),
        (rgbd["depth"], {"depth": inputs / "nope.mkv"}, FileNotFoundError, "nope.mkv: no such file"),
    ]
    for s, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            segment_video(color, out / "o.mp4", s, labels_out=out / "l.mkv", progress=False, **kwargs)
        assert list(out.iterdir()) == []
    with pytest.raises(InputError, match="the destination is the second input's video"):
        segment_video(color, depth, rgbd["depth"], depth=depth, progress=False)


def test_cli_rgbd_video(rgbd, tmp_path, capsys):
    color, depth, frames, maps = rgbd_clip(tmp_path, "depth", n=4)
    from helpers import rgbd_net

    ckpt = fastfcn.save(rgbd_net("nyud-fcn32s-color-d"), tmp_path / "colord.safetensors")  # rgbd's model
    common = ["--backend", "torch", "--device", "cpu", "--precision", "fp32", "--quiet"]
    out = tmp_path / "labels.mkv"
    assert cli.main(["video", str(ckpt), str(color), str(out), "--mode", "labels", "--depth", str(depth),
                     "--batch-size", "3", *common]) == 0  # fmt: skip
    assert "4 frames in, 4 out (4 segmented)" in capsys.readouterr().err
    assert_paired(rgbd["depth"], "depth", [lab for _, lab in decode(out)], frames, maps, list(range(4)))
    gray8 = tmp_path / "gray8.mkv"
    _gray8_video(gray8, n=4)
    for args, message in [
        (["--hha", str(depth)], "takes color images and depth: pass --depth VIDEO (and only it)"),
        ([], "nyud-fcn32s-color-d takes color images and depth: pass --depth VIDEO"),
        (["--depth", str(gray8)], f"{gray8}: the depth video's pixel format is gray;"),
        (["--depth", str(tmp_path / "nope.mkv")], "nope.mkv: no such file"),
    ]:
        rc = cli.main(["video", str(ckpt), str(color), str(tmp_path / "o.mp4"), *args, *common])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and message in err[0], err
    rc = cli.main(["video", str(DEMO_MODEL), str(color), str(tmp_path / "o.mp4"), "--depth", str(depth),
                   *common])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "fcn8s takes one input (color images); --depth is for" in err[0]
    assert not (tmp_path / "o.mp4").exists()


# ------------------------------------------- RGB-D pairing by time; second videos changing mid-stream


def depth_at(ms, size=(24, 32)):
    """The depth map of the time ``ms`` (a function of the time alone): a depth frame paired
    with a colour frame of another time gives other labels (checked in each test)."""
    return np.random.default_rng(1000 + ms).integers(500, 10000, size, dtype=np.uint16)


def timed_depth(path, stamps_ms, size=(24, 32)):
    """A depth video (FFV1 gray16le, millisecond time base) with a frame at each of
    ``stamps_ms``, each ``depth_at`` its time. Returns the path."""
    from fastfcn.video import _VideoWriter

    w = _VideoWriter(path, fmt="gray16le", time_base=MS, rate=50)
    try:
        for ms in stamps_ms:
            w.write(depth_at(ms, size), ms, MS)
    finally:
        w.close()
    return path


@pytest.fixture(scope="module")
def colour25(tmp_path_factory):
    """8 random lossless colour frames at 25 fps (t = 0, 40, ..., 280 ms): (path, frames)."""
    frames = np.random.default_rng(5).integers(0, 256, (8, 24, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("colour25") / "color.mkv"
    write_video(path, frames, fps=25, lossless=True)
    return path, frames


def assert_labels(seg, labels, frames, depth_ms, wrong_ms):
    """labels[k] == run(frames[k], depth=depth_at(depth_ms[k])), and the check can fail: with
    the depth of ``wrong_ms`` (the pairing by index would make) some frame's labels differ."""
    assert len(labels) == len(depth_ms) == len(wrong_ms)
    for lab, f, ms in zip(labels, frames, depth_ms):
        np.testing.assert_array_equal(lab, seg.run(f, depth=depth_at(ms)).numpy())
    wrong = [seg.run(f, depth=depth_at(ms)).numpy() for f, ms in zip(frames, wrong_ms)]
    assert sum(not np.array_equal(w, lab) for w, lab in zip(wrong, labels)) >= 1


def test_pair_by_time_takes_the_depth_frame_at_the_colour_frames_time(rgbd, colour25, tmp_path, monkeypatch):
    seg, (color, frames) = rgbd["depth"], colour25
    depth = timed_depth(tmp_path / "depth50.mkv", range(0, 320, 20))  # 50 fps: 16 frames, 0..300 ms
    out = tmp_path / "labels.mkv"
    held = []  # the depth frames held after each pairing: the two around the colour frame's time
    nearest = fastfcn.video._Decoder.nearest

    def spy(self, *args, **kwargs):
        try:
            return nearest(self, *args, **kwargs)
        finally:
            held.append(len(self._near))

    monkeypatch.setattr(fastfcn.video._Decoder, "nearest", spy)
    s = segment_video(color, out, seg, mode="labels", batch_size=3, depth=depth, pair="time", progress=False)
    assert (s["frames_in"], s["frames_out"], s["segmented"], s["second_skipped"]) == (8, 8, 8, 8)
    assert held == [2] * 8
    got = decode(out)
    assert [round(t * 1000) for t, _ in got] == list(range(0, 320, 40))
    # colour frame i at 40i ms takes the depth frame at 40i ms; by index it would be the one at 20i
    assert_labels(seg, [lab for _, lab in got], frames, range(0, 320, 40), range(0, 160, 20))
    # the default stays frame i with frame i: 16 depth frames against 8 is an error
    with pytest.raises(InputError, match="depth50.mkv has 16 frames, .*color.mkv 8: the depth video runs"):
        segment_video(color, tmp_path / "index.mkv", seg, mode="labels", depth=depth, progress=False)


def test_pair_by_time_with_start_duration_and_every(rgbd, colour25, tmp_path):
    seg, (color, frames) = rgbd["depth"], colour25
    depth = timed_depth(tmp_path / "depth50.mkv", range(0, 320, 20))
    out = tmp_path / "part.mkv"
    # colour 80..200 ms (frames 2..5) take the depth frames at 80..200 ms; every 2: 2 and 4 segmented.
    # The depth frames in the range [80, 240) ms not taken: 100, 140, 180, 220 ms.
    s = segment_video(color, out, seg, mode="labels", start=0.08, duration=0.16, every=2, batch_size=2,
                      depth=depth, pair="time", progress=False)  # fmt: skip
    assert (s["frames_in"], s["frames_out"], s["segmented"], s["second_skipped"]) == (4, 4, 2, 4)
    assert_labels(seg, [lab for _, lab in decode(out)], frames[[2, 2, 4, 4]], [80, 80, 160, 160],
                  [40, 40, 80, 80])  # fmt: skip


def test_pair_by_time_measures_from_each_streams_start(rgbd, colour25, tmp_path):
    """A depth recording whose timestamps begin at 1 s (its start_time) is paired from its start:
    its frame at 1 s + 40i ms with colour frame i at 40i ms."""
    seg, (color, frames) = rgbd["depth"], colour25
    from fastfcn.video import _VideoWriter

    path = tmp_path / "late.mkv"
    w = _VideoWriter(path, fmt="gray16le", time_base=MS, rate=25)
    for ms in range(0, 320, 40):
        w.write(depth_at(ms), 1000 + ms, MS)  # the content is that of its time from the start
    w.close()
    with av.open(str(path)) as c:
        assert c.streams.video[0].start_time * c.streams.video[0].time_base == 1
    out = tmp_path / "labels.mkv"
    s = segment_video(color, out, seg, mode="labels", depth=path, pair="time", progress=False)
    assert (s["frames_out"], s["second_skipped"]) == (8, 0)
    neighbours = [40 * (i + 1) % 320 for i in range(8)]
    assert_labels(seg, [lab for _, lab in decode(out)], frames, range(0, 320, 40), neighbours)
    # by index too (its Matroska header declares the end time, 1.32 s: not a truncation)
    segment_video(color, tmp_path / "index.mkv", seg, mode="labels", depth=path, progress=False)
    by_index = [lab for _, lab in decode(tmp_path / "index.mkv")]
    assert_labels(seg, by_index, frames, range(0, 320, 40), neighbours)


def test_pair_by_time_gap_beyond_tolerance_is_an_error_after_the_frames_before(rgbd, colour25, tmp_path):
    seg, (color, frames) = rgbd["depth"], colour25
    # 50 fps with no frame from 100 to 180 ms: colour frame 3 (120 ms) is 40 ms from the nearest, 80 ms
    stamps = [*range(0, 100, 20), *range(200, 320, 20)]
    depth = timed_depth(tmp_path / "gap.mkv", stamps)
    out = tmp_path / "labels.mkv"
    message = (f"^{re.escape(str(color))}: frame 3 \\(t=0.120 s from the colour stream's start\\) has no "
               f"depth frame within 0.02 s: the nearest frame of {re.escape(str(depth))} is at t=0.080 s "
               r"from its stream's start \(pairing by time; .*\); the 3 frames before it were written$")
    with pytest.raises(InputError, match=message):
        segment_video(color, out, seg, mode="labels", batch_size=2, depth=depth, pair="time", progress=False)
    assert_labels(seg, [lab for _, lab in decode(out)], frames[:3], [0, 40, 80], [0, 20, 40])
    assert not [t for t in threading.enumerate() if t.name.startswith("fastfcn-stream")]
    # a wider tolerance pairs frame 3 with 80 ms and frame 4 (160 ms) with 200 ms; skipped: 20, 60,
    # 220, 260, 300 ms
    s = segment_video(color, tmp_path / "wide.mkv", seg, mode="labels", depth=depth, pair="time",
                      pair_tolerance=0.045, progress=False)  # fmt: skip
    assert (s["frames_out"], s["second_skipped"]) == (8, 5)
    assert_labels(seg, [lab for _, lab in decode(tmp_path / "wide.mkv")], frames,
                  [0, 40, 80, 80, 200, 200, 240, 280], [0, 20, 40, 60, 80, 200, 220, 240])  # fmt: skip
    # a depth stream that ends early: colour frame 4 (160 ms) is 40 ms from its last frame
    short = timed_depth(tmp_path / "short.mkv", range(0, 140, 20))
    with pytest.raises(InputError, match="frame 4 .*t=0.160 s.* the nearest frame of .*short.mkv is at "
                                         "t=0.120 s .*; the 4 frames before it were written$"):  # fmt: skip
        segment_video(color, tmp_path / "l3.mkv", seg, mode="labels", depth=short, pair="time",
                      progress=False)  # fmt: skip
    assert len(decode(tmp_path / "l3.mkv")) == 4
    # from 200 ms it has no frame at all (it is read from 180 ms, the tolerance before the range)
    none = (r"color.mkv: frame 0 \(t=0.200 s from the colour stream's start\) has no depth frame to pair "
            r"with: .*short.mkv has none in the range; the 0 frames before it were written$")
    with pytest.raises(InputError, match=none):
        segment_video(color, tmp_path / "l4.mkv", seg, mode="labels", depth=short, pair="time", start=0.2,
                      progress=False)  # fmt: skip


def png_video(path, frames, formats, fps=25):
    """A PNG-coded NUT video whose frame k is ``frames[k]`` in the pixel format ``formats[k]``:
    PNG carries size and pixel format in every frame, so both can change mid-stream (FFV1 and
    H.264 from one encoder cannot). Each frame gets its own encoder."""
    tb = fractions.Fraction(1, fps)
    with av.open(str(path), "w") as c:
        s = c.add_stream("png", rate=fps)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt, s.time_base = formats[0], tb
        for k, (a, fmt) in enumerate(zip(frames, formats)):
            enc = av.CodecContext.create("png", "w")
            enc.height, enc.width = a.shape[:2]
            enc.pix_fmt, enc.time_base = fmt, tb
            f = av.VideoFrame.from_ndarray(a, format=fmt)
            f.pts, f.time_base = k, tb
            for p in [*enc.encode(f), *enc.encode(None)]:
                p.stream, p.pts, p.dts, p.time_base = s, k, k, tb
                c.mux(p)
    return path


@pytest.mark.parametrize("pair", ["index", "time"])
def test_second_video_changing_size_or_pixel_format_mid_stream(rgbd, tmp_path, pair):
    """Each frame of the second video is checked as it is paired: frame 3 of another size, or
    (depth) 8-bit, is an InputError naming it after the 3 frames before it are written; an HHA
    frame in another pixel format is converted to RGB as the others."""
    rng = np.random.default_rng(7)
    colour = rng.integers(0, 256, (5, 24, 32, 3), dtype=np.uint8)
    color = tmp_path / "color.mkv"
    write_video(color, colour, lossless=True)
    depth = list(rng.integers(500, 10000, (5, 24, 32), dtype=np.uint16))
    hha = list(rng.integers(0, 256, (5, 24, 32, 3), dtype=np.uint8))
    when = " \\(t=0.120 s\\)" if pair == "time" else ""
    written = "; the 3 frames before it were written$"
    narrow_d, narrow_h = depth[:3] + [depth[3][:, :30]] + depth[4:], hha[:3] + [hha[3][:, :30]] + hha[4:]
    cases = [
        ("depth", png_video(tmp_path / "d_narrow.nut", narrow_d, ["gray16be"] * 5),
         f"frame 3{when} is 30x24 but frame 3 of {re.escape(str(color))} is 32x24; the depth video must "
         f"have the colour video's size{written}"),
        ("depth", png_video(tmp_path / "d_gray8.nut", [*depth[:3], (depth[3] // 64).astype(np.uint8),
                                                        depth[4]], ["gray16be"] * 3 + ["gray", "gray16be"]),
         f"frame 3{when} has the pixel format gray; every frame of a depth video must be 16-bit greyscale "
         f"millimetres \\(gray16le or gray16be\\){written}"),
        ("hha", png_video(tmp_path / "h_narrow.nut", narrow_h, ["rgb24"] * 5),
         f"frame 3{when} is 30x24 but frame 3 of {re.escape(str(color))} is 32x24; the hha video must "
         f"have the colour video's size{written}"),
    ]  # fmt: skip
    for keyword, second, message in cases:
        out = tmp_path / f"{second.stem}.mkv"
        with pytest.raises(InputError, match=f"^{re.escape(str(second))}: {message}"):
            segment_video(color, out, rgbd[keyword], mode="labels", batch_size=2, pair=pair, progress=False,
                          **{keyword: second})  # fmt: skip
        maps = depth if keyword == "depth" else hha
        assert_paired(rgbd[keyword], keyword, [lab for _, lab in decode(out)], colour, maps, [0, 1, 2])
    # an HHA frame in RGBA among RGB ones: decoded as RGB like the others
    rgba = np.concatenate([hha[3], np.full((24, 32, 1), 255, np.uint8)], -1)
    mixed = png_video(tmp_path / "h_rgba.nut", hha[:3] + [rgba] + hha[4:], ["rgb24"] * 3 + ["rgba", "rgb24"])
    out = tmp_path / "mixed.mkv"
    s = segment_video(color, out, rgbd["hha"], mode="labels", hha=mixed, pair=pair, progress=False)
    assert s["frames_out"] == 5
    assert_paired(rgbd["hha"], "hha", [lab for _, lab in decode(out)], colour, hha, list(range(5)))


def test_pair_options_are_checked(rgbd, seg, colour25, tmp_path):
    color, _ = colour25
    depth = timed_depth(tmp_path / "depth.mkv", range(0, 320, 40))
    out = tmp_path / "o.mkv"
    for kwargs, message in [
        ({"pair": "pts"}, r"^pair must be one of \('index', 'time', 'clock'\); got 'pts'$"),
        ({"pair_tolerance": 0.01},
         "^pair_tolerance is for pair='time' or 'clock' .*; got it with pair='index'$"),
        *[({"pair": "time", "pair_tolerance": v}, f"^pair_tolerance must be a finite number of seconds > 0; "
           f"got {re.escape(repr(v))}$") for v in (0, -0.1, float("nan"), float("inf"), True, "0.1")],
    ]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            segment_video(color, out, rgbd["depth"], mode="labels", depth=depth, progress=False, **kwargs)
    with pytest.raises(InputError, match=r"^pair='time' pairs the second video of a two-input net .*; fcn8s "
                                         "takes one input$"):  # fmt: skip
        segment_video(color, out, seg, pair="time", progress=False)
    assert not out.exists()


def test_pair_by_clock_keeps_a_later_start_as_an_offset(rgbd, colour25, tmp_path):
    """One recorder's files on one clock: a depth stream that began 120 ms after the colour one.
    pair="clock" pairs colour frame k (40k ms) with the depth frame recorded at 40k ms; "time"
    aligns the two starts instead (the depth frame recorded 120 ms later), which gives other
    labels; the colour frames before the depth stream began have no depth frame."""
    seg, (color, frames) = rgbd["depth"], colour25
    depth = timed_depth(tmp_path / "late.mkv", range(120, 440, 40))  # 120, 160, ..., 400 ms as recorded
    out = tmp_path / "clock.mkv"
    s = segment_video(color, out, seg, mode="labels", start=0.12, depth=depth, pair="clock", progress=False)
    # colour 120..280 ms take the depth frames recorded then; those at 320..400 ms none takes
    assert (s["frames_in"], s["frames_out"], s["second_skipped"]) == (5, 5, 3)
    got = decode(out)
    assert [round(t * 1000) for t, _ in got] == list(range(120, 320, 40))
    clock = [lab for _, lab in got]
    assert_labels(seg, clock, frames[3:], range(120, 320, 40), range(240, 440, 40))
    s = segment_video(color, tmp_path / "time.mkv", seg, mode="labels", start=0.12, depth=depth, pair="time",
                      progress=False)  # fmt: skip
    assert_labels(seg, [lab for _, lab in decode(tmp_path / "time.mkv")], frames[3:], range(240, 440, 40),
                  range(120, 320, 40))  # fmt: skip
    with pytest.raises(InputError, match=re.escape(
            f"{color}: frame 0 (t=0.000 s) has no depth frame within 0.02 s: the nearest frame of {depth} is "
            "at t=0.120 s (pairing by the recorded clock; pair_tolerance / --pair-tolerance widens it); "
            "the 0 frames before it were written")):  # fmt: skip
        segment_video(color, tmp_path / "all.mkv", seg, mode="labels", depth=depth, pair="clock",
                      progress=False)


def test_cli_pair_by_time(rgbd, colour25, tmp_path, capsys):
    from helpers import rgbd_net

    color, frames = colour25
    depth = timed_depth(tmp_path / "depth50.mkv", range(0, 320, 20))
    ckpt = fastfcn.save(rgbd_net("nyud-fcn32s-color-d"), tmp_path / "colord.safetensors")  # rgbd's model
    common = ["--backend", "torch", "--device", "cpu", "--precision", "fp32", "--quiet"]
    out = tmp_path / "labels.mkv"
    assert cli.main(["video", str(ckpt), str(color), str(out), "--mode", "labels", "--depth", str(depth),
                     "--pair", "time", "--pair-tolerance", "0.005", *common]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "8 frames in, 8 out (8 segmented; 8 frames of the second video skipped) in" in err
    labels = [lab for _, lab in decode(out)]
    assert_labels(rgbd["depth"], labels, frames, range(0, 320, 40), range(0, 160, 20))
    for args, message in [
        (["--pair", "time", "--pair-tolerance", "nan"], "pair_tolerance must be a finite number of seconds"),
        (["--pair-tolerance", "0.1"], "pair_tolerance is for pair='time' or 'clock'"),
    ]:
        rc = cli.main(["video", str(ckpt), str(color), str(tmp_path / "o.mp4"), "--depth", str(depth), *args,
                       *common])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.mp4").exists()
    late = timed_depth(tmp_path / "late.mkv", range(120, 440, 40))
    rc = cli.main(["video", str(ckpt), str(color), str(tmp_path / "late.mp4"), "--depth", str(late),
                   "--pair", "clock", *common])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "frame 0 (t=0.000 s) has no depth frame within 0.02 s" in err[0], err
    assert cli.main(["video", str(ckpt), str(color), str(tmp_path / "late.mkv.mp4"), "--depth", str(late),
                     "--pair", "clock", "--start", "0.12", *common]) == 0  # fmt: skip
    assert "5 frames in, 5 out (5 segmented; 3 frames of the second video skipped)" in capsys.readouterr().err


def test_pair_by_time_depth_at_30_fps_beside_colour_at_25(rgbd, colour25, tmp_path):
    seg, (color, frames) = rgbd["depth"], colour25
    depth = timed_depth(tmp_path / "depth30.mkv", [round(j * 1000 / 30) for j in range(10)])  # 0, 33, .. 300
    out = tmp_path / "labels.mkv"
    s = segment_video(color, out, seg, mode="labels", batch_size=4, depth=depth, pair="time", progress=False)
    # colour 0, 40, .. 280 ms: the nearest depth frames (120 ms: 133 is 13 ms away, 100 is 20); 100 and
    # 300 ms are taken by none
    nearest = [0, 33, 67, 133, 167, 200, 233, 267]
    assert (s["frames_out"], s["second_skipped"]) == (8, 2)
    assert_labels(seg, [lab for _, lab in decode(out)], frames, nearest, [0, 33, 67, 100, 133, 167, 200, 233])
