"""``fastfcn train``: whole-image training of the model zoo's nets.

Per-pixel softmax cross-entropy (label 255 ignored; mean over pixels by default, the
paper's unnormalised sum with ``--loss-reduction sum``), SGD with momentum (the paper)
or Adam, random scaling and horizontal flips, the reference nets' preprocessing (RGB ->
BGR, mean subtraction, no scaling), and the paper's staged schedule
(``--stages fcn32s:N,fcn16s:N,fcn8s:N``: each net initialised by layer name from the
coarser one). Checkpoints are fastfcn safetensors files; ``--resume`` continues from the
last one. Several processes through ``torchrun`` train with DistributedDataParallel
(NCCL on GPUs, gloo on the CPU); every rank takes its share of each global batch.

Outputs in ``--out``: ``last.safetensors`` (+ ``train_state.pt``: optimizer, step,
history), ``final.safetensors``, ``history.json``, ``curves.png`` (loss and mean IU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .metrics import ConfusionMatrix
from .progress import Progress

VAL_SEED_OFFSET = 7919  # synthetic validation during training: seed + this, never the held-out seed


# --------------------------------------------------------------------------- preprocessing


def preprocess(images: torch.Tensor, config: dict) -> torch.Tensor:
    """uint8 RGB ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` as the model expects it.

    Follows the model's config: colour order (the reference nets take BGR), input scale
    (255: Caffe's unscaled 0..255), mean and std (in the model's colour order).
    """
    x = images.permute(0, 3, 1, 2).float()
    if config.get("color_order", "RGB").upper() == "BGR":
        x = x.flip(1)
    scale = float(config.get("input_scale", 255.0))
    if scale != 255.0:
        x = x * (scale / 255.0)
    mean = torch.tensor(config.get("mean", (0.0, 0.0, 0.0)), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", (1.0, 1.0, 1.0)), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, labels: torch.Tensor, scale: float, flips: torch.Tensor):
    """Random scaling and horizontal flips of a batch.

    images: ``(N, 3, H, W)`` float, labels: ``(N, H, W)`` long; one scale for the batch (so
    it stays one tensor), one flip flag per image ``flips: (N,) bool``. Images resize
    bilinearly, labels by nearest neighbour (ids must not blend).
    """
    if flips.any():
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        labels = torch.where(flips.view(-1, 1, 1), labels.flip(-1), labels)
    if scale != 1.0:
        h, w = labels.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return images, labels


# --------------------------------------------------------------------------- data


def open_dataset(spec: str, split: str, *, n: int, size: int, seed: int, num_classes: int):
    """``synthetic`` -> SyntheticScenes(n, size, seed, num_classes); else a VOC root."""
    from . import data

    if spec == "synthetic":
        if seed == data.HELDOUT_SEED:
            raise InputError(f"seed {seed} is the held-out synthetic split's; training must never see it")
        return data.SyntheticScenes(n, size, seed, num_classes)
    return data.VOCSegmentation(spec, split)


def mosaic(images: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile groups of k*k images into one canvas: ``(N*k*k, H, W, 3)`` -> ``(N, k*H, k*W, 3)``
    (labels ``(N*k*k, H, W)`` -> ``(N, k*H, k*W)``).

    The reference nets pad conv1_1 by 100 pixels, so a 96x96 image costs a 296x296 forward;
    3x3 tiles cost 488x488 for nine images, 3.3x less per image.
    """
    if k == 1:
        return images, labels
    n, h, w = labels.shape
    images = images.view(n // (k * k), k, k, h, w, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * h, k * w, 3)
    labels = labels.view(n // (k * k), k, k, h, w).permute(0, 1, 3, 2, 4).reshape(-1, k * h, k * w)
    return images, labels


def _batch(ds, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items of one size: ``(N, H, W, 3)`` uint8 and ``(N, H, W)`` long."""
    items = [ds[int(i)] for i in idx]
    shapes = {im.shape for im, _ in items}
    if len(shapes) != 1:
        raise InputError(
            f"images of one batch differ in size ({sorted(shapes)}); use --batch 1 for datasets of mixed "
            "sizes (whole-image training, as in the paper)"
        )
    images = torch.from_numpy(np.stack([im for im, _ in items]))
    labels = torch.from_numpy(np.stack([lb for _, lb in items]).astype(np.int64))
    return images, labels


# --------------------------------------------------------------------------- model set-up


def init_weights(model: nn.Module) -> None:
    """From-scratch init: He-normal convolutions, zero biases; score layers zero (the paper's
    choice for new score layers). Upsampling deconvolutions keep their bilinear init."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if name.startswith("score"):
                nn.init.zeros_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvBN(nn.Module):
    """A convolution followed by a training-only BatchNorm (see ``add_batchnorm``)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv, self.bn = conv, nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def add_batchnorm(model: nn.Module) -> list[str]:
    """Put a BatchNorm after every backbone convolution (``conv*``, ``fc*``) for training.

    The reference FCNs have no normalisation: they start from ImageNet VGG weights. From
    scratch, a plain 15-layer stack learns slowly; BatchNorm during training, folded into
    the convolutions afterwards (``fold_added_batchnorm``), gives back the exact reference
    architecture. Returns the wrapped module names.
    """
    names = [
        n for n, m in model.named_children() if isinstance(m, nn.Conv2d) and n.startswith(("conv", "fc"))
    ]
    for n in names:
        setattr(model, n, ConvBN(getattr(model, n)))
    return names


@torch.no_grad()
def fold_added_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ConvBN back into a plain convolution with the BN's running statistics (exact in eval)."""
    for n, m in list(model.named_children()):
        if isinstance(m, ConvBN):
            conv, bn = m.conv, m.bn
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(s.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = nn.Parameter((bias - bn.running_mean) * s + bn.bias)
            setattr(model, n, conv)
    return model


def plain_copy(model: nn.Module) -> nn.Module:
    """The model as the reference architecture: a deep copy with any training BatchNorm folded."""
    import copy

    m = copy.deepcopy(model).cpu()
    if any(isinstance(c, ConvBN) for c in m.children()):
        m.eval()
        fold_added_batchnorm(m)
    return m


def copy_by_name(dst: nn.Module, src_state: dict) -> list[str]:
    """Copy every tensor of ``src_state`` whose name and shape match into ``dst``; returns the names."""
    own = dst.state_dict()
    copied = []
    with torch.no_grad():
        for k, v in src_state.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v)
                copied.append(k)
    return copied


def parse_stages(spec: str | None, arch: str, iters: int) -> list[tuple[str, int]]:
    """``"fcn32s:3000,fcn16s:1000,fcn8s:1000"`` -> [(arch, iters), ...]; default one stage."""
    if not spec:
        return [(arch, iters)]
    out = []
    for part in spec.split(","):
        name, _, n = part.strip().partition(":")
        if not name or not n.isdigit() or int(n) < 1:
            raise InputError(f"--stages expects ARCH:ITERS[,ARCH:ITERS...]; got {part!r} in {spec!r}")
        out.append((name, int(n)))
    return out


# --------------------------------------------------------------------------- curves


def plot_curves(history: dict, path: str | os.PathLike, title: str = "") -> None:
    """Two line charts side by side (training loss, validation mean IU vs step) as a PNG."""
    from PIL import Image, ImageDraw

    panels = [
        ("training loss", history.get("loss", []), (200, 60, 40)),
        ("validation mean IU", history.get("val_mean_iu", []), (40, 90, 200)),
    ]
    W, H, m = 420, 300, 48
    img = Image.new("RGB", (W * len(panels), H + (20 if title else 0)), "white")
    d = ImageDraw.Draw(img)
    top = 20 if title else 0
    if title:
        d.text((8, 4), title, fill="black")
    for k, (name, pts, colour) in enumerate(panels):
        x0, y0, x1, y1 = k * W + m, top + 24, k * W + W - 16, top + H - m + 8
        d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        d.text((x0, top + 6), name, fill="black")
        pts = [(float(s), float(v)) for s, v in pts if v == v]
        if not pts:
            d.text((x0 + 10, (y0 + y1) // 2), "no data", fill=(120, 120, 120))
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys)
        if ymax - ymin < 1e-9:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad

        def to_px(s, v, xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax, x0=x0, x1=x1, y0=y0, y1=y1):
            return x0 + (s - xmin) / (xmax - xmin) * (x1 - x0), y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

        for t in range(5):  # horizontal grid with value labels
            v = ymin + (ymax - ymin) * t / 4
            _, py = to_px(xmin, v)
            d.line((x0, py, x1, py), fill=(230, 230, 230))
            d.text((k * W + 4, py - 5), f"{v:.3g}", fill=(80, 80, 80))
        for t in range(3):
            s = xmin + (xmax - xmin) * t / 2
            px, _ = to_px(s, ymin)
            d.text((px - 10, y1 + 4), f"{int(s)}", fill=(80, 80, 80))
        d.text(((x0 + x1) // 2 - 12, y1 + 20), "step", fill=(80, 80, 80))
        if len(pts) == 1:
            px, py = to_px(*pts[0])
            d.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        else:
            d.line([to_px(s, v) for s, v in pts], fill=colour, width=2)
    img.save(path)


def smooth(values: list[float], k: int) -> list[float]:
    """Running mean over the last k values (the logged loss is noisy per batch)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


# --------------------------------------------------------------------------- distributed


def _dist_setup() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cpu")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


# --------------------------------------------------------------------------- training


def evaluate_model(model: nn.Module, ds, num_classes: int, batch: int = 16, device=None) -> dict:
    """Mean IU etc. of a model (eval mode, reference forward) over a dataset of one image size."""
    from .metrics import scores

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes)
    with torch.no_grad():
        for s in range(0, len(ds), batch):
            images, labels = _batch(ds, range(s, min(len(ds), s + batch)))
            x = preprocess(images.to(device), model.config)
            cm.update(labels, model(x).argmax(1).cpu())
    model.train(was_training)
    return scores(cm.matrix)


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by the ``fastfcn train`` arguments; returns the history."""
    import fastfcn
    from fastfcn import models

    rank, world, device = _dist_setup()
    if args.device != "auto":
        device = torch.device(args.device)
    elif world == 1 and torch.cuda.is_available():
        device = torch.device("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % world:
        raise InputError(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    main_rank = rank == 0
    out = Path(args.out)

    stages = parse_stages(args.stages, args.arch, args.iters)
    total = sum(n for _, n in stages)
    ds = open_dataset(args.data, args.split, n=args.train_n, size=args.size, seed=args.seed,
                      num_classes=args.num_classes)  # fmt: skip
    num_classes = getattr(ds, "num_classes", args.num_classes)
    class_names = list(getattr(ds, "class_names", [])) or None
    val = None
    if args.val_every and args.val_n:
        if args.data == "synthetic":
            val = open_dataset("synthetic", "", n=args.val_n, size=args.size,
                               seed=args.seed + VAL_SEED_OFFSET, num_classes=num_classes)  # fmt: skip
        elif args.val_split:
            val = open_dataset(args.data, args.val_split, n=0, size=0, seed=0, num_classes=num_classes)
            if len(val) > args.val_n:
                val = _Subset(val, args.val_n)

    # Resume: the step counter, the stage and its weights, the optimizer and the history.
    step, history, state = 0, {"loss": [], "val_mean_iu": []}, None
    state_path = out / "train_state.pt"
    if args.resume:
        if not state_path.is_file():
            raise InputError(f"--resume: {state_path} is missing; train without --resume first")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        step, history = int(state["step"]), state["history"]
    if main_rank:
        # Only now, with the arguments, the data and the resume state checked, is anything written.
        out.mkdir(parents=True, exist_ok=True)
        print(f"training {' -> '.join(f'{a} ({n} it)' for a, n in stages)} on {args.data} "
              f"({len(ds)} images, {num_classes} classes), {world} process(es), device {device}",
              file=sys.stderr)  # fmt: skip

    model, prev_state, done_before = None, None, 0
    t_start = time.time()
    for si, (arch, iters) in enumerate(stages):
        stage_end = done_before + iters
        if step >= stage_end:  # finished before a resume
            done_before = stage_end
            continue
        options = {"dropout": args.dropout}
        if args.learnable_upsampling:
            options["learnable_upsampling"] = True
        model = models.build(arch, num_classes=num_classes, width=args.width, **options)
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        init_weights(model)
        if class_names:
            model.config["class_names"] = class_names
        resumed_here = state is not None and int(state["stage"]) == si
        if resumed_here:
            ck = fastfcn.load(out / "last.safetensors")
            model.load_state_dict(ck.state_dict())
        elif prev_state is not None:
            copied = copy_by_name(model, prev_state)
            if main_rank:
                print(f"stage {si + 1}: {arch} initialised from the previous stage ({len(copied)} tensors)",
                      file=sys.stderr)  # fmt: skip
        elif args.init:
            copied = copy_by_name(model, fastfcn.load(args.init).state_dict())
            if main_rank:
                print(f"{arch} initialised from {args.init} ({len(copied)} tensors by name)", file=sys.stderr)
        if args.batchnorm:
            add_batchnorm(model)
            if resumed_here and "model" in state:
                model.load_state_dict(state["model"])
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
        if resumed_here:
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
        net = model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        progress = Progress(total, label=arch, enabled=main_rank and not args.quiet)
        progress.start = step
        while step < stage_end:
            lr = _lr(args, step - done_before, iters)
            for g in opt.param_groups:
                g["lr"] = lr
            # The global batch of this step depends only on (seed, step): a resumed run sees
            # the same data, and the ranks split one batch between them.
            rng = np.random.default_rng([args.seed, step, 0xB47C])
            idx = rng.integers(0, len(ds), (args.batch, args.mosaic * args.mosaic))
            scale = float(rng.uniform(args.scale_min, args.scale_max)) if args.scale_max > 0 else 1.0
            flips = torch.from_numpy(rng.random(args.batch) < 0.5)
            if not args.flip:
                flips[:] = False
            mine = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
            images, labels = mosaic(*_batch(ds, idx[mine].reshape(-1)), args.mosaic)
            x = preprocess(images.to(device), model.config)
            x, y = augment(x, labels.to(device), scale, flips[mine].to(device))
            logits = net(x)
            loss = F.cross_entropy(logits, y, ignore_index=255, reduction=args.loss_reduction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise InputError(
                    f"loss became {lv} at step {step}; lower --lr (now {args.lr}) or use mean loss reduction"
                )
            history["loss"].append([step, lv])
            sm = smooth([v for _, v in history["loss"][-50:]], 50)[-1]
            progress.update(step, f"loss {sm:.4f}")
            last = step == stage_end
            if val is not None and main_rank and (step % args.val_every == 0 or last):
                r = evaluate_model(plain_copy(model) if args.batchnorm else model, val, num_classes,
                                   device=torch.device("cpu") if args.batchnorm else device)
                history["val_mean_iu"].append([step, r["mean_iu"]])
                msg = f"step {step}: loss {sm:.4f}  val mean IU {100 * r['mean_iu']:.2f}  lr {lr:.3g}"
                print(("\n" if progress.tty else "") + msg, file=sys.stderr, flush=True)
            if main_rank and (step % args.save_every == 0 or last):
                _save(fastfcn, model, out, step, si, opt, history, args, arch)
        if world > 1:
            _check_in_sync(model)
        model = plain_copy(model) if args.batchnorm else model
        prev_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        done_before = stage_end

    if model is None:
        raise InputError(f"nothing to do: {out} already holds a run of {total} iterations")
    if main_rank:
        meta = _meta(args, step, arch)
        fastfcn.save(model.cpu(), out / "final.safetensors", **meta)
        if args.export:
            Path(args.export).parent.mkdir(parents=True, exist_ok=True)
            fastfcn.save(model, args.export, **meta)
        (out / "history.json").write_text(json.dumps(history))
        plot_curves(_for_plot(history), out / "curves.png", f"{arch} width {args.width} on {args.data}")
        print(f"done: {step} iterations in {time.time() - t_start:.0f} s; wrote {out / 'final.safetensors'}"
              + (f" and {args.export}" if args.export else ""), file=sys.stderr)  # fmt: skip
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return history


class _Subset:
    def __init__(self, ds, n):
        self.ds, self.n = ds, n
        self.num_classes = getattr(ds, "num_classes", None)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def _lr(args, i: int, n: int) -> float:
    if args.schedule == "poly":
        return args.lr * (1 - i / n) ** 0.9
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * i / n))
    return args.lr


def _check_in_sync(model: nn.Module) -> None:
    """DDP keeps replicas identical; verify it once per stage (a cheap all-reduce of a checksum)."""
    import torch.distributed as dist

    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().cpu()
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        state = "in sync" if float(hi - lo) <= 1e-9 * max(1.0, abs(float(hi))) else "OUT OF SYNC"
        world = dist.get_world_size()
        print(f"ddp: {world} processes ({dist.get_backend()}), parameters {state}", file=sys.stderr)


def _meta(args, step: int, arch: str) -> dict:
    return {"trained": {"data": args.data, "seed": args.seed, "iterations": step, "arch": arch,
                        "size": args.size, "optimizer": args.optimizer, "lr": args.lr}}  # fmt: skip


def _save(fastfcn, model, out: Path, step, stage, opt, history, args, arch) -> None:
    # fastfcn.save writes atomically; the state file is renamed into place the same way, so an
    # interrupted save never leaves a broken resume point.
    fastfcn.save(plain_copy(model), out / "last.safetensors", **_meta(args, step, arch))
    state = {"step": step, "stage": stage, "optimizer": opt.state_dict(), "history": history,
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    if args.batchnorm:  # the unfolded weights and statistics, for an exact resume
        state["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / "train_state.pt.tmp")
    os.replace(out / "train_state.pt.tmp", out / "train_state.pt")


def _for_plot(history: dict) -> dict:
    loss = history["loss"]
    k = max(1, len(loss) // 50)
    sm = smooth([v for _, v in loss], k)
    return {"loss": [[s, v] for (s, _), v in zip(loss, sm)], "val_mean_iu": history["val_mean_iu"]}


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from .data import HELDOUT_SIZE
    from .models import available
    from .names import device_arg

    a = parser.add_argument
    a("--data", default="synthetic", help="a VOC root, or 'synthetic' (SyntheticScenes; default)")
    a("--split", default="train", help="VOC split to train on (default train; e.g. train_aug with SBD)")
    a("--val-split", default="val", help="VOC split for validation during training (default val)")
    a("--out", default="runs/train", help="output folder: checkpoints, history, curves (default runs/train)")
    a("--export", default=None, help="also write the final model to this path")
    a("--arch", default="fcn8s", choices=available(),
      help="architecture (default fcn8s); see --stages for the staged schedule")  # fmt: skip
    a("--stages", default=None, help="staged schedule, e.g. fcn32s:3000,fcn16s:1000,fcn8s:1000")
    a("--width", type=float, default=1.0, help="channel width multiplier (default 1.0 = the paper's net)")
    a("--num-classes", type=int, default=5, help="classes of the synthetic data (VOC: from the data)")
    a("--size", type=int, default=HELDOUT_SIZE, help=f"synthetic scene size (default {HELDOUT_SIZE})")
    a("--train-n", type=int, default=100_000, help="synthetic training scenes to draw from (default 100000)")
    a("--seed", type=int, default=0, help="seed of data order, augmentation, init and synthetic scenes")
    a("--iters", type=int, default=1000, help="iterations (single stage; default 1000)")
    a("--batch", type=int, default=8, help="global batch size (split over processes; default 8)")
    a("--mosaic", type=int, default=1, help="train on KxK tiles of images (same-size data; default 1)")
    a("--optimizer", choices=("sgd", "adam"), default="adam", help="adam (default) or sgd with momentum")
    a("--lr", type=float, default=None, help="learning rate (default: adam 1e-3, sgd 1e-2 with mean loss)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9; the paper: 0.99 with sum loss)")
    a("--weight-decay", type=float, default=0.0, help="weight decay (the paper: 5e-4 or 2e-4)")
    a("--schedule", choices=("const", "poly", "cosine"), default="const", help="learning-rate schedule")
    a("--loss-reduction", choices=("mean", "sum"), default="mean",
      help="mean over pixels (default) or the paper's unnormalised sum")  # fmt: skip
    a("--scale-min", type=float, default=0.5, help="random scaling range, low end (default 0.5)")
    a("--scale-max", type=float, default=1.3, help="random scaling range, high end (0: off; default 1.3)")
    a("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    a("--dropout", type=float, default=0.5, help="dropout after fc6 and fc7 (default 0.5, the paper's)")
    a("--batchnorm", action="store_true",
      help="train with BatchNorm after each conv, folded away in every saved model (from-scratch training)")
    a("--learnable-upsampling", action="store_true", help="learn the upsampling deconvolutions too")
    a("--init", default=None, help="initialise from a checkpoint, by layer name where shapes match")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--val-every", type=int, default=200, help="validate every N iterations (0: never; default 200)")
    a("--val-n", type=int, default=100, help="validation images (default 100)")
    a("--save-every", type=int, default=200, help="checkpoint every N iterations (default 200)")
    a("--device", default="auto", type=device_arg,
      help="cpu, cuda, cuda:1 ... (default: the GPU of this rank, else CPU)")
    a("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    a("--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments with one InputError naming the option and its value, before any
    data is read or anything is written (a bad --export found after training loses the run)."""
    from .models import available, input_modalities
    from .paths import check_output_dir, check_output_file

    def need(ok: bool, option: str, value, expected: str) -> None:
        if not ok:
            raise InputError(f"{option} {value}: expected {expected}")

    finite = math.isfinite
    need(finite(args.lr) and args.lr > 0, "--lr", args.lr, "a learning rate > 0")
    need(0 < args.width <= 4, "--width", args.width, "a channel width multiplier in (0, 4]")
    need(finite(args.momentum) and 0 <= args.momentum < 1, "--momentum", args.momentum, "a value in [0, 1)")
    need(finite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay", args.weight_decay, ">= 0")
    need(0 <= args.dropout < 1, "--dropout", args.dropout, "a probability in [0, 1)")
    for option in ("batch", "iters", "mosaic", "save_every", "train_n"):
        v = getattr(args, option)
        need(v >= 1, "--" + option.replace("_", "-"), v, ">= 1")
    for option in ("val_every", "val_n", "threads"):
        v = getattr(args, option)
        need(v >= 0, "--" + option.replace("_", "-"), v, ">= 0")
    need(args.num_classes >= 2, "--num-classes", args.num_classes, ">= 2 (background and one object class)")
    need(args.size >= 8, "--size", args.size, ">= 8 pixels")
    if not 0 <= args.scale_min <= args.scale_max and args.scale_max != 0:
        raise InputError(f"--scale-min {args.scale_min} must be in 0..--scale-max ({args.scale_max})")
    for arch, _ in parse_stages(args.stages, args.arch, args.iters):
        need(arch in available(), "--stages architecture", repr(arch), f"one of {', '.join(available())}")
        # The data loaders read colour images (VOC layout) only: no depth or HHA to feed.
        need(len(input_modalities(arch)) == 1, "--arch", arch,
             "a net of one image input (the data loaders read no depth or HHA)")  # fmt: skip
    if args.init is not None and not Path(args.init).is_file():
        raise InputError(f"--init {args.init}: no such checkpoint file")
    if args.data != "synthetic" and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: not a folder; expected a VOC root or 'synthetic'")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except (RuntimeError, TypeError):
            raise InputError(f"--device {args.device}: expected auto, cpu, cuda or cuda:N") from None
    check_output_dir(args.out, "--out")
    if args.export:
        check_output_file(args.export, "--export")


def main(args: argparse.Namespace) -> int:
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 1e-2
    check_args(args)
    train(args)
    return 0
