"""Scale-out: ``segment_dataset`` images/s with 1 and 2 actors on one machine (Ray Data).

Each round is a whole run (``resume=False``): listing, actor start (each actor imports torch
and loads the Segmenter), reading PNGs, inference, writing label PNGs, the manifest. So
``images_per_s`` is what a user sees for a run of this size; ``busy_images_per_s`` counts
only the actors' time on the images (the per-row ``seconds`` of the manifest, summed per
actor), which is what more images per run approach. ``model_only_images_per_s`` is
``Segmenter.run`` one image at a time in this process, with all its threads.

On CPU the actors split the cores (1 actor x 2 threads, or 2 x 1 on the 2-core machines);
on a GPU each actor takes half of it (``num_gpus_per_worker=0.5``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import fastfcn

ray = pytest.importorskip("ray", reason="Ray Data is the ray extra: pip install 'fastfcn[ray]'")

from fastfcn.data import MovingScenes  # noqa: E402
from fastfcn.demo import DEMO_MODEL  # noqa: E402
from fastfcn.distributed import segment_dataset  # noqa: E402


@dataclass(frozen=True)
class DistCase:
    name: str
    images: int
    height: int
    width: int
    batch: int
    rounds: int


# CPU: the demo model at 128x192 runs ~25 images/s on 2 cores; 96 images keep a round near
# 10 s with the ~5 s of actor start, 2 rounds x 2 pool sizes ~ 1 minute.
CPU_CASE = DistCase("demo-128x192", 96, 128, 192, 8, 2)
GPU_CASE = DistCase("demo-512x512", 512, 512, 512, 16, 2)


def pytest_generate_tests(metafunc):
    if "actors" not in metafunc.fixturenames:
        return
    metafunc.parametrize("actors", [1, 2], ids=["1-actor", "2-actors"])
    state = metafunc.config._fastfcn_bench
    case = CPU_CASE if state.profile == "cpu" else GPU_CASE
    state.notes.append(f"distributed: segment_dataset with 1 and 2 actors, {case.images} PNGs "
                       f"{case.height}x{case.width}, demo model")  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=200 * 1024**2,
             log_to_driver=False)  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, bench_state):
    from PIL import Image

    case = CPU_CASE if bench_state.profile == "cpu" else GPU_CASE
    folder = tmp_path_factory.mktemp("dist-in")
    scenes = MovingScenes(case.images, (case.height, case.width))
    for k in range(case.images):
        Image.fromarray(scenes[k][0]).save(folder / f"scene{k:04d}.png")
    return case, folder


def _model_only(folder, device) -> float:
    from fastfcn.imageio import read_image

    seg = fastfcn.Segmenter(DEMO_MODEL, device=str(device))
    paths = sorted(folder.iterdir())
    seg.run(read_image(paths[0]))  # warm-up
    t0 = time.perf_counter()
    for p in paths:
        seg.run(read_image(p)).cpu()
    return len(paths) / (time.perf_counter() - t0)


def test_distributed_images(actors, ray_cluster, dataset, benchmark, bench_device, tmp_path, record_extra):
    case, folder = dataset
    gpus = 0.5 if bench_device.type == "cuda" else 0
    summaries = []

    def target():
        s = segment_dataset([folder], tmp_path / "out", DEMO_MODEL, batch_size=case.batch, concurrency=actors,
                            num_gpus_per_worker=gpus, resume=False)  # fmt: skip
        assert (s["done"], s["failed"]) == (case.images, 0), s
        summaries.append(s)

    benchmark.group = f"distributed {case.name}"
    benchmark.pedantic(target, rounds=case.rounds, iterations=1, warmup_rounds=0)
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    per_worker: dict[str, float] = {}
    for r in rows:
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0.0) + r["seconds"]
    busy = max(per_worker.values())  # the actors work side by side: the busiest one bounds the run
    extra = record_extra(benchmark, items=case.images)
    extra.update(
        case=case.name, actors=actors, images=case.images, height=case.height, width=case.width,
        batch=case.batch, gpus_per_worker=gpus, images_per_s_rounds=[s["images_per_s"] for s in summaries],
        busy_images_per_s=case.images / busy, workers_seen=len(per_worker),
        model_only_images_per_s=_model_only(folder, bench_device) if actors == 1 else None,
        torch_threads_driver=torch.get_num_threads(), ray_version=ray.__version__,
        median_images_per_s=float(np.median([s["images_per_s"] for s in summaries])),
    )  # fmt: skip
