"""The CUDA side of ``Segmenter.stream``: pinned host rings, side-stream copies, events.

One batch goes through: the batcher stacks its frames into a free pinned input slot
(after that slot's previous upload finished: its event); the worker enqueues the upload on
a copy stream, makes the compute stream wait for it (event), runs the Segmenter there, and
enqueues the copy of the result (uint8 labels) into a pinned output slot on a second side
stream (event). The consumer waits for that event only, copies the result out of the slot
and frees it. The host thus never blocks on the device except where a result is taken, and
uploads, compute and downloads of consecutive batches overlap on the GPU's copy engines.
The slot rings bound pinned memory to ``slots`` batches each way.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch


@dataclass
class Staged:
    """A batch in a pinned input slot: ``host`` (n, H, W, 3) uint8."""

    slot: int
    host: torch.Tensor
    n: int
    released: bool = False

    def __len__(self) -> int:
        return self.n


@dataclass
class Pending:
    """A result being copied into pinned output slot ``slot``; ``done`` fires when it is there."""

    slot: int
    host: torch.Tensor
    done: torch.cuda.Event


def _take(free: queue.Queue, stop: threading.Event) -> int:
    from .stream import _get

    return _get(free, stop)


class _Ring:
    """``slots`` pinned byte buffers, grown on demand, handed out through a queue of free ids."""

    def __init__(self, slots: int):
        self.bufs: list[torch.Tensor | None] = [None] * slots
        self.free: queue.Queue = queue.Queue()
        for i in range(slots):
            self.free.put(i)

    def view(self, slot: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        buf = self.bufs[slot]
        if buf is None or buf.numel() < nbytes:
            buf = self.bufs[slot] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return buf[:nbytes].view(dtype).view(shape)


class CudaStager:
    def __init__(self, seg, output: str, slots: int, stop: threading.Event):
        self.seg, self.output, self.stop = seg, output, stop
        self.device = seg.device
        self.inputs, self.outputs = _Ring(slots), _Ring(slots)
        self.uploaded: list[torch.cuda.Event | None] = [None] * slots
        self.h2d = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)

    def stage(self, frames: list[torch.Tensor]) -> Staged:
        """Batcher thread: frames (H, W, 3) uint8 -> a pinned slot (blocks while all are in use)."""
        slot = _take(self.inputs.free, self.stop)
        ev = self.uploaded[slot]
        if ev is not None:
            ev.synchronize()  # the slot's previous batch has left for the device
        h, w, _ = frames[0].shape
        host = self.inputs.view(slot, (len(frames), h, w, 3), torch.uint8)
        torch.stack(frames, out=host)
        return Staged(slot, host, len(frames))

    def release(self, staged: Staged) -> None:
        """Give the batch's input slot back, once: compute() releases it after the upload, and
        the worker's error path releases a batch whose compute() failed before that."""
        if not staged.released:
            staged.released = True
            self.inputs.free.put(staged.slot)

    def compute(self, staged: Staged) -> Pending:
        """Worker thread: upload, segment, start the copy back; returns without waiting."""
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.h2d):
            dev = torch.empty(staged.host.shape, dtype=torch.uint8, device=self.device)
            dev.copy_(staged.host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.h2d)
        self.uploaded[staged.slot] = ev
        self.release(staged)  # reusable once `ev` has fired (stage() waits for it)
        compute.wait_event(ev)
        dev.record_stream(compute)
        out = self.seg._run(dev, "u8", self.output)
        slot = _take(self.outputs.free, self.stop)
        host = self.outputs.view(slot, tuple(out.shape), out.dtype)
        self.d2h.wait_stream(compute)
        with torch.cuda.stream(self.d2h):
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        out.record_stream(self.d2h)
        return Pending(slot, host, done)

    def fetch(self, pending: Pending) -> torch.Tensor:
        """Consumer: wait for the copy, take the result out of the slot, free the slot."""
        pending.done.synchronize()
        result = pending.host.clone()
        self.outputs.free.put(pending.slot)
        return result
