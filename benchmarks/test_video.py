"""Video end to end: ``segment_video`` frames/s against the model alone (pipeline efficiency).

For each case a clip of moving synthetic scenes (``fastfcn.data.MovingScenes``) is written
as H.264 (what users feed in), then:

- end to end: ``segment_video(clip, out.mp4, seg, mode="overlay", batch_size=B)``, timed
  whole (decode, batching, inference, overlay, H.264 encode, mux; the file is closed);
- model only: ``seg.run`` on the same decoded frames, B at a time, results copied to the
  host, timed over the same frames (decode excluded), right before each end-to-end round.

efficiency = end-to-end frames/s / model-only frames/s (target >= 0.9: the pipeline hides
decode and encode behind inference). Both sides use the same Segmenter. The end-to-end
output is checked every round: one frame out per frame in.

Cases: the demo model (FCN-8s width 0.125, 128x192) and FCN-8s width 1 at a reduced size
on every profile; on a GPU, FCN-8s width 1 at 1920x1080 in bf16 (target >= 300 frames/s
end to end on an H100/H200).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from common import sync

import fastfcn

av = pytest.importorskip("av", reason="PyAV is the video extra: pip install 'fastfcn[video]'")

from fastfcn.data import MovingScenes  # noqa: E402
from fastfcn.demo import DEMO_MODEL  # noqa: E402
from fastfcn.video import segment_video, write_video  # noqa: E402

TARGET_EFFICIENCY = 0.9


@dataclass(frozen=True)
class VideoCase:
    name: str
    model: str  # "demo" or an arch at width 1
    frames: int
    height: int
    width: int
    batch: int
    precision: str
    rounds: int


# CPU sizes fit ~2 minutes on 2 cores: demo model 48 frames ~2 s per side and round;
# FCN-8s width 1 at 96x128 ~0.3 s per frame, 16 frames.
CPU_CASES = [
    VideoCase("demo-128x192", "demo", 48, 128, 192, 8, "fp32", 3),
    VideoCase("fcn8s-w1-96x128", "fcn8s", 16, 96, 128, 8, "fp32", 2),
]
GPU_CASES = [
    VideoCase("demo-128x192", "demo", 512, 128, 192, 32, "bf16", 3),
    VideoCase("fcn8s-w1-1080p-bf16", "fcn8s", 256, 1080, 1920, 8, "bf16", 3),
]


def pytest_generate_tests(metafunc):
    if "vcase" not in metafunc.fixturenames:
        return
    state = metafunc.config._fastfcn_bench
    cases = CPU_CASES if state.profile == "cpu" else GPU_CASES
    metafunc.parametrize("vcase", cases, ids=[c.name for c in cases])
    state.notes.append(
        "video: segment_video (H.264 in, overlay H.264 out) vs Segmenter.run on the same decoded "
        f"frames; cases {', '.join(c.name for c in cases)}"
    )


def _segmenter(case: VideoCase, device: torch.device):
    if case.model == "demo":
        return fastfcn.Segmenter(DEMO_MODEL, device=str(device), precision=case.precision)
    torch.manual_seed(0)
    model = fastfcn.models.build(case.model, 21, 1.0).eval()
    return fastfcn.Segmenter(model, device=str(device), precision=case.precision)


def _clip(case: VideoCase, folder) -> tuple:
    scenes = MovingScenes(case.frames, (case.height, case.width))
    path = folder / f"{case.name}.mp4"
    write_video(path, (scenes[k][0] for k in range(case.frames)), 25)
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return path, decoded


def _model_only(seg, frames: list, batch: int, device) -> float:
    """Seconds for seg.run over ``frames``, ``batch`` at a time, results on the host.

    Run in a fresh thread, as the stream's worker runs it: on the 2 shared cores (load
    average ~7) the same torch calls took 2-3x longer in the main thread than in a second
    thread (torch backend, demo model, 8x128x192: 2.8 vs 1.3 s), which made the end-to-end
    pipeline look 1.7-2x *faster* than the model alone.
    """
    took: list = []

    def work():
        t0 = time.perf_counter()
        for i in range(0, len(frames), batch):
            seg.run(np.stack(frames[i:i + batch])).cpu()
        sync(device)
        took.append(time.perf_counter() - t0)

    t = threading.Thread(target=work, name="model-only")
    t.start()
    t.join()
    return took[0]


def test_video_pipeline(vcase, benchmark, bench_device, tmp_path, record_extra):
    case, device = vcase, bench_device
    seg = _segmenter(case, device)
    clip, frames = _clip(case, tmp_path)
    n = len(frames)
    assert n == case.frames
    _model_only(seg, frames[: case.batch], case.batch, device)  # warm-up: graphs, autotuning, allocations
    out = tmp_path / "out.mp4"
    summaries, model_times = [], []

    def setup():
        # The model-only run of each round goes right before its end-to-end run, so both see
        # the same machine load (2 shared cores: the load average varies 2-8 during a session).
        model_times.append(_model_only(seg, frames, case.batch, device))
        return (), {}

    def target():
        s = segment_video(clip, out, seg, mode="overlay", batch_size=case.batch, progress=False)
        assert s["frames_out"] == n, s
        summaries.append(s)

    benchmark.group = f"video {case.name}"
    benchmark.pedantic(target, setup=setup, rounds=case.rounds, iterations=1, warmup_rounds=0)
    model_s = statistics.median(model_times)
    e2e_s = benchmark.stats.stats.median
    e2e_fps, model_fps = n / e2e_s, n / model_s
    last = summaries[-1]
    extra = record_extra(benchmark, precision=seg.precision, items=n)
    extra.update(
        case=case.name, model="demo_fcn8s (width 0.125)" if case.model == "demo" else f"{case.model} width 1",
        frames=n, height=case.height, width=case.width, batch=case.batch, backend=seg.backend,
        end_to_end_fps=e2e_fps, model_only_fps=model_fps, efficiency=e2e_fps / model_fps,
        target_efficiency=TARGET_EFFICIENCY, meets_target=e2e_fps / model_fps >= TARGET_EFFICIENCY,
        decode_share=last["decode_share"], inference_share=last["inference_share"],
        encode_share=last["encode_share"], input="H.264 yuv420p (write_video)", mode="overlay",
        target_fps=300 if "1080p" in case.name else None, model_only_s=model_times,
        end_to_end_s=[x["seconds"] for x in summaries],
    )  # fmt: skip
    seg = None
    gc.collect()
