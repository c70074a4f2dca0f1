"""bf16 against fp32 on the CPU: label agreement and accuracy (a script, not a pytest benchmark).

    OMP_NUM_THREADS=2 python benchmarks/cpu_bf16_agreement.py [--n 32]

The shipped model (fastfcn/assets/demo_fcn8s.safetensors) on n held-out synthetic scenes: share
of pixels whose label is the fp32 label, and mean IU against the ground truth, for the fused
and torch backends at bf16; then random nets (every arch, width 0.25, 64x80 noise images,
two seeds): label agreement and max logit error relative to the logit range.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fastfcn
import fastfcn.models as models
from fastfcn.data import HELDOUT_SIZE, heldout_scenes
from fastfcn.demo import DEMO_MODEL
from fastfcn.metrics import confusion_matrix, scores


def shipped(n: int) -> None:
    scenes = heldout_scenes(n, HELDOUT_SIZE)
    images = np.stack([scenes[i][0] for i in range(n)])
    truth = torch.from_numpy(np.stack([scenes[i][1] for i in range(n)]))
    segs = {(b, p): fastfcn.Segmenter(str(DEMO_MODEL), device="cpu", backend=b, precision=p)
            for b in ("torch", "fused") for p in ("fp32", "bf16")}  # fmt: skip
    labels = {k: s.run(images) for k, s in segs.items()}
    c = segs["torch", "fp32"].config["num_classes"]
    ref = labels["torch", "fp32"]
    print(f"shipped FCN-8s, {n} held-out scenes {HELDOUT_SIZE}x{HELDOUT_SIZE}:")
    for k, lab in labels.items():
        miou = scores(confusion_matrix(truth, lab.long(), c))["mean_iu"]
        print(f"  {k[0]:<6} {k[1]:<5} labels = torch fp32 {float((lab == ref).float().mean()):.5f}  "
              f"mean IU {100 * miou:.2f}")  # fmt: skip


def random_nets() -> None:
    print("random nets, width 0.25, 2 x (64x80) noise images, two seeds:")
    for arch in models.available():
        if len(models.input_modalities(arch)) > 1:
            continue  # the NYUDv2 fusion nets take a second input (depth / HHA) besides the image
        row = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            m = models.build(arch, num_classes=21, width=0.25).eval()
            x = torch.randint(0, 256, (2, 64, 80, 3), dtype=torch.uint8)
            want = fastfcn.Segmenter(m, device="cpu", backend="torch", precision="fp32").run(x, "logits")
            for b in ("torch", "fused"):
                got = fastfcn.Segmenter(m, device="cpu", backend=b, precision="bf16").run(x, "logits")
                err = float((got - want).abs().max() / (want.max() - want.min()))
                same = float((got.argmax(1) == want.argmax(1)).float().mean())
                row.append(f"{b} s{seed}: {same:.4f} / {err:.1e}")
        print(f"  {arch:<17} " + "; ".join(row))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    shipped(args.n)
    random_nets()
