"""CUDA execution for the Segmenter: its own stream, one captured forward per (input kind,
N, H, W, output) replayed from a CUDA graph, the batch halved on out-of-memory
(``CudaGraphRunner``).

Capture is thread-local (``capture_error_mode="thread_local"``): with the default global
mode, a synchronising call from any other thread of the process (another Segmenter, a
``.cpu()`` in the caller's pipeline) invalidates the capture. Captures themselves are
serialised by one process-wide lock, so two Segmenters never capture at the same time.
An out-of-memory during capture surfaces from ``capture_end`` as a plain RuntimeError;
it is re-raised as ``torch.cuda.OutOfMemoryError`` so that the caller's out-of-memory
handling (halve the batch, retry) runs as it does outside a capture.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from ..errors import InputError

# One capture at a time in the whole process (two Segmenters, or two threads of one).
CAPTURE_LOCK = threading.Lock()

_OOM_TEXT = ("out of memory", "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory, typed or (from a capture) only in its message."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc) for t in _OOM_TEXT)


def _oom_in_chain(exc: BaseException) -> bool:
    """is_oom of exc or of an exception it was raised while handling: torch.cuda.graph's
    __exit__ calls capture_end even when the captured code raised, and capture_end's own
    error (the capture was invalidated) then hides the out-of-memory as its __context__."""
    seen: set = set()
    while exc is not None and id(exc) not in seen:
        if is_oom(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def capture(graph, fn: Callable[[], torch.Tensor], stream, pool) -> torch.Tensor:
    """Capture ``fn()`` into ``graph`` on ``stream`` (thread-local mode, under CAPTURE_LOCK).

    Returns fn's output (the graph's static output). An out-of-memory anywhere in the capture,
    including capture_end's untyped RuntimeError and one that capture_end's own error hides, is
    raised as torch.cuda.OutOfMemoryError.
    """
    with CAPTURE_LOCK:
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                out = fn()
        except RuntimeError as e:
            if _oom_in_chain(e) and not isinstance(e, torch.cuda.OutOfMemoryError):
                raise torch.cuda.OutOfMemoryError(f"out of memory during CUDA graph capture: {e}") from e
            raise
    return out


class CapturedForward:
    """``run(x) -> y`` for one input shape, replayed from a CUDA graph.

    run_fn(static_in) -> output: the work to capture (preprocessing + forward + finish), with
    static_in (shape, dtype) on ``device``; ``stream`` is the stream replays run on. Host
    input is staged through one pinned buffer (pinned once: pinning per call can make the
    copy up to 2x slower).
    """

    def __init__(self, run_fn, shape: tuple, dtype: torch.dtype, device, stream, pool, warmup: int = 2):
        self.static_in = torch.zeros(shape, dtype=dtype, device=device)
        self.pinned = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.copied.record(stream)
        self.stream = stream
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        with torch.cuda.stream(side), torch.inference_mode():
            # Warm-up outside the capture: cuDNN autotuning (benchmark mode) and lazy inits.
            for _ in range(warmup):
                run_fn(self.static_in)
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        from .deadzone import hold_entries

        # The graph reads the dead-zone cache's image-independent maps on every replay: it keeps
        # the entries it read alive even after that cache's LRU drops them.
        with torch.inference_mode(), hold_entries() as held:
            self.static_out = capture(self.graph, lambda: run_fn(self.static_in), side, pool)
        self.held = held

    def run(self, t: torch.Tensor) -> torch.Tensor:
        """Copy ``t`` (host or device) into the static input, replay, return a copy of the output."""
        if t.device.type == "cpu":
            # Pinned staging: wait only for this buffer's previous upload, then copy asynchronously.
            self.copied.synchronize()
            self.pinned.copy_(t)
            self.static_in.copy_(self.pinned, non_blocking=True)
            self.copied.record(self.stream)
        else:
            self.static_in.copy_(t)
        self.graph.replay()
        return self.static_out.clone()


class CudaGraphRunner:
    """``runner(t, kind, output)``: a Segmenter's forward on CUDA, on a stream of its own.

    forward(t, kind, output) -> result: the Segmenter's preprocessing + backend + finish, with
    t on the device (kind "u8": uint8 (N, H, W, 3); "float": (N, 3, H, W) in the plan's
    input dtype). plan: the Segmenter's ExecutionPlan; with ``plan.cuda_graphs`` each (kind,
    shape, output) is captured once (CapturedForward: pinned host staging) and replayed,
    the ``plan.graph_cache`` most recently used graphs kept. On out-of-memory the graphs are
    dropped and the batch is run in halves; one image that does not fit raises InputError.
    Not thread-safe: the Segmenter calls it under its lock.
    """

    def __init__(self, forward: Callable, plan):
        self.forward = forward
        self.plan = plan
        self.graphs: OrderedDict = OrderedDict()
        self.stream = torch.cuda.Stream(plan.device) if plan.device.type == "cuda" else None
        self._pool = None  # one memory pool for all of this runner's graphs, made at the first capture

    def __call__(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        device = self.plan.device
        caller = torch.cuda.current_stream(device)
        self.stream.wait_stream(caller)  # device input may have been produced on the caller's stream
        try:
            with torch.cuda.stream(self.stream), torch.inference_mode():
                out = self.split(t, kind, output)
        finally:
            caller.wait_stream(self.stream)
        out.record_stream(caller)
        return out

    def split(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """Run on self.stream; on CUDA out-of-memory, halve the batch and retry."""
        try:
            if self.plan.cuda_graphs:
                return self.replay(t, kind, output)
            return self.forward(t.to(self.plan.device, non_blocking=False), kind, output)
        except RuntimeError as e:  # OutOfMemoryError, or an untyped one from a graph capture
            if not is_oom(e):
                raise
            self.graphs.clear()
            torch.cuda.empty_cache()
            n = t.shape[0]
            if n == 1:
                raise InputError(
                    f"one image of shape {tuple(t.shape)} does not fit in the memory of {self.plan.device} "
                    f"with backend {self.plan.backend!r} at {self.plan.precision}; use smaller images or "
                    "set max_pixels"
                ) from None
            half = n // 2
            return torch.cat([self.split(t[:half], kind, output), self.split(t[half:], kind, output)])

    def replay(self, t: torch.Tensor, kind: str, output: str) -> torch.Tensor:
        """The captured graph of (kind, t's shape, output), captured now if not cached."""
        key = (kind, tuple(t.shape), output)
        g = self.graphs.get(key)
        if g is None:
            while len(self.graphs) >= self.plan.graph_cache:
                self.graphs.popitem(last=False)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            dtype = torch.uint8 if kind == "u8" else self.plan.input_dtype

            def run_fn(static_in):
                return self.forward(static_in, kind, output)

            g = CapturedForward(run_fn, tuple(t.shape), dtype, self.plan.device, self.stream, self._pool)
            self.graphs[key] = g
        else:
            self.graphs.move_to_end(key)
        return g.run(t)
