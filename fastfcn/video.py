"""Video files through a Segmenter: decode -> batch -> segment -> encode, overlapped
(the ``fastfcn video`` command is ``fastfcn.cli.video``).

``segment_video`` decodes with PyAV (FFmpeg) in the stream's reader thread, segments through
``Segmenter.stream`` (batching and inference in their own threads) and blends and encodes in
the calling thread, so the three overlap. Every decoded frame of the chosen range is written,
in order, with its original timestamp (variable frame rates stay correct); audio streams are
copied packet for packet. Outputs:

- ``mode="overlay"`` / ``"side-by-side"``: H.264 (libx264, yuv420p; yuv444p when a side is
  odd, which 4:2:0 cannot hold), audio copied.
- ``mode="labels"`` and ``labels_out``: a lossless video of class ids, FFV1 gray8 (gray16le
  above 256 classes) in .mkv / .avi / .nut, whose decoded frames equal the label maps
  exactly; a directory instead (an existing one, or a path ending in "/" or without a suffix)
  gets one palette PNG per frame, ``frame_000000.png``, ... (the ``segment`` command's format).

A net with several heads (SIFT Flow: semantic and geometric) writes every output once per head,
each in that head's colours: ``street_seg.mp4`` becomes ``street_seg.semantic.mp4`` and
``street_seg.geometric.mp4``, a label folder ``labels/`` becomes ``labels/semantic/`` and
``labels/geometric/`` (``head_target``), as ``fastfcn segment`` keeps one folder per head.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import FastFCNError, InputError, StreamError
from .progress import Progress

MODES = ("overlay", "labels", "side-by-side")
LABEL_VIDEO_SUFFIXES = (".mkv", ".avi", ".nut")
H264_OPTIONS = {"preset": "veryfast", "crf": "20"}


def _av():
    try:
        import av
    except ImportError:
        raise InputError(
            "video needs PyAV (FFmpeg): pip install 'fastfcn[video]' (or pip install av)"
        ) from None
    return av


# ------------------------------------------------------------------------------------ writers


class _VideoWriter:
    """One output container with one video stream (created at the first frame) and optionally
    audio streams copied from the input. write(arr, pts, time_base): arr (H, W, 3) uint8 RGB or
    (H, W) class ids (``labels``). Pictures go to H.264, or to FFV1 (lossless) with ``lossless``;
    class ids always to FFV1."""

    def __init__(self, path: Path, *, labels: bool, time_base, rate, audio=(), wide_ids: bool = False,
                 lossless: bool = False):  # fmt: skip
        av = _av()
        self.path, self.labels, self.time_base, self.rate = path, labels, time_base, rate
        self.fmt = ("gray16le" if wide_ids else "gray") if labels else "rgb24"
        self.lossless = labels or lossless
        try:
            self.container = av.open(str(path), "w")
        except (OSError, av.error.FFmpegError, ValueError) as e:
            raise InputError(f"{path}: cannot write the output video ({e})") from None
        self.audio_in, self.audio = list(audio), {}
        self.stream = None

    def _open_video(self, h: int, w: int) -> None:
        if self.lossless:
            s = self.container.add_stream("ffv1", rate=self.rate)
            s.pix_fmt = self.fmt if self.labels else "bgr0"  # RGB without chroma subsampling
        else:
            s = self.container.add_stream("libx264", rate=self.rate, options=dict(H264_OPTIONS))
            s.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        s.width, s.height = w, h
        # The input's time base: frames keep their timestamps (a VFR file stays VFR).
        s.time_base = self.time_base
        s.codec_context.time_base = self.time_base
        self.stream = s
        for a in self.audio_in:  # after the video: stream 0 is the picture, as players expect
            self.audio[a.index] = self.container.add_stream_from_template(a)

    def write(self, arr: np.ndarray, pts: int, time_base) -> None:
        av = _av()
        if self.labels:
            arr = arr.astype(np.uint16 if self.fmt == "gray16le" else np.uint8, copy=False)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=self.fmt)
        frame.pts, frame.time_base = pts, time_base
        try:
            if self.stream is None:
                self._open_video(arr.shape[0], arr.shape[1])
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except (OSError, av.error.FFmpegError) as e:
            # The file is created when the header is written, with the first frame.
            raise InputError(f"{self.path}: cannot write the output video ({e})") from None

    def mux_audio(self, packet, index: int) -> None:
        """Copy an input audio packet of the input's stream ``index``; called after the first
        video frame (the header is written then)."""
        out = self.audio.get(index)
        if out is None or packet.dts is None:
            return  # a label video carries no audio; the demuxer's flush packets are empty
        packet.stream = out
        self.container.mux(packet)

    def close(self) -> None:
        try:
            if self.stream is not None:
                for packet in self.stream.encode(None):
                    self.container.mux(packet)
        finally:
            self.container.close()


class _PngWriter:
    """One palette PNG per frame in a directory (pixel values are class ids)."""

    def __init__(self, path: Path, palette):
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{path}: cannot create the label directory ({e})") from None
        if not os.access(path, os.W_OK):
            raise InputError(f"{path}: the label directory is not writable")
        self.path, self.palette, self.n = path, palette, 0

    def write(self, arr: np.ndarray, pts: int, time_base) -> None:
        from .viz import save_labels

        save_labels(arr, self.palette, self.path / f"frame_{self.n:06d}.png")
        self.n += 1

    def mux_audio(self, packet, index: int) -> None:
        pass

    def close(self) -> None:
        pass


def _is_dir_target(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() or str(path).endswith(("/", os.sep)) or p.suffix == ""


def _label_writer(path, palette, num_classes: int, time_base, rate):
    p = Path(path)
    if _is_dir_target(path):
        return _PngWriter(p, palette)
    if p.suffix.lower() not in LABEL_VIDEO_SUFFIXES:
        raise InputError(
            f"{p}: a label video must be lossless FFV1 in {', '.join(LABEL_VIDEO_SUFFIXES)} "
            "(or give a directory for one palette PNG per frame)"
        )
    return _VideoWriter(p, labels=True, time_base=time_base, rate=rate, wide_ids=num_classes > 256)


def write_video(path, frames, fps: int = 25, *, lossless: bool = False) -> int:
    """Write (H, W, 3) uint8 RGB ``frames`` (any iterable) as a video at ``fps`` frames per
    second: H.264 (yuv420p), or FFV1 (.mkv, exact) with ``lossless``. Returns the frame count."""
    from fractions import Fraction

    tb = Fraction(1, int(fps))
    w = _VideoWriter(Path(path), labels=False, time_base=tb, rate=int(fps), lossless=lossless)
    n = 0
    try:
        for n, frame in enumerate(frames, 1):
            w.write(np.asarray(frame, np.uint8), n - 1, tb)
    finally:
        w.close()
    return n


# ------------------------------------------------------------------------------------ decoding


class _Decoder:
    """The input file: frames of the chosen range, grouped for ``every``; audio packets aside.

    frames() runs in the stream's reader thread: it yields the first frame of each group of
    ``every`` decoded frames and appends the group ((pts, time_base, rgb) per frame) to
    ``groups`` before that, so the consumer finds the group when its labels arrive.
    """

    def __init__(self, path: Path, every: int, start: float | None, duration: float | None):
        av = _av()
        self.path, self.every = path, every
        try:
            self.container = av.open(str(path))
        except av.error.FFmpegError as e:
            raise InputError(f"{path}: not a readable video file ({e.strerror or e})") from None
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f"{path}: has no video stream (streams: {self._kinds()})")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"  # frame + slice threads in the decoder
        self.audio = list(self.container.streams.audio)
        self.start = float(start or 0.0)
        self.end = None if duration is None else self.start + float(duration)
        self.groups: collections.deque = collections.deque()
        self.audio_packets: collections.deque = collections.deque()
        self.decoded = 0
        self.last_time: float | None = None

    def _kinds(self) -> str:
        return ", ".join(s.type for s in self.container.streams) or "none"

    @property
    def rate(self):
        return self.video.average_rate or self.video.guessed_rate or 25

    def estimated_frames(self) -> int | None:
        v = self.video
        total = v.frames or None
        seconds = None
        if v.duration is not None and v.time_base is not None:
            seconds = float(v.duration * v.time_base)
        elif self.container.duration:
            seconds = self.container.duration / 1e6
        if total is None and seconds and self.rate:
            total = int(round(seconds * float(self.rate)))
        if total and (self.start or self.end is not None) and seconds:
            span = min(self.end if self.end is not None else seconds, seconds) - self.start
            total = max(int(round(total * span / seconds)), 0)
        return total

    def _declared_end(self) -> float | None:
        v = self.video
        if v.duration is not None and v.time_base is not None:
            return float((v.start_time or 0) * v.time_base + v.duration * v.time_base)
        if self.container.duration and not self.audio:  # with audio it may be the audio's end
            return (self.container.start_time or 0) / 1e6 + self.container.duration / 1e6
        return None

    def _seek(self) -> None:
        if self.start > 0:
            tb = self.video.time_base
            try:  # to the keyframe at or before start; frames before start are decoded and dropped
                self.container.seek(int(self.start / tb), stream=self.video, backward=True)
            except Exception:  # noqa: BLE001 - not seekable: decode from the beginning instead
                pass

    def _damaged(self, cause: str) -> InputError:
        t = "" if self.last_time is None else f" (t={self.last_time:.3f} s is the last good frame)"
        return InputError(
            f"{self.path}: the video is corrupt or truncated at frame {self.decoded}{t}: {cause}; "
            f"the {self.decoded} frames before it were written"
        )

    def frames(self):
        av = _av()
        self._seek()
        group: list = []
        complete, damage = True, None
        try:
            for packet in self.container.demux(self.video, *self.audio):
                if packet.stream.type == "audio":
                    t = None if packet.pts is None else float(packet.pts * packet.time_base)
                    # Without a range every packet is copied (AAC's priming packet has pts < 0).
                    lo = self.start <= 0 or (t is not None and t >= self.start)
                    if lo and (self.end is None or t is None or t < self.end):
                        self.audio_packets.append(packet)
                    continue
                for frame in packet.decode():
                    t = frame.time if frame.time is not None else self.decoded / float(self.rate)
                    if t < self.start - 1e-6:
                        continue
                    if self.end is not None and t >= self.end - 1e-6:
                        break
                    rgb = frame.to_ndarray(format="rgb24")
                    group.append((frame.pts, frame.time_base, rgb))
                    self.decoded += 1
                    self.last_time = t
                    if len(group) == self.every:
                        self.groups.append(group)
                        yield group[0][2]
                        group = []
                else:
                    continue
                break  # past the end of the range
        except av.error.FFmpegError as e:
            damage = self._damaged(f"{type(e).__name__}: {e.strerror or e}")
            complete = False
        if group:  # the last, shorter group (or the frames decoded before the damage)
            self.groups.append(group)
            yield group[0][2]
        if not complete:
            raise damage
        self._check_complete()

    def _check_complete(self) -> None:
        """A truncated file often just ends: compare with the length its header declares."""
        if self.end is not None or self.decoded == 0:
            return
        frames = self.video.frames
        if frames and self.start == 0 and self.decoded < frames:
            raise self._damaged(f"the header declares {frames} frames, {self.decoded} decoded")
        end = self._declared_end()
        step = 1.0 / float(self.rate) if self.rate else 0.1
        if end is not None and self.last_time is not None and self.last_time + 1.5 * step < end - 1e-3:
            raise self._damaged(f"the last frame is at {self.last_time:.3f} s of a declared {end:.3f} s")

    def close(self) -> None:
        self.container.close()


# ------------------------------------------------------------------------------- segment_video


def check_paths(source, destination, labels_out) -> tuple[Path, Path | None, Path | None]:
    """``segment_video``'s paths checked before any work: the input exists, no output is the
    input or the other output, every output can be written. Returns them as Paths."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    if not src.is_file():
        raise InputError(f"{src}: not a file; expected a video file")
    outs = [Path(p) for p in (destination, labels_out) if p is not None]
    for out in outs:
        if out.exists() and out.is_file() and os.path.samefile(out, src):
            raise InputError(f"{out}: the destination is the input file; choose another output path")
        if out.resolve() == src.resolve():
            raise InputError(f"{out}: the destination is the input file; choose another output path")
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise InputError(f"{outs[0]}: the output and --labels-out are the same path")
    dst = Path(destination) if destination is not None else None
    lab = Path(labels_out) if labels_out is not None else None
    for out in outs:
        if not _is_dir_target(out):
            parent = out.resolve().parent
            if not parent.is_dir():
                raise InputError(f"{out}: cannot write here: the folder {parent} does not exist")
            if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
                raise InputError(f"{out}: cannot write here: permission denied")
    return src, dst, lab


def head_target(path, head: str) -> Path:
    """Where ``head``'s output goes when one path is given for a net with several heads: a
    folder target gets a subfolder (``labels/`` -> ``labels/semantic/``), a file its head
    before the suffix (``street_seg.mp4`` -> ``street_seg.semantic.mp4``)."""
    p = Path(path)
    if _is_dir_target(path):
        return p / head
    return p.with_name(f"{p.stem}.{head}{p.suffix}")


def _head_paths(value, heads, what: str) -> dict:
    """{head: Path or None} of a destination or labels_out: one path (None for one head), a
    path given for all heads (``head_target``) or a {head: path} mapping naming each."""
    names = [n for n, _ in heads] if heads else [None]
    if isinstance(value, dict):
        if set(value) != set(names) or not heads:
            want = f"one path per head ({', '.join(names)})" if heads else "one path (the net has one head)"
            raise InputError(f"{what} is a mapping of {sorted(map(str, value))}; expected {want}")
        return {n: Path(value[n]) for n in names}
    if value is None:
        return dict.fromkeys(names)
    if not heads:
        return {None: Path(value)}
    return {n: head_target(value, n) for n in names}


def _check_head_paths(source, dsts: dict, labs: dict) -> None:
    """Every head's paths checked as ``check_paths`` checks one pair, and no two heads' alike."""
    seen: dict = {}
    for name in dsts:
        check_paths(source, dsts[name], labs[name])
        for p in (dsts[name], labs[name]):
            if p is None:
                continue
            if p.resolve() in seen:
                raise InputError(f"{p}: heads {seen[p.resolve()]} and {name} would both write it")
            seen[p.resolve()] = name


def _check_one_input(config) -> None:
    """Refuse a net of two inputs (NYUDv2 fusion) before anything is written: a frame is one image."""
    from .config import config_inputs

    inputs = config_inputs(config)
    if len(inputs) > 1:
        raise InputError(
            f"{config.get('arch')} takes two inputs ({' + '.join(inputs)}) but a video frame is one image; "
            f"segment image files with `fastfcn segment --{inputs[1]} DIR` or Segmenter.run(images, "
            f"{inputs[1]}=...)"
        )


def check_options(mode, alpha, batch_size, every, start, duration) -> None:
    """``segment_video``'s options checked before any work (InputError naming the bad one)."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}; got {mode!r}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise InputError(f"alpha must be between 0 and 1; got {alpha!r}")
    for name, v in (("batch_size", batch_size), ("every", every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be an int >= 1; got {v!r}")
    if start is not None and not (isinstance(start, (int, float)) and start >= 0):
        raise InputError(f"start must be a number of seconds >= 0; got {start!r}")
    if duration is not None and not (isinstance(duration, (int, float)) and duration > 0):
        raise InputError(f"duration must be a number of seconds > 0; got {duration!r}")


def segment_video(
    source,
    destination,
    segmenter,
    *,
    mode: str = "overlay",
    alpha: float = 0.5,
    batch_size: int = 8,
    every: int = 1,
    start: float | None = None,
    duration: float | None = None,
    labels_out=None,
    progress: bool = True,
) -> dict:
    """Segment the video file ``source`` into ``destination``; returns a summary.

    segmenter: a fastfcn.Segmenter (or anything fastfcn.Segmenter accepts, loaded with its
        defaults). mode: "overlay" (frame blended with the class colours, ``alpha``),
        "side-by-side" (frame | class colours), "labels" (the class ids, lossless; see the
        module docstring). every: segment every Nth frame and reuse its labels for the next
        N - 1 (each frame is still written). start, duration: the range, in seconds of the
        input's timeline. labels_out: also write the class ids there (label video or folder).
        A net with several heads (``segmenter.heads``) writes destination and labels_out once
        per head: one path becomes one per head (``head_target``), or give {head: path}.
    Returns {"frames_in", "frames_out", "segmented", "seconds", "fps", "decode_s",
    "inference_s", "encode_s", "decode_share", "inference_share", "encode_share",
    "destination", "labels_out"}; the shares are each stage's busy time over their sum
    (the stages overlap, so the busy times add up to more than ``seconds``). With several
    heads, "destination" / "labels_out" list the heads' paths (", "), and "heads" maps each
    head to its {"destination", "labels_out"}.
    A missing file raises FileNotFoundError; everything else the user can fix, InputError.
    """
    check_options(mode, alpha, batch_size, every, start, duration)
    if not isinstance(destination, dict) and not isinstance(labels_out, dict):
        check_paths(source, destination, labels_out)  # before any model loads
    src = Path(source)
    _av()
    seg = segmenter
    if not hasattr(seg, "stream"):
        from .runtime import Segmenter

        seg = Segmenter(segmenter)
    _check_one_input(seg.config)
    heads = seg.heads
    dsts = _head_paths(destination, heads, "destination")
    labs = _head_paths(labels_out, heads, "labels_out")
    _check_head_paths(src, dsts, labs)
    palettes = seg.head_palettes() if heads else {None: seg.palette}
    classes = dict(heads) if heads else {None: int(seg.config.get("num_classes", 256))}
    t0 = time.perf_counter()
    dec = _Decoder(src, every, start, duration)
    writers: list = []
    try:
        tb, rate = dec.video.time_base, dec.rate
        outs = {}  # head -> (picture or label writer, label writer or None, palette)
        for name in dsts:
            if mode == "labels":
                main = _label_writer(dsts[name], palettes[name], classes[name], tb, rate)
            else:
                main = _VideoWriter(dsts[name], labels=False, time_base=tb, rate=rate, audio=dec.audio)
            writers.append(main)
            extra = None
            if labs[name] is not None:
                extra = _label_writer(labs[name], palettes[name], classes[name], tb, rate)
                writers.append(extra)
            outs[name] = (main, extra, palettes[name])
        summary = _run(seg, dec, outs, mode, alpha, batch_size, progress)
    finally:
        for w in writers:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        dec.close()
    seconds = time.perf_counter() - t0
    busy = summary["decode_s"] + summary["inference_s"] + summary["encode_s"]
    joined = lambda paths: None if paths[0] is None else ", ".join(map(str, paths))  # noqa: E731
    summary.update(
        seconds=seconds,
        fps=summary["frames_out"] / seconds if seconds > 0 else 0.0,
        destination=joined(list(dsts.values())),
        labels_out=joined(list(labs.values())),
    )
    if heads:
        summary["heads"] = {n: {"destination": str(dsts[n]), "labels_out": labs[n] and str(labs[n])}
                            for n in dsts}  # fmt: skip
    for k in ("decode", "inference", "encode"):
        summary[f"{k}_share"] = summary[f"{k}_s"] / busy if busy > 0 else 0.0
    if progress:
        print(format_summary(summary), file=sys.stderr)
    return summary


def _run(seg, dec: _Decoder, outs: dict, mode, alpha, batch_size, progress) -> dict:
    """outs: {head (None for one head): (main writer, label writer or None, palette)}."""
    from .models.multihead import host_results
    from .runtime.stream import JOIN_S, StreamStats, stream
    from .viz import overlay, side_by_side

    stats = StreamStats()
    bar = Progress(dec.estimated_frames() or None, "video", enabled=progress, unit="frames")
    out = segmented = 0
    encode_s = 0.0
    mains = [main for main, _, _ in outs.values()]
    # Closing waits for the reader to leave the decoder: the container is closed after this.
    results = stream(seg, dec.frames(), batch_size=batch_size, stats=stats, source_wait_s=JOIN_S)
    try:
        for result in results:
            t = time.perf_counter()
            labels = host_results(result)  # {head: (H, W)}; {None: (H, W)} for one head
            segmented += 1
            group = dec.groups.popleft()
            for pts, time_base, rgb in group:
                for name, (main, labels_writer, palette) in outs.items():
                    lab = labels[name]
                    if mode == "overlay":
                        main.write(overlay(rgb, lab, palette, alpha), pts, time_base)
                    elif mode == "side-by-side":
                        main.write(side_by_side(rgb, lab, palette), pts, time_base)
                    else:
                        main.write(lab, pts, time_base)
                    if labels_writer is not None:
                        labels_writer.write(lab, pts, time_base)
                out += 1
            _mux_audio(dec, mains)
            encode_s += time.perf_counter() - t
            bar.step(n=len(group))
    except StreamError as e:
        # The decoder's own message (frame and time of the damage) or the inference failure.
        cause = e.__cause__
        raise (cause if isinstance(cause, FastFCNError) else e) from None
    finally:
        results.close()  # on an error, too: the traceback would keep the threads' iterator alive
        bar.finish()
    _mux_audio(dec, mains)
    return {
        "frames_in": dec.decoded,
        "frames_out": out,
        "segmented": segmented,
        "decode_s": stats.read_s,
        "inference_s": stats.infer_s + stats.batch_s,
        "encode_s": encode_s,
    }


def _mux_audio(dec: _Decoder, writers: list) -> None:
    """The audio packets decoded so far into every picture video (one per head): PyAV 18 muxes
    a packet into several containers unchanged (their packets compared equal in the tests)."""
    while dec.audio_packets:
        packet = dec.audio_packets.popleft()
        index = packet.stream.index  # the input's: muxing re-points packet.stream
        for w in writers:
            w.mux_audio(packet, index)


def format_summary(s: dict) -> str:
    return (
        f"{s['frames_in']} frames in, {s['frames_out']} out ({s['segmented']} segmented) in "
        f"{s['seconds']:.1f} s: {s['fps']:.1f} frames/s; busy: decode {100 * s['decode_share']:.0f}%, "
        f"inference {100 * s['inference_share']:.0f}%, encode {100 * s['encode_share']:.0f}% -> "
        f"{s['destination']}" + (f", labels {s['labels_out']}" if s.get("labels_out") else "")
    )
