"""``Segmenter.stream``: frames in, one result per frame out, in order, none dropped.

Three stages run concurrently, joined by bounded queues::

    reader thread    next(frames) -> (H, W, 3) uint8 tensor      --frames-->   (queue_size * batch_size)
                     [+ its second input, two-input nets]
    batcher thread   group same-size frames, stack a batch        --batches--> (queue_size)
    worker thread    segment the batch, results to the host      --results--> (queue_size)
    consumer         the caller's loop, one result per frame

so decoding the next frames, preparing the next batch, inference on the current one and
the caller's work on the previous one overlap. A full queue blocks the stage before it
(backpressure): memory is bounded by about ``3 * queue_size * batch_size`` frames whatever
the stream's length, and nothing is dropped. A batch never mixes sizes: a size change
flushes the frames gathered so far. ``max_delay`` flushes a partial batch that has waited
that long for more frames (as DeepStream's nvstreammux does with batched-push-timeout).

On CUDA the batcher stacks into a ring of pinned host buffers; the worker uploads each on a
side stream, computes on the Segmenter's stream and copies the uint8 labels (not the
logits: 2 MB instead of 87 MB per 1080p frame at 21 classes) back into a pinned ring,
every step ordered by CUDA events, so the host never waits for the device until the
consumer takes a result.

A two-input net (NYUDv2 fusion: nyud-fcn32s-color-d, nyud-fcn32s-color-hha) takes a pair
``(image, second)`` per frame, ``second`` in a form ``run(image, depth=...)`` / ``hha=...`` takes
for one image (fastfcn.runtime.modal), checked and converted in the reader thread by the same
code as run()'s; a batch stacks both, never mixing sizes or depth dtypes, and the worker
preprocesses both into one float batch as run() does (dispatch._two_inputs). The pinned
ring is for one input: on CUDA a two-input net goes through the plain path (the batch is
uploaded and its results copied back in the worker thread).

Results are torch tensors on the CPU, each equal to ``run(frame, output).cpu()`` (two-input:
``run(image, output, depth=second).cpu()`` / ``hha=``).
An exception raised by the source or by inference is re-raised to the consumer as
:class:`~fastfcn.errors.StreamError` naming the frame index, after the results of every
earlier frame. Closing the iterator (``close()``, leaving a ``for`` loop whose iterator is
not kept, or garbage collection) stops the threads: every blocking call in them polls a
stop flag, so they end within about ``POLL_S``; only a source blocked inside its own
``next()`` is waited for (its thread is a daemon, so it never keeps the process alive).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, StreamError
from ..kernels.structure import check_output
from .dispatch import _two_inputs
from .modal import parse_second
from .preprocess import Parsed, _as_tensor, _check_image

POLL_S = 0.05  # how often a blocked stage looks at the stop flag
JOIN_S = 5.0  # how long close() waits for each thread


@dataclass
class StreamStats:
    """Busy seconds per stage (filled while the stream runs): ``read_s`` in the source's
    ``next()`` and frame conversion, ``batch_s`` stacking, ``infer_s`` segmenting (with the
    copy of the results to the host); ``frames`` and ``batches`` counted by the worker."""

    read_s: float = 0.0
    batch_s: float = 0.0
    infer_s: float = 0.0
    frames: int = 0
    batches: int = 0
    sizes: list = field(default_factory=list)  # batch sizes, in order (the tests check flushing)


class _Failure:
    """An exception travelling down the queues, with the index of the frame it belongs to."""

    def __init__(self, index: int, exc: BaseException, what: str):
        self.index, self.exc, self.what = index, exc, what


_END = object()


def to_frame(obj, index: int) -> torch.Tensor:
    """One frame -> (H, W, 3) uint8 CPU tensor. obj: numpy, torch, PIL image or av.VideoFrame."""
    what = f"frame {index}"
    if hasattr(obj, "to_ndarray") and hasattr(obj, "pts"):  # a PyAV VideoFrame
        obj = obj.to_ndarray(format="rgb24")
    elif hasattr(obj, "convert") and hasattr(obj, "mode"):  # a PIL image: its mode says the layout
        obj = np.array(obj if obj.mode == "RGB" else obj.convert("RGB"))  # a copy: PIL's buffer is read-only
    t = _as_tensor(obj, what)
    _check_image(t, what)
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _key(frame):
    """What the frames of one batch share: the size, and for a two-input frame its second
    input's dtype (stacking mixed dtypes promotes: int64 and float16 depth would become float16,
    rounded unlike run() of either frame alone)."""
    return (frame[0].shape, frame[1].dtype) if isinstance(frame, tuple) else frame.shape


class _Stop(Exception):
    """Raised inside a stage when the stream was closed."""


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=POLL_S)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event, timeout: float | None = None):
    """The next item; queue.Empty after ``timeout`` seconds (None: wait until one comes)."""
    deadline = None if timeout is None else time.perf_counter() + timeout
    while True:
        if stop.is_set():
            raise _Stop
        wait = POLL_S if deadline is None else min(POLL_S, deadline - time.perf_counter())
        if wait <= 0:
            raise queue.Empty
        try:
            return q.get(timeout=wait)
        except queue.Empty:
            continue


class _Pipeline:
    def __init__(self, seg, frames, batch_size, output, max_delay, queue_size, stats, source_wait_s):
        self.seg, self.output, self.source_wait_s = seg, output, source_wait_s
        self.batch_size, self.max_delay = batch_size, max_delay
        self.stats = stats if stats is not None else StreamStats()
        self.source = iter(frames)
        self.stop = threading.Event()
        self.q_frames: queue.Queue = queue.Queue(queue_size * batch_size)
        self.q_batches: queue.Queue = queue.Queue(queue_size)
        self.q_results: queue.Queue = queue.Queue(queue_size)
        self.second = seg._inputs[1] if len(seg._inputs) > 1 else None
        # For messages; read once (config is a copy per access), a Segmenter or an Ensemble.
        self.arch = (getattr(seg, "config", None) or {}).get("arch", "the model")
        # The pinned ring (stream_cuda) stages one input; a two-input net takes the plain path.
        self.pinned = seg.device.type == "cuda" and self.second is None
        # One same-size batch -> results: both modalities preprocessed into one float batch as
        # run() does for a two-input net.
        self.compute = seg._run if self.second is None else _two_inputs(seg, seg._run, check_size=True)
        self.in_source = False  # the reader is inside next(frames)
        if self.pinned:
            from .stream_cuda import CudaStager

            # queue_size batches wait in each of two queues, one is being filled, one computed.
            self.stager = CudaStager(seg, output, slots=2 * queue_size + 2, stop=self.stop)
        self.threads = [
            threading.Thread(target=self._guard, args=(f, q), name=f"fastfcn-stream-{n}", daemon=True)
            for n, f, q in (
                ("reader", self._read, self.q_frames),
                ("batcher", self._batch, self.q_batches),
                ("worker", self._work, self.q_results),
            )
        ]

    # ------------------------------------------------------------------- stages
    def _guard(self, stage, out: queue.Queue) -> None:
        try:
            stage()
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer, never lost
            try:
                _put(out, _Failure(-1, e, "the stream"), self.stop)
            except _Stop:
                pass

    def _read(self) -> None:
        i = 0
        while True:
            t0 = time.perf_counter()
            self.in_source = True
            try:
                obj = next(self.source)
            except StopIteration:
                break
            except Exception as e:
                _put(self.q_frames, _Failure(i, e, "the source"), self.stop)
                return
            finally:
                self.in_source = False
            if self.stop.is_set():
                return
            try:
                frame = self._convert(obj, i)
            except Exception as e:
                _put(self.q_frames, _Failure(i, e, "the source"), self.stop)
                return
            self.stats.read_s += time.perf_counter() - t0
            _put(self.q_frames, (i, frame), self.stop)
            i += 1
        _put(self.q_frames, _END, self.stop)

    def _convert(self, obj, i: int):
        """An item of the source -> a frame (to_frame), or (frame, second input) for a two-input
        net: the second input parsed and checked against its frame by run()'s own code."""
        seg, arch = self.seg, self.arch
        pair = isinstance(obj, (tuple, list))
        if self.second is None:
            if pair:
                raise InputError(
                    f"frame {i} is a {type(obj).__name__} of {len(obj)}; {arch} takes one input "
                    f"({seg._inputs[0]} images): each frame is one (H, W, 3) uint8 image (pairs "
                    "(image, depth / hha) are for the two-input nets)"
                )
            return to_frame(obj, i)
        if not pair or len(obj) != 2:
            got = f"a {type(obj).__name__} of {len(obj)}" if pair else f"one {type(obj).__name__}"
            raise InputError(
                f"frame {i} is {got}; {arch} takes two inputs ({' + '.join(seg._inputs)}): each frame "
                f"must be a pair (image, {self.second}), the {self.second} as run(image, "
                f"{self.second}=...) takes it"
            )
        image = to_frame(obj[0], i)
        parsed = Parsed("image", [image.unsqueeze(0)])
        second = parse_second(obj[1], self.second, parsed, seg.max_pixels)[0][0]
        return image, second.cpu().contiguous()

    def _batch(self) -> None:
        pending: list = []  # (index, frame) of one size
        first_at = 0.0
        while True:
            timeout = None
            if pending and self.max_delay is not None:
                timeout = max(0.0, first_at + self.max_delay - time.perf_counter())
            try:
                item = _get(self.q_frames, self.stop, timeout)
            except queue.Empty:  # max_delay passed: push what there is
                self._flush(pending)
                pending = []
                continue
            if item is _END or isinstance(item, _Failure):
                self._flush(pending)
                _put(self.q_batches, item, self.stop)
                return
            if pending and _key(item[1]) != _key(pending[0][1]):
                self._flush(pending)
                pending = []
            if not pending:
                first_at = time.perf_counter()
            pending.append(item)
            if len(pending) == self.batch_size:
                self._flush(pending)
                pending = []

    def _flush(self, pending: list) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        start = pending[0][0]
        frames = [f for _, f in pending]
        if self.pinned:
            batch = self.stager.stage(frames)
        elif self.second is not None:
            batch = (_stack([f[0] for f in frames]), _stack([f[1] for f in frames]))
        else:
            batch = _stack(frames)
        self.stats.batch_s += time.perf_counter() - t0
        _put(self.q_batches, (start, len(frames), batch), self.stop)

    def _work(self) -> None:
        while True:
            item = _get(self.q_batches, self.stop)
            if item is _END or isinstance(item, _Failure):
                _put(self.q_results, item, self.stop)
                return
            start, n, batch = item
            t0 = time.perf_counter()
            try:
                if self.pinned:
                    result = self.stager.compute(batch)
                else:
                    # .cpu(): a no-op on the CPU; the copy back on CUDA (a two-input net)
                    result = self.compute(batch, "u8", self.output).cpu()
            except Exception as e:
                if self.pinned:
                    self.stager.release(batch)
                _put(self.q_results, _Failure(start, e, "inference"), self.stop)
                return
            self.stats.infer_s += time.perf_counter() - t0
            self.stats.frames += n
            self.stats.batches += 1
            self.stats.sizes.append(n)
            _put(self.q_results, (start, n, result), self.stop)

    # ----------------------------------------------------------------- consumer
    def results(self) -> Iterator[torch.Tensor]:
        for t in self.threads:
            t.start()
        try:
            while True:
                item = _get(self.q_results, self.stop)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise self._error(item)
                start, n, result = item
                if self.pinned:
                    result = self.stager.fetch(result)
                for j in range(n):
                    # {head: result} for a net with several heads, as run() gives
                    yield self.seg.split_heads(result[j], self.output, batched=False)
        finally:
            self.close()

    def _error(self, f: _Failure) -> StreamError:
        e = f.exc
        where = f"frame {f.index}" if f.index >= 0 else "a stream stage"
        if f.what == "inference":
            where = f"the batch starting at frame {f.index}"
        err = StreamError(f"{f.what} failed at {where}: {type(e).__name__}: {e}", index=f.index)
        err.__cause__ = e
        return err

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive() and t is not threading.current_thread():
                # A reader blocked inside the source's next() (a live camera) cannot be
                # interrupted: it ends, without touching the queues, when next() returns.
                reader_blocked = t is self.threads[0] and self.in_source
                t.join(self.source_wait_s if reader_blocked else JOIN_S)


def stream(
    seg,
    frames: Iterable,
    *,
    batch_size: int = 8,
    output: str = "labels",
    max_delay: float | None = None,
    queue_size: int | None = None,
    stats: StreamStats | None = None,
    source_wait_s: float = POLL_S,
) -> Iterator[torch.Tensor]:
    """The body of ``Segmenter.stream`` (see there); ``stats`` collects per-stage busy time;
    ``source_wait_s``: how long closing waits for a reader inside the source's next() (a
    decoder whose container is closed next must be waited for)."""
    check_output(output)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if max_delay is not None and (isinstance(max_delay, bool) or not max_delay >= 0):
        raise InputError(f"max_delay must be None or a number of seconds >= 0; got {max_delay!r}")
    if queue_size is None:
        queue_size = 2
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise InputError(f"queue_size must be None or an int >= 1 (batches per queue); got {queue_size!r}")
    try:
        iter(frames)
    except TypeError:
        raise TypeError(
            f"frames must be an iterable of (H, W, 3) uint8 frames (of (image, depth / hha) pairs for a "
            f"two-input net); got {type(frames).__name__}"
        ) from None
    pipe = _Pipeline(seg, frames, batch_size, output, max_delay, queue_size, stats, source_wait_s)
    return pipe.results()
