"""Dense CRF and ensembles on the held-out synthetic split: mean IU and cost (a script, not a
pytest benchmark).

    OMP_NUM_THREADS=2 python benchmarks/crf_ensemble_eval.py --second runs/deconv/final.safetensors \
        --out benchmarks/results/crf-ensemble-<machine>-<date>.json

What it measures, with the shipped demo model (FCN-8s) and a second model (``--second``, e.g. a
DeconvNet trained briefly with ``fastfcn train --arch deconvnet``):

- mean IU (and the paper's other three numbers) on the held-out split (500 scenes, 96x96) of
  each model alone, of their Ensemble (equal weights), each with and without the dense CRF;
- the CRF with DeepLab's parameters (CRFParams()) and with parameters chosen on a validation
  split drawn from a training seed (never the held-out one): a small grid over the appearance
  kernel, the best mean IU there wins;
- the cost: ms per image of the models, the ensemble and the CRF alone (median of the per-image
  times), at 96x96 with 5 classes and at 500x375 (a VOC image) with 21 classes.

The CRF numbers come from cached probabilities (each model runs once per split); one setting is
also run end to end through ``Segmenter(postprocess="crf")`` / ``Ensemble(postprocess="crf")``
and must give the same mean IU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastfcn  # noqa: E402
from fastfcn.data import HELDOUT_SIZE, SyntheticScenes, heldout_scenes  # noqa: E402
from fastfcn.evaluate import evaluate  # noqa: E402
from fastfcn.metrics import ConfusionMatrix, scores  # noqa: E402
from fastfcn.runtime.crf import CRFParams, dense_crf  # noqa: E402

# The validation split for choosing CRF parameters: a training seed (fastfcn train's default
# data seed is 0; the held-out seed is fastfcn.data.HELDOUT_SEED).
VAL_SEED = 7
GRID = {
    "bilateral_sxy": (10.0, 30.0, 67.0),
    "bilateral_srgb": (3.0, 10.0, 20.0),
    "bilateral_compat": (4.0, 10.0),
}


def load_split(ds) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([ds[i][0] for i in range(len(ds))]), np.stack([ds[i][1] for i in range(len(ds))])


def probs_of(runner, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, dict]:
    """(N, C, H, W) float32 probabilities and the median wall and CPU ms per image (over batches)."""
    out, per_image, cpu = [], [], []
    for i in range(0, len(images), batch):
        t0, c0 = time.perf_counter(), time.process_time()
        p = runner.run(images[i:i + batch], "probs")
        per_image.append((time.perf_counter() - t0) * 1e3 / len(p))
        cpu.append((time.process_time() - c0) * 1e3 / len(p))
        out.append(p.cpu().numpy())
    return np.concatenate(out), {"wall_ms": round(statistics.median(per_image), 2),
                                 "cpu_ms": round(statistics.median(cpu), 2)}  # fmt: skip


def miou(labels: np.ndarray, pred: np.ndarray, c: int) -> dict:
    cm = ConfusionMatrix(c)
    cm.update(labels, pred)
    s = scores(cm.matrix)
    return {k: round(100 * float(s[k]), 2) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")}


def crf_labels(probs: np.ndarray, images: np.ndarray, params: CRFParams):
    """CRF argmax per image and the median ms per image of the CRF alone: (labels, wall, CPU).
    The CRF runs on one thread, so its CPU time is what it costs on an idle core; on the shared
    machine the wall time also counts the waits for a core."""
    out, ms, cpu = [], [], []
    for p, im in zip(probs, images):
        t0, c0 = time.perf_counter(), time.process_time()
        q = dense_crf(p, im, params)
        ms.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        out.append(q.argmax(0))
    return np.stack(out).astype(np.uint8), statistics.median(ms), statistics.median(cpu)


def choose_params(probs: np.ndarray, images: np.ndarray, labels: np.ndarray, c: int):
    """The grid's best CRFParams by mean IU on this split, and every row of the grid."""
    rows = []
    for values in itertools.product(*GRID.values()):
        params = CRFParams(**dict(zip(GRID, values)))
        pred, _, _ = crf_labels(probs, images, params)
        rows.append((miou(labels, pred, c)["mean_iu"], params))
    rows.sort(key=lambda r: -r[0])
    return rows[0][1], [{"mean_iu": m, **p.as_dict()} for m, p in rows]


def cost_at(size: tuple[int, int], c: int, params: CRFParams, reps: int = 3) -> dict:
    """Median wall and CPU ms of the CRF alone on one random image with random probabilities."""
    rng = np.random.default_rng(0)
    p = rng.random((c, *size)).astype(np.float32)
    p /= p.sum(0)
    im = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ms, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        dense_crf(p, im, params)
        ms.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"wall_ms": round(statistics.median(ms), 1), "cpu_ms": round(statistics.median(cpu), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--second", default=None, help="a second model's checkpoint (e.g. a DeconvNet): "
                    "adds it and the Ensemble of both")  # fmt: skip
    ap.add_argument("--second-command", default="", help="how the second model was made (recorded)")
    ap.add_argument("--crf-on", default="all",
                    help="comma-separated rows that get the CRF: demo, second, ensemble (default all)")
    ap.add_argument("--cost", action="store_true", help="also time the CRF alone at 96x96 and 500x375")
    ap.add_argument("--n", type=int, default=500, help="held-out scenes (default 500, the whole split)")
    ap.add_argument("--val-n", type=int, default=50, help="validation scenes for choosing CRF parameters")
    ap.add_argument("--backend", default="fused")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from common import device_info, utc_now

    kw = {"device": "cpu", "backend": args.backend, "precision": args.precision}
    members = {"demo": fastfcn.Segmenter("demo", **kw)}
    if args.second:
        members["second"] = fastfcn.Segmenter(args.second, **kw)
    crf_on = set(members) | ({"ensemble"} if args.second else set())
    if args.crf_on != "all":
        crf_on &= set(args.crf_on.split(","))
    c = members["demo"].num_classes
    test_im, test_lb = load_split(heldout_scenes(args.n, HELDOUT_SIZE, c))
    val_im, val_lb = load_split(SyntheticScenes(args.val_n, HELDOUT_SIZE, VAL_SEED, c))
    load0 = os.getloadavg()[0]

    probs, val_probs, model_ms = {}, {}, {}
    for name, seg in members.items():
        probs[name], model_ms[name] = probs_of(seg, test_im)
        val_probs[name], _ = probs_of(seg, val_im)
    weights = {}
    if args.second:
        ens = fastfcn.Ensemble(list(members.values()))
        ens_probs, model_ms["ensemble"] = probs_of(ens, test_im)
        # The Ensemble's average is the mean of the cached member probabilities.
        hand = sum(probs.values()) / len(probs)
        assert float(np.abs(ens_probs - hand).max()) < 1e-5, "Ensemble differs from the mean of its members"
        probs["ensemble"], val_probs["ensemble"] = ens_probs, sum(v for k, v in val_probs.items()
                                                                   if k != "ensemble") / 2  # fmt: skip
        # The demo's weight chosen on the validation split (the second gets 1 - w).
        for w in (0.5, 0.25, 0.75):  # equal first: a tie keeps equal weights
            v = w * val_probs["demo"] + (1 - w) * val_probs["second"]
            weights[w] = miou(val_lb, v.argmax(1), c)["mean_iu"]
        w = max(weights, key=weights.get)
        tuned_name = f"ensemble, weights {w:g}/{1 - w:g} (chosen on val)"
        probs[tuned_name] = w * probs["demo"] + (1 - w) * probs["second"]

    deeplab = CRFParams()
    results, grids = {}, {}
    for name in probs:
        row = {"no_crf": miou(test_lb, probs[name].argmax(1), c)}
        if name in model_ms:
            row["model_ms_per_image"] = model_ms[name]
        if name in crf_on:
            tuned, grids[name] = choose_params(val_probs[name], val_im, val_lb, c)
            for label, params in (("crf_deeplab", deeplab), ("crf_tuned", tuned)):
                pred, ms, cpu = crf_labels(probs[name], test_im, params)
                row[label] = {**miou(test_lb, pred, c), "crf_ms_per_image": round(ms, 2),
                              "crf_cpu_ms_per_image": round(cpu, 2), "params": params.as_dict()}  # fmt: skip
        results[name] = row
        line = f"{name:<14} mean IU {row['no_crf']['mean_iu']:.2f}"
        if name in crf_on:
            d = row["crf_deeplab"]
            line += (f"  +CRF(DeepLab) {d['mean_iu']:.2f}"
                     f"  +CRF(tuned on val) {row['crf_tuned']['mean_iu']:.2f}"
                     f"  CRF {d['crf_ms_per_image']:.1f} ms/img ({d['crf_cpu_ms_per_image']:.1f} ms CPU)")
        print(line, flush=True)

    # End to end through the public API: the same numbers as from the cached probabilities.
    e2e = {}
    if "demo" in crf_on:
        seg_crf = fastfcn.Segmenter("demo", postprocess="crf", **kw)
        m = 100 * evaluate(seg_crf, heldout_scenes(args.n, HELDOUT_SIZE, c), c, batch=16)[0]["mean_iu"]
        assert abs(m - results["demo"]["crf_deeplab"]["mean_iu"]) < 0.01
        e2e["Segmenter('demo', postprocess='crf') mean_iu"] = round(m, 2)
    if "ensemble" in crf_on:
        tuned = CRFParams(**results["ensemble"]["crf_tuned"]["params"])
        ens_crf = fastfcn.Ensemble(list(members.values()), postprocess="crf", crf=tuned)
        m = 100 * evaluate(ens_crf, heldout_scenes(args.n, HELDOUT_SIZE, c), c, batch=16)[0]["mean_iu"]
        assert abs(m - results["ensemble"]["crf_tuned"]["mean_iu"]) < 0.01
        e2e["Ensemble(postprocess='crf', crf=tuned) mean_iu"] = round(m, 2)

    cost = {}
    if args.cost:
        cost = {f"{h}x{w}, {k} classes": cost_at((h, w), k, deeplab)
                for (h, w), k in (((96, 96), 5), ((375, 500), 21))}  # fmt: skip
        print("CRF alone (DeepLab parameters), ms per image:", cost)
    obj = {
        "what": "dense CRF and ensemble on the held-out synthetic split (benchmarks/crf_ensemble_eval.py)",
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "date": utc_now().isoformat(timespec="seconds"),
        "device": device_info("cpu"),
        "load_average_at_start": round(load0, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "split": {"heldout_scenes": args.n, "size": HELDOUT_SIZE, "classes": c,
                  "crf_tuning": f"SyntheticScenes({args.val_n}, {HELDOUT_SIZE}, seed={VAL_SEED}) "
                                "(a training seed)"},
        "backend": args.backend, "precision": args.precision,
        "members": {"demo": "fastfcn/assets/demo_fcn8s.safetensors (FCN-8s)"},
        "results": results,
        "ensemble_weight_of_demo_on_val": {str(k): v for k, v in weights.items()},
        "end_to_end_check": e2e,
        "crf_ms_alone_deeplab_params": cost,
        "crf_grid": {"searched": {k: list(v) for k, v in GRID.items()}, "by_model": grids},
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if args.second:
        second = members["second"]
        obj["members"]["second"] = {"arch": second.config.get("arch"), "checkpoint": str(args.second),
                                    "made_by": args.second_command}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(obj, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
