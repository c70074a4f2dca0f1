"""Video files through a Segmenter: decode -> batch -> segment -> encode, overlapped
(the ``fastfcn video`` command is ``fastfcn.cli.video``).

``segment_video`` decodes with PyAV (FFmpeg) in the stream's reader thread, segments through
``Segmenter.stream`` (batching and inference in their own threads) and blends and encodes in
the calling thread, so the three overlap. Every decoded frame of the chosen range is written,
in order, with its original timestamp (variable frame rates stay correct; the frames of a raw
stream without timestamps, .h264 and the like, at k / rate); audio streams are copied packet
for packet. Outputs:

- ``mode="overlay"`` / ``"side-by-side"``: H.264 (libx264, yuv420p; yuv444p when a side is
  odd, which 4:2:0 cannot hold), audio copied.
- ``mode="labels"`` and ``labels_out``: a lossless video of class ids, FFV1 gray8 (gray16le
  above 256 classes) in .mkv / .avi / .nut, whose decoded frames equal the label maps
  exactly; a directory instead (an existing one, or a path ending in "/" or without a suffix)
  gets one palette PNG per frame, ``frame_000000.png``, ... (the ``segment`` command's format;
  an earlier run's frame PNGs there are replaced, ``_PngWriter``).

A net with several heads (SIFT Flow: semantic and geometric) writes every output once per head,
each in that head's colours: ``street_seg.mp4`` becomes ``street_seg.semantic.mp4`` and
``street_seg.geometric.mp4``, a label folder ``labels/`` becomes ``labels/semantic/`` and
``labels/geometric/`` (``head_target``), as ``fastfcn segment`` keeps one folder per head.
"""

from __future__ import annotations

import collections
import math
import os
import re
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
    audio streams copied from the input. write(arr, pts, time_base): arr (H, W, 3) uint8 RGB
    (``fmt`` "rgb24") or (H, W) values of one channel: class ids (``fmt`` "gray", or "gray16le"
    above 256 classes) or depth in millimetres ("gray16le"). Pictures go to H.264, or to FFV1
    (lossless) with ``lossless``; one channel always to FFV1."""

    def __init__(self, path: Path, *, fmt: str = "rgb24", time_base, rate, audio=(), lossless: bool = False):
        av = _av()
        self.path, self.time_base, self.rate = path, time_base, rate
        self.fmt, self.gray = fmt, fmt != "rgb24"
        self.lossless = self.gray or lossless
        try:
            self.container = av.open(str(path), "w")
        except (OSError, av.error.FFmpegError, ValueError) as e:
            raise InputError(f"{path}: cannot write the output video ({e})") from None
        self.audio_in, self.audio = list(audio), {}
        self.stream = None
        # Degrees of the input's display rotation (a phone's portrait video stores landscape
        # frames): set before the first frame, so the output plays turned as the input does.
        self.rotation = 0

    def _open_video(self, h: int, w: int) -> None:
        if self.lossless:
            s = self.container.add_stream("ffv1", rate=self.rate)
            s.pix_fmt = self.fmt if self.gray else "bgr0"  # RGB without chroma subsampling
        else:
            s = self.container.add_stream("libx264", rate=self.rate, options=dict(H264_OPTIONS))
            s.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
        s.width, s.height = w, h
        if self.rotation:
            s.set_display_rotation(self.rotation)
        # The input's time base: frames keep their timestamps (a VFR file stays VFR).
        s.time_base = self.time_base
        s.codec_context.time_base = self.time_base
        self.stream = s
        for a in self.audio_in:  # after the video: stream 0 is the picture, as players expect
            self.audio[a.index] = self.container.add_stream_from_template(a)

    def write(self, arr: np.ndarray, pts: int, time_base) -> None:
        av = _av()
        if self.gray:
            arr = arr.astype(np.uint16 if self.fmt == "gray16le" else np.uint8, copy=False)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=self.fmt)
        frame.pts, frame.time_base = pts, time_base
        first = self.stream is None
        try:
            if first:
                self._open_video(arr.shape[0], arr.shape[1])
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except (OSError, av.error.FFmpegError) as e:
            # The file is created when the header is written, with the first frame. An encoder
            # that refuses the frame size says only "Function not implemented" (FFV1 refuses any
            # 1-pixel-wide frame taller than 1, read with PyAV).
            why = ""
            if first:
                h, w = arr.shape[:2]
                codec = "ffv1" if self.lossless else "libx264"
                why = f" at its first frame, {w}x{h}, with FFmpeg's {codec} encoder"
                if self.lossless:
                    why += "; if the size is why, write the labels to a folder of PNGs (a path ending in /)"
            raise InputError(f"{self.path}: cannot write the output video ({e}){why}") from None

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
    """One palette PNG per frame in a directory (pixel values are class ids). The frame PNGs of
    an earlier run there (``FRAME_PNG``) are removed when the first frame is written, so the
    folder holds this run's frames only, as a video file holds its run's: a shorter second run
    left the first run's later frames beside its own."""

    def __init__(self, path: Path, palette):
        created = []
        for folder in (path, *path.parents):
            if folder.exists():
                break
            created.append(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{path}: cannot create the label directory ({e})") from None
        if not os.access(path, os.W_OK):
            raise InputError(f"{path}: the label directory is not writable")
        self.path, self.palette, self.n = path, palette, 0
        self.created = created  # removed again (if still empty) when no frame was written

    def write(self, arr: np.ndarray, pts: int, time_base) -> None:
        from .viz import save_labels

        if self.n == 0:
            try:
                for f in self.path.iterdir():
                    if FRAME_PNG.fullmatch(f.name) and f.is_file():
                        f.unlink()
            except OSError as e:
                raise InputError(f"{self.path}: cannot remove an earlier run's frame PNGs ({e})") from None
        save_labels(arr, self.palette, self.path / f"frame_{self.n:06d}.png")
        self.n += 1

    def mux_audio(self, packet, index: int) -> None:
        pass

    def close(self) -> None:
        if self.n == 0:
            for folder in self.created:  # the deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break


FRAME_PNG = re.compile(r"frame_\d{6,}\.png")  # what _PngWriter names its frames


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
    fmt = "gray16le" if num_classes > 256 else "gray"
    return _VideoWriter(p, fmt=fmt, time_base=time_base, rate=rate)


def _write_all(path, frames, fps: int, fmt: str, convert, lossless: bool = False) -> int:
    """``frames`` (any iterable) through ``convert(frame, index)`` into a ``fmt`` video at ``fps``
    frames per second, frame k at k / fps. Returns the frame count."""
    from fractions import Fraction

    tb = Fraction(1, int(fps))
    w = _VideoWriter(Path(path), fmt=fmt, time_base=tb, rate=int(fps), lossless=lossless)
    n = 0
    try:
        for n, frame in enumerate(frames, 1):
            w.write(convert(frame, n - 1), n - 1, tb)
    finally:
        w.close()
    return n


def write_video(path, frames, fps: int = 25, *, lossless: bool = False) -> int:
    """Write (H, W, 3) uint8 RGB ``frames`` (any iterable) as a video at ``fps`` frames per
    second: H.264 (yuv420p), or FFV1 (.mkv, exact) with ``lossless``. Returns the frame count."""
    return _write_all(path, frames, fps, "rgb24", lambda f, _: np.asarray(f, np.uint8), lossless)


def write_depth_video(path, depth_maps, fps: int = 25) -> int:
    """Write ``depth_maps`` (any iterable of (H, W) depths in millimetres, all one size: numpy,
    torch or anything numpy reads) as a lossless 16-bit greyscale video (FFV1 gray16le in .mkv,
    .avi or .nut) at ``fps`` frames per second: what RGB-D recorders write, and what
    ``segment_video(..., depth=...)`` / ``fastfcn video --depth`` read back, value for value.
    uint16 maps are stored as they are; other integer or float maps must hold whole numbers
    0..65535 (InputError otherwise, as for 8-bit maps, which hold no millimetres: nothing is
    rounded or clipped). Returns the frame count."""
    p = Path(path)
    if p.suffix.lower() not in LABEL_VIDEO_SUFFIXES:
        raise InputError(f"{p}: a depth video is lossless FFV1 in {', '.join(LABEL_VIDEO_SUFFIXES)}; "
                         f"got the suffix {p.suffix!r}")  # fmt: skip
    size: list = []

    def convert(d, i: int) -> np.ndarray:
        a = np.asarray(d.cpu() if hasattr(d, "cpu") else d)
        what = f"depth map {i}"
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim != 2 or 0 in a.shape:
            raise InputError(f"{what} has shape {a.shape}; expected (H, W) millimetres")
        if not size:
            size.append(a.shape)
        if a.shape != size[0]:
            raise InputError(f"{what} is {a.shape[1]}x{a.shape[0]} but depth map 0 is "
                             f"{size[0][1]}x{size[0][0]}; a video has one size")  # fmt: skip
        if a.dtype == np.uint16:
            return a
        if a.dtype == np.uint8 or a.dtype == bool or not (np.issubdtype(a.dtype, np.integer)
                                                          or np.issubdtype(a.dtype, np.floating)):
            raise InputError(f"{what} has dtype {a.dtype}; depth is millimetres as uint16, or integer / "
                             "float whole numbers 0..65535 (8-bit depth holds no millimetres)")  # fmt: skip
        ok = np.isfinite(a) & (a >= 0) & (a <= 65535)
        if not ok.all() or (np.issubdtype(a.dtype, np.floating) and (a != np.round(a)).any()):
            raise InputError(f"{what} has values that are not whole millimetres in 0..65535 (min {a.min()}, "
                             f"max {a.max()}); a 16-bit depth video would change them")  # fmt: skip
        return a.astype(np.uint16)

    return _write_all(p, depth_maps, fps, "gray16le", convert)


# ------------------------------------------------------------------------------------ decoding


GRAY16 = ("gray16le", "gray16be")  # the pixel formats of a depth video: 16-bit millimetres


class _Decoder:
    """The input file: frames of the chosen range, grouped for ``every``; audio packets aside.

    frames() runs in the stream's reader thread: it yields the first frame of each group of
    ``every`` decoded frames and appends the group ((pts, time_base, rgb) per frame) to
    ``groups`` before that, so the consumer finds the group when its labels arrive.

    ``modality`` "depth" / "hha" opens a second video of a two-input net instead (no audio),
    which a colour decoder's ``second`` pairs with its frames: by index (``take``) frame i
    of the colour range with frame i of this one's, the same range by time; by time (``nearest``,
    after ``pair_by_time``) each colour frame with this video's frame nearest in time, both
    measured from their stream's start, or ("clock") as both files record them. A depth video must
    be 16-bit greyscale (``GRAY16``): 8-bit or colour pixels hold no millimetres.
    """

    def __init__(self, path: Path, every: int, start: float | None, duration: float | None,
                 modality: str | None = None):  # fmt: skip
        av = _av()
        self.path, self.every, self.modality = path, every, modality
        self.clock = False  # pairing by time: times as recorded (one clock), not from the stream's start
        try:
            self.container = av.open(str(path))
        except av.error.FFmpegError as e:
            raise InputError(f"{path}: not a readable video file ({e.strerror or e})") from None
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f"{path}: has no video stream (streams: {self._kinds()})")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"  # frame + slice threads in the decoder
        # A second video's audio is not copied: the output carries the colour video's.
        self.audio = list(self.container.streams.audio) if modality is None else []
        self.start = float(start or 0.0)
        self.end = None if duration is None else self.start + float(duration)
        self.groups: collections.deque = collections.deque()
        self.audio_packets: collections.deque = collections.deque()
        self.keep_audio = True  # False while frames past an error are only counted
        self.rotation = 0  # degrees, the display rotation of the frames (set as they are decoded)
        self.decoded = 0
        self.last_time: float | None = None
        # The latest end of an audio packet demuxed and the longest packet (_check_complete).
        self.audio_last: float | None = None
        self.audio_packet = 0.0
        # The times of the frames just outside the range (the last before start, the first at its
        # end), for the error of a range that holds no frame.
        self.before: float | None = None
        self.after: float | None = None
        self.second: _Decoder | None = None
        self.colour: _Decoder | None = None  # set by pair_by_time: this one then pairs by time
        self._range = None  # a second video's frames of the range, as take() consumes them
        self._near: collections.deque = collections.deque()  # nearest(): the frames around t
        self.tolerance = 0.0  # nearest(): the largest distance in seconds (set by pair_by_time)
        self.span = (0.0, None)  # nearest(): the colour range, in seconds from this stream's start
        self.skipped = 0  # nearest(): frames of the span that no colour frame took
        if modality == "depth":
            try:
                self._check_depth_format(self.video.codec_context.pix_fmt)
            except InputError:
                self.container.close()
                raise

    def _check_depth_format(self, pix_fmt: str | None) -> None:
        if pix_fmt is not None and pix_fmt not in GRAY16:
            raise InputError(
                f"{self.path}: the depth video's pixel format is {pix_fmt}; depth videos are 16-bit "
                f"greyscale millimetres ({' or '.join(GRAY16)}, e.g. FFV1 in .mkv as "
                "fastfcn.video.write_depth_video writes): 8-bit or colour pixels hold no millimetres"
            )

    def _kinds(self) -> str:
        return ", ".join(s.type for s in self.container.streams) or "none"

    @property
    def rate(self):
        return self.video.average_rate or self.video.guessed_rate or 25

    @property
    def origin(self) -> float:
        """The stream's start_time in seconds (0 when unknown): pairing by time measures from it;
        0 when the pairing reads the times as recorded (``clock``)."""
        v = self.video
        if self.clock:
            return 0.0
        return float(v.start_time * v.time_base) if v.start_time is not None and v.time_base else 0.0

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

    def _declared_end(self) -> tuple[float, bool] | None:
        """(the end time the header declares, whether it is the whole file's rather than the
        video stream's), or None where it declares none."""
        v = self.video
        if v.duration is not None and v.time_base is not None:
            return float((v.start_time or 0) * v.time_base + v.duration * v.time_base), False
        if self.container.duration:
            # Matroska and NUT declare the end time, not the span from a later start: a file whose
            # timestamps begin at 1 s with 8 frames at 25 fps declares 1.32 s (mkv) / 1.28 s (nut),
            # read with PyAV. The smaller reading never calls a whole file truncated.
            return min((self.container.start_time or 0) / 1e6, 0.0) + self.container.duration / 1e6, True
        return None

    @property
    def untimed(self) -> bool:
        """The container stores no timestamps (raw H.264 / HEVC / MPEG-4 streams, .h264 and the
        like): its frames are timed by their order and rate (``_in_range``) and it cannot be
        seeked by time (FFmpeg refuses, and leaves the demuxer at the end of the file)."""
        return bool(self.container.format.flags & _av().format.Flags.no_timestamps.value)

    def _seek(self) -> bool:
        """Seek to the keyframe at or before start (frames before start are then decoded and
        dropped); True when the position is the seek's (``_in_range`` checks where it landed)."""
        if self.start <= 0 or self.untimed:
            return False
        try:
            self.container.seek(int(self.start / self.video.time_base), stream=self.video, backward=True)
        except Exception:  # noqa: BLE001 - not seekable by time: decode from the beginning (_rewind)
            pass
        return True

    def _rewind(self) -> None:
        """Back to the first packet, after a seek that landed past start (``_in_range``)."""
        try:
            self.container.seek(0, backward=True)
        except Exception as e:  # noqa: BLE001 - PyAV raises several kinds
            raise InputError(f"{self.path}: cannot be read from its beginning again after seeking to "
                             f"{self.start:.3f} s ({e}); segment it without start") from None  # fmt: skip
        self.audio_packets.clear()  # those of the seek's pass: no frame was given out yet
        self.before = self.after = None

    def _damaged(self, cause: str) -> InputError:
        t = "" if self.last_time is None else f" (t={self.last_time:.3f} s is the last good frame)"
        # Paired by time, this video's frame count is not the colour frames written.
        written = self.decoded if self.colour is None else self.colour.decoded
        return InputError(
            f"{self.path}: the video is corrupt or truncated at frame {self.decoded}{t}: {cause}; "
            f"the {written} frames before it were written"
        )

    def _in_range(self):
        """(frame, t) of each decoded frame of the range, in order; the audio packets of the range
        go to ``audio_packets``. A decoding error raises InputError (``_damaged``).

        A seek to start can land past it: in a file without an index (MPEG-TS, .ts / .mts / .m2ts)
        FFmpeg finds a packet near start by its timestamp, not the keyframe before it, and the
        decoder drops every frame up to the next keyframe. A 10 s H.264 .ts with a keyframe each
        second, start=1.5, duration=0.6: 1 of the 15 frames came out, from 2.08 s (read with
        PyAV). So when the first frame after the seek is later than start, or none comes, the file
        is decoded again from its beginning."""
        if not self._seek():
            yield from self._decode()
            return
        try:
            yield from self._decode(landing=True)
            return
        except _LandedPast:
            self._rewind()
        yield from self._decode()

    def _decode(self, landing: bool = False):
        """``_in_range`` from where the container is; ``landing``: raise _LandedPast, before
        anything is given out, when the first frame is later than start or there is none."""
        av = _av()
        tb = self.video.time_base
        # A frame without a timestamp (an untimed stream's) follows the one before by its duration
        # (1 / rate when the parser gives none), from 0: the times FFmpeg plays it at.
        next_pts, tick = 0, max(1, round(1 / (float(self.rate) * tb))) if tb else 1
        try:
            for packet in self.container.demux(self.video, *self.audio):
                if packet.stream.type == "audio":
                    t = None if packet.pts is None else float(packet.pts * packet.time_base)
                    if t is not None:
                        length = float((packet.duration or 0) * packet.time_base)
                        self.audio_packet = max(self.audio_packet, length)
                        self.audio_last = max(t + length, self.audio_last or t + length)
                    # Without a range every packet is copied (AAC's priming packet has pts < 0).
                    lo = self.start <= 0 or (t is not None and t >= self.start)
                    if self.keep_audio and lo and (self.end is None or t is None or t < self.end):
                        self.audio_packets.append(packet)
                    continue
                for frame in packet.decode():
                    if frame.pts is None:
                        frame.pts = next_pts
                    next_pts = frame.pts + (frame.duration or tick)
                    t = frame.time if frame.time is not None else self.decoded / float(self.rate)
                    if landing and t > self.start + 1e-6:
                        raise _LandedPast
                    landing = False
                    self.rotation = frame.rotation
                    if t < self.start - 1e-6:
                        self.before = t
                        continue
                    if self.end is not None and t >= self.end - 1e-6:
                        self.after = t
                        return  # past the end of the range
                    yield frame, t
        except av.error.FFmpegError as e:
            raise self._damaged(f"{type(e).__name__}: {e.strerror or e}") from None
        if landing:
            raise _LandedPast

    def _nothing_in_range(self) -> InputError:
        """The error of a video with no frame in the range (none at all, or start past its end)."""
        if self.before is None and self.after is None:
            return InputError(f"{self.path}: has no video frames; nothing was written")
        end = "its end" if self.end is None else f"{self.end:.3f} s"
        near = []
        if self.before is not None:
            near.append(f"the last frame before it is at {self.before:.3f} s")
        if self.after is not None:
            near.append(f"the first frame after it at {self.after:.3f} s")
        return InputError(
            f"{self.path}: no frame from {self.start:.3f} s to {end} (start / duration, in seconds of the "
            f"video's timeline): {', '.join(near)}; nothing was written"
        )

    def _array(self, frame, fmt: str) -> np.ndarray:
        try:
            return frame.to_ndarray(format=fmt)
        except _av().error.FFmpegError as e:
            raise self._damaged(f"{type(e).__name__}: {e.strerror or e}") from None

    def frames(self):
        """The first frame of each group of ``every`` (with ``second``: (rgb, its second input));
        the frames of the group go to ``groups`` first. Damage, or a second video that does not
        pair up, raises InputError after the frames before it (see _check_complete, take)."""
        group: list = []
        head, failure = None, None
        decoded = self._in_range()
        try:
            for frame, t in decoded:
                rgb = self._array(frame, "rgb24")
                item = rgb
                if self.second is not None and self.second.colour is not None:  # by time
                    paired = self.second.nearest(self, frame, t, need=not group)
                    item = rgb if paired is None else (rgb, paired)
                elif self.second is not None:
                    paired = self.second.take(self, frame, need=not group)
                    if paired is _ENDED:  # count the colour frames left, for the message
                        rest, exact = _count(decoded, self)
                        self.decoded += 1 + rest
                        raise self.second.counts_differ(self, exact)
                    item = rgb if paired is None else (rgb, paired)
                if not group:
                    head = item
                group.append((frame.pts, frame.time_base, rgb))
                self.decoded += 1
                self.last_time = t
                if len(group) == self.every:
                    self.groups.append(group)
                    yield head
                    group = []
            if self.decoded == 0:
                raise self._nothing_in_range()
            self._check_complete()
            if self.second is not None:
                self.second.check_rest(self)
        except InputError as e:
            failure = e
        if group:  # the last, shorter group (or the frames decoded before the damage)
            self.groups.append(group)
            yield head
        if failure is not None:
            raise failure

    def take(self, colour: _Decoder, frame, need: bool):
        """A second video's next frame of the range, paired with the colour decoder's ``frame``:
        its array (depth (H, W) uint16 millimetres, HHA (H, W, 3) uint8) when ``need``, else
        None (a frame between two segmented ones: decoded, checked, not converted); _ENDED when
        this video has no frame left in the range."""
        if self._range is None:
            self._range = self._in_range()
        try:
            mine, t = next(self._range)
        except StopIteration:
            return _ENDED
        self._check_frame(colour, frame, mine, self.decoded, "")
        self.decoded += 1
        self.last_time = t
        if not need:
            return None
        return self._second_array(mine)

    def _second_array(self, mine) -> np.ndarray:
        return self._array(mine, "gray16le" if self.modality == "depth" else "rgb24")

    def _check_frame(self, colour: _Decoder, frame, mine, k: int, when: str) -> None:
        """This video's frame ``mine`` (number ``k`` of the range; ``when``: its time, for the
        message), paired with the colour decoder's ``frame``, fits it: the same size and, for
        depth, 16-bit grey. Either can change mid-stream where the codec carries them per frame
        (PNG, H.264), so each paired frame is checked, not only the header."""
        written = f"the {colour.decoded} frames before it were written"
        if (mine.width, mine.height) != (frame.width, frame.height):
            raise InputError(
                f"{self.path}: frame {k}{when} is {mine.width}x{mine.height} but frame {colour.decoded} "
                f"of {colour.path} is {frame.width}x{frame.height}; the {self.modality} video must have the "
                f"colour video's size; {written}"
            )
        if self.modality == "depth" and mine.format.name not in GRAY16:
            raise InputError(
                f"{self.path}: frame {k}{when} has the pixel format {mine.format.name}; every frame of a "
                f"depth video must be 16-bit greyscale millimetres ({' or '.join(GRAY16)}); {written}"
            )

    def pair_by_time(self, colour: _Decoder, tolerance: float | None, clock: bool = False) -> None:
        """Pair this second video with ``colour`` by time (``nearest``): its range becomes the
        colour range's, measured from each stream's start (``clock``: the times as both files
        record them, for recordings made on one clock), widened by the tolerance (default half
        the colour frame interval) so that a frame just outside can still be the nearest."""
        self.colour = colour
        self.clock = colour.clock = bool(clock)
        self.tolerance = 0.5 / float(colour.rate) if tolerance is None else float(tolerance)
        lo = max(colour.start - colour.origin, 0.0)
        hi = None if colour.end is None else colour.end - colour.origin
        self.span = (lo, hi)
        self.start = self.origin + lo - self.tolerance if lo > self.tolerance else 0.0
        self.end = None if hi is None else self.origin + hi + self.tolerance

    def nearest(self, colour: _Decoder, frame, t: float, need: bool):
        """The frame of this video nearest in time to the colour decoder's ``frame`` at ``t``
        (each measured from its stream's start; of two equally near, the earlier), returned as
        take() returns it. Decoding runs ahead only to the first frame past ``t``, so at most
        two frames are held; the frames passed over that no colour frame took are counted in
        ``skipped`` (and not checked: nothing of them is used). None within the tolerance
        raises InputError naming the colour frame, its time and the nearest one's."""
        at, near = t - colour.origin, self._near
        if self._range is None:
            self._range = self._in_range()
        while True:
            while len(near) > 1 and near[1].time <= at:  # a frame before t that is never nearest again
                self._retire(near.popleft())
            if near and near[-1].time > at:
                break
            got = next(self._range, None)
            if got is None:
                break
            mine, s = got
            near.append(_Near(mine, s - self.origin, self.decoded))
            self.decoded += 1
            self.last_time = s
        if self.clock:
            where, since, how = f"t={at:.3f} s", "", "the recorded clock"
        else:
            since, how = " from its stream's start", "time"
            where = f"t={at:.3f} s from the colour stream's start"
        written = f"the {colour.decoded} frames before it were written"
        if not near:
            raise InputError(
                f"{colour.path}: frame {colour.decoded} ({where}) has no {self.modality} frame to pair "
                f"with: {self.path} has none{' in the range' if self.span != (0.0, None) else ''}; {written}"
            )
        best = min(near, key=lambda e: abs(e.time - at))
        if abs(best.time - at) > self.tolerance + 1e-9:  # 1e-9: float times of whole pts
            raise InputError(
                f"{colour.path}: frame {colour.decoded} ({where}) has no {self.modality} frame within "
                f"{self.tolerance:.4g} s: the nearest frame of {self.path} is at t={best.time:.3f} s{since} "
                f"(pairing by {how}; pair_tolerance / --pair-tolerance widens it); {written}"
            )
        self._check_frame(colour, frame, best.frame, best.index, f" (t={best.time:.3f} s)")
        best.taken = True
        if not need:
            return None
        if best.array is None:  # a slower second video: one frame may pair with several
            best.array = self._second_array(best.frame)
        return best.array

    def _retire(self, e: _Near) -> None:
        lo, hi = self.span
        if not e.taken and e.time >= lo - 1e-6 and (hi is None or e.time < hi - 1e-6):
            self.skipped += 1

    def check_rest(self, colour: _Decoder) -> None:
        """After the colour range ended complete: this second video must have ended too; paired
        by time, its frames left in the range are decoded and counted as skipped."""
        if self._range is None:
            self._range = self._in_range()
        if self.colour is not None:  # paired by time
            while self._near:
                self._retire(self._near.popleft())
            for mine, s in self._range:
                self.decoded += 1
                self.last_time = s
                self._retire(_Near(mine, s - self.origin, self.decoded - 1))
            self._check_complete()
            return
        extra, exact = _count(self._range, self)
        if extra:
            self.decoded += extra
            raise self.counts_differ(colour, exact=exact)
        self._check_complete()

    def counts_differ(self, colour: _Decoder, exact: bool) -> InputError:
        """The error of a second video with fewer or more frames in the range than the colour one."""
        where = " in the range (start / duration)" if colour.start or colour.end is not None else ""
        shorter = self.decoded < colour.decoded
        more = "" if exact else " or more"
        counts = (f"{self.decoded}{'' if shorter else more}", f"{colour.decoded}{more if shorter else ''}")
        paired = min(self.decoded, colour.decoded)
        return InputError(
            f"{self.path} has {counts[0]} frames{where}, {colour.path} {counts[1]}: the {self.modality} "
            f"video {'ends early' if shorter else 'runs longer'} (frame i of one pairs with frame i of the "
            f"other; none is dropped or padded); the {paired} paired frames were written"
        )

    def _check_complete(self) -> None:
        """A truncated file often just ends: compare with the length its header declares."""
        if self.end is not None or self.decoded == 0:
            return
        frames = self.video.frames
        if frames and self.start == 0 and self.decoded < frames:
            raise self._damaged(f"the header declares {frames} frames, {self.decoded} decoded")
        declared = self._declared_end()
        if declared is None or self.last_time is None:
            return
        end, of_file = declared
        step = 1.0 / float(self.rate) if self.rate else 0.1
        if self.last_time + 1.5 * step >= end - 1e-3:
            return
        # The file's end may be its audio's, later than the last frame in a whole file: then what
        # was read ends where the audio does. A Matroska file (H.264 + AAC, 30 frames) cut in half
        # keeps its header's duration, and both streams stop at the cut. A whole one (16 kHz AAC,
        # 64 ms packets) declared 1.600 s with its last packet ending at 1.536 s (AAC's priming
        # delay), read with PyAV: two packets of slack.
        if of_file and self.audio_last is not None and self.audio_last + 2 * self.audio_packet >= end - 1e-3:
            return
        audio = "" if self.audio_last is None else f" and the audio ends at {self.audio_last:.3f} s"
        raise self._damaged(f"the last frame is at {self.last_time:.3f} s{audio} of a declared {end:.3f} s")

    def close(self) -> None:
        try:
            if self.second is not None:
                self.second.close()
        finally:
            self.container.close()


def _check_sizes(colour: _Decoder, second: _Decoder) -> None:
    """The sizes the two videos' headers declare (each frame is checked again when paired)."""
    a, b = colour.video.codec_context, second.video.codec_context
    if a.width and b.width and (a.width, a.height) != (b.width, b.height):
        raise InputError(
            f"{second.path} is {b.width}x{b.height} but {colour.path} is {a.width}x{a.height}; the "
            f"{second.modality} video must have the colour video's size (its frames pair with the colour "
            "ones)"
        )


_ENDED = object()  # take(): the second video has no frame left in the range


class _LandedPast(Exception):
    """_Decoder._decode: the seek to start landed past it (frames of the range would be lost)."""


class _Near:
    """nearest(): a decoded frame of a second video, its time from the stream's start, whether a
    colour frame took it, its array once converted, its number in the range."""

    __slots__ = ("frame", "time", "index", "taken", "array")

    def __init__(self, frame, time: float, index: int):
        self.frame, self.time, self.index, self.taken, self.array = frame, time, index, False, None


def _count(frames, dec: _Decoder) -> tuple[int, bool]:
    """(how many frames the iterator ``frames`` of ``dec`` has left, whether that is all of them:
    False when damage stopped the count). Audio is not collected meanwhile: nothing is written
    after this. The frames are decoded, not converted or segmented: a small part of what the
    run would have spent on them (inference is 80-99% of the pipeline's busy time, README
    "Video"), and the only exact count (packets are not frames once a decoder holds some back)."""
    dec.keep_audio = False
    n = 0
    try:
        for _ in frames:
            n += 1
    except InputError:
        return n, False
    return n, True


# ------------------------------------------------------------------------------- segment_video


def check_paths(source, destination, labels_out, second=None, mode: str = "overlay"
                ) -> tuple[Path, Path | None, Path | None]:  # fmt: skip
    """``segment_video``'s paths checked before any work: the input (and ``second``, the depth /
    HHA video of a two-input net) exists, no output is an input or the other output, every
    output can be written, and the destination of a picture ``mode`` is a file whose container
    holds H.264 (``check_picture_target``). Returns source, destination and labels_out as Paths."""
    src = Path(source)
    ins = [src] + ([Path(second)] if second is not None else [])
    for path in ins:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if not path.is_file():
            raise InputError(f"{path}: not a file; expected a video file")
    outs = [Path(p) for p in (destination, labels_out) if p is not None]
    for out, path in ((out, path) for out in outs for path in ins):
        same = out.resolve() == path.resolve() or (out.is_file() and os.path.samefile(out, path))
        if same:
            which = "the input file" if path is src else "the second input's video"
            raise InputError(f"{out}: the destination is {which}; choose another output path")
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
    if dst is not None and mode != "labels":
        check_picture_target(dst, mode)
    return src, dst, lab


PICTURE_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".nut")  # for the messages: containers that hold H.264


def check_picture_target(path: Path, mode: str) -> None:
    """An overlay / side-by-side video is one file in a container that holds H.264: a folder, a
    name without a suffix or a container without H.264 (.webm, .gif, .png, .wav) failed only at
    the first frame, after the model loaded, with FFmpeg's words ("'webm' format does not
    support 'libx264' codec", "[Errno 21] Is a directory"). Opening for writing creates nothing
    (the file is created with its header, at the first frame)."""
    av = _av()
    want = ", ".join(PICTURE_SUFFIXES)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; mode {mode!r} writes one video file ({want})")
    try:
        container = av.open(str(path), "w")
    except (OSError, av.error.FFmpegError, ValueError):
        raise InputError(f"{path}: no video format has the suffix {path.suffix!r}; mode {mode!r} writes one "
                         f"H.264 video file ({want})") from None  # fmt: skip
    try:
        container.add_stream("libx264", rate=25)
    except (ValueError, av.error.FFmpegError):
        raise InputError(f"{path}: the {container.format.name} format cannot hold H.264 video, which mode "
                         f"{mode!r} writes; expected {want}") from None  # fmt: skip
    finally:
        container.close()


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


def _check_head_paths(source, dsts: dict, labs: dict, second=None, mode: str = "overlay") -> None:
    """Every head's paths checked as ``check_paths`` checks one pair, and no two heads' alike."""
    seen: dict = {}
    for name in dsts:
        check_paths(source, dsts[name], labs[name], second, mode)
        for p in (dsts[name], labs[name]):
            if p is None:
                continue
            if p.resolve() in seen:
                raise InputError(f"{p}: heads {seen[p.resolve()]} and {name} would both write it")
            seen[p.resolve()] = name


def second_video(config, depth=None, hha=None, option: str = "{m}=", value: str = "VIDEO"
                 ) -> tuple[str, Path] | None:  # fmt: skip
    """(modality, path) of the second video a two-input net (NYUDv2 fusion) takes, None for a
    one-input net; the wrong one, or none, raises InputError (fastfcn.modalities.second_modality;
    ``option`` / ``value`` spell the caller's keyword: "--{m}", " VIDEO" for the command line)."""
    from .config import config_inputs
    from .modalities import second_modality

    given = {k: v for k, v in (("depth", depth), ("hha", hha)) if v is not None}
    want = second_modality(config.get("arch"), config_inputs(config), given, option, value)
    return None if want is None else (want, Path(given[want]))


PAIRS = ("index", "time", "clock")


def check_options(mode, alpha, batch_size, every, start, duration, pair="index", pair_tolerance=None) -> None:
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
    if pair not in PAIRS:
        raise InputError(f"pair must be one of {PAIRS}; got {pair!r}")
    if pair_tolerance is not None:
        if pair == "index":
            raise InputError("pair_tolerance is for pair='time' or 'clock' (the largest time between paired "
                             f"frames); got it with pair={pair!r}")  # fmt: skip
        number = isinstance(pair_tolerance, (int, float)) and not isinstance(pair_tolerance, bool)
        if not (number and math.isfinite(pair_tolerance) and pair_tolerance > 0):
            raise InputError(f"pair_tolerance must be a finite number of seconds > 0; got {pair_tolerance!r}")


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
    depth=None,
    hha=None,
    pair: str = "index",
    pair_tolerance: float | None = None,
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
    depth / hha: the second video of a two-input net (NYUDv2 fusion, an RGB-D recording),
        decoded in lockstep with ``source``: nyud-fcn32s-color-d takes ``depth=`` a 16-bit
        greyscale video of millimetres (FFV1 gray16le in .mkv: ``write_depth_video``; an 8-bit
        or colour one is refused), nyud-fcn32s-color-hha ``hha=`` a video of HHA images (decoded
        as rgb24). The outputs show the colour frames and carry the colour video's audio; every
        frame of the second video must have the colour frame's size (and, for depth, 16-bit
        grey), or InputError names the frame, after writing the frames paired before.
    pair: how the second video's frames meet the colour ones. "index" (the default): frame i
        of the range with frame i of the second video's range (the same ``start`` / ``duration``,
        by time; ``every`` picks the same frames of both); a second video with fewer or more
        frames in the range raises InputError naming both files and counts, after writing the
        frames paired before. "time", for streams at other or drifting rates (a 30 fps depth
        stream beside 15 or 25 fps colour): each colour frame takes the second video's frame
        nearest in presentation time, each time measured from its stream's start_time (the
        range too: ``start`` / ``duration`` are the colour video's, and the second video is
        read over the same span of its own timeline), decoded in one forward pass holding at
        most two frames. A colour frame with no second frame within ``pair_tolerance`` seconds
        (default half the colour frame interval, from the colour stream's rate) raises
        InputError naming the frame, its time and the nearest second frame's time, after the
        frames before it are written. Second frames in the range that no colour frame takes (a
        faster stream) are skipped and counted ("second_skipped" in the summary). "clock", for
        recordings made on one clock (an RGB-D recorder writing both files): as "time", with the
        times as both files record them, so a depth stream that began 0.4 s after the colour one
        keeps that offset (its first 0.4 s of colour frames have no depth frame: pass
        ``start``).
    Returns {"frames_in", "frames_out", "segmented", "seconds", "fps", "decode_s",
    "inference_s", "encode_s", "decode_share", "inference_share", "encode_share",
    "destination", "labels_out"} (and "second_skipped" with ``pair="time"`` / ``"clock"``); the shares are
    each stage's busy time over their sum (the stages overlap, so the busy times add up to
    more than ``seconds``). With several heads, "destination" / "labels_out" list the heads'
    paths (", "), and "heads" maps each head to its {"destination", "labels_out"}.
    A missing file raises FileNotFoundError; everything else the user can fix, InputError.
    """
    check_options(mode, alpha, batch_size, every, start, duration, pair, pair_tolerance)
    given = depth if depth is not None else hha
    if not isinstance(destination, dict) and not isinstance(labels_out, dict):
        check_paths(source, destination, labels_out, given, mode)  # before any model loads
    src = Path(source)
    _av()
    seg = segmenter
    if not hasattr(seg, "stream"):
        from .runtime import Segmenter

        seg = Segmenter(segmenter)
    second = second_video(seg.config, depth, hha)
    if second is None and pair != "index":
        raise InputError(f"pair={pair!r} pairs the second video of a two-input net (depth= / hha=); "
                         f"{seg.config.get('arch') or 'this net'} takes one input")  # fmt: skip
    heads = seg.heads
    dsts = _head_paths(destination, heads, "destination")
    labs = _head_paths(labels_out, heads, "labels_out")
    _check_head_paths(src, dsts, labs, given, mode)
    palettes = seg.head_palettes() if heads else {None: seg.palette}
    classes = dict(heads) if heads else {None: int(seg.config.get("num_classes", 256))}
    t0 = time.perf_counter()
    dec = _Decoder(src, every, start, duration)
    writers: list = []
    try:
        if second is not None:  # opened and checked before any output is written
            dec.second = _Decoder(second[1], every, start, duration, modality=second[0])
            _check_sizes(dec, dec.second)
            if pair != "index":
                dec.second.pair_by_time(dec, pair_tolerance, clock=pair == "clock")
        tb, rate = dec.video.time_base, dec.rate
        outs = {}  # head -> (picture or label writer, label writer or None, palette)
        for name in dsts:
            if mode == "labels":
                main = _label_writer(dsts[name], palettes[name], classes[name], tb, rate)
            else:
                main = _VideoWriter(dsts[name], time_base=tb, rate=rate, audio=dec.audio)
            writers.append(main)
            extra = None
            if labs[name] is not None:
                extra = _label_writer(labs[name], palettes[name], classes[name], tb, rate)
                writers.append(extra)
            outs[name] = (main, extra, palettes[name])
        summary = _run(seg, dec, outs, mode, alpha, batch_size, progress)
        if pair != "index":
            summary["second_skipped"] = dec.second.skipped
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
    # A video keeps its frames in time order (the muxer refuses a timestamp that goes back, as an
    # unwritable output: "Invalid argument"); a folder of PNGs has no timestamps to keep.
    writers = [w for main, labels_writer, _ in outs.values() for w in (main, labels_writer)
               if isinstance(w, _VideoWriter)]  # fmt: skip
    timed = bool(writers)
    last = None  # (pts, time) of the last frame written
    # Closing waits for the reader to leave the decoder: the container is closed after this.
    results = stream(seg, dec.frames(), batch_size=batch_size, stats=stats, source_wait_s=JOIN_S)
    try:
        for result in results:
            t = time.perf_counter()
            labels = host_results(result)  # {head: (H, W)}; {None: (H, W)} for one head
            segmented += 1
            group = dec.groups.popleft()
            if segmented == 1:  # the outputs' streams are created with the first frame
                for w in writers:
                    w.rotation = dec.rotation
            for pts, time_base, rgb in group:
                if timed and last is not None and pts <= last[0]:
                    raise _backwards(dec, out, float(pts * time_base), last[1])
                last = pts, float(pts * time_base)
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


def _backwards(dec: _Decoder, k: int, t: float, before: float) -> InputError:
    """The error of frame ``k`` whose time ``t`` is not after the frame before it (at ``before``)."""
    return InputError(
        f"{dec.path}: frame {k} is at {t:.3f} s, not after frame {k - 1} at {before:.3f} s: its timestamps "
        "go back (files joined end to end, as `cat a.ts b.ts` joins them, or damage) and a video keeps its "
        f"frames in time order; segment the parts one by one (start / duration) or give a folder for PNGs; "
        f"the {k} frames before it were written"
    )


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
        f"{s['frames_in']} frames in, {s['frames_out']} out ({s['segmented']} segmented"
        + (f"; {s['second_skipped']} frames of the second video skipped" if "second_skipped" in s else "")
        + ") in "
        f"{s['seconds']:.1f} s: {s['fps']:.1f} frames/s; busy: decode {100 * s['decode_share']:.0f}%, "
        f"inference {100 * s['inference_share']:.0f}%, encode {100 * s['encode_share']:.0f}% -> "
        f"{s['destination']}" + (f", labels {s['labels_out']}" if s.get("labels_out") else "")
    )
