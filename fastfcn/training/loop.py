"""The training loop: whole-image training of the model zoo's nets.

Per-pixel softmax cross-entropy (label 255 ignored; mean over pixels by default, the paper's
unnormalised sum with ``--loss-reduction sum``; a net with several heads (SIFT Flow) sums its
heads' losses, each over its own classes, as the reference does: ``loss.py``), SGD with
momentum (the paper) or Adam, random scaling and horizontal flips, the model's own
preprocessing (the runtime's Preprocessor: for the reference nets RGB -> BGR, mean
subtraction, no scaling), and the paper's staged schedule (``--stages
fcn32s:N,fcn16s:N,fcn8s:N``: each net initialised by layer name from the coarser one). A
two-input net (NYUDv2 fusion) reads each image's depth or HHA file (``--depth`` / ``--hha``,
paired by name as eval pairs them), preprocessed by the same Preprocessor and flipped and
scaled with the image. ``--resume`` continues from the last save point. Several processes
through ``torchrun`` train with DistributedDataParallel (NCCL on GPUs, gloo on the CPU);
every rank takes its share of each global batch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..evaluate import evaluate
from ..progress import Progress
from ..runtime.preprocess import Preprocessor
from .augment import Subset, augment, batch_items, draw_batch, open_dataset
from .batchnorm import add_batchnorm, plain_copy
from .loss import IGNORE, segmentation_loss
from .plots import smooth
from .state import load_state, new_history, save_final, save_point

VAL_SEED_OFFSET = 7919  # synthetic validation during training: seed + this, never the held-out seed


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


# --------------------------------------------------------------------------- evaluation


class _Forward:
    """A model in training behind the ``run(images, output="labels", **second)`` face that
    ``fastfcn.evaluate.evaluate`` drives: eval mode, the reference forward, on ``device``; for a
    net with several heads (``heads``) one label map per head, ``{head: (N, H, W)}``."""

    def __init__(self, model: nn.Module, device):
        from ..models.multihead import output_heads

        self.model, self.device = model, device
        self.pre = Preprocessor(model.config, device)
        self.heads = output_heads(model.config)

    @torch.no_grad()
    def run(self, images, output: str = "labels", **second):
        from ..models.multihead import finish, split

        z = next((torch.from_numpy(v).to(self.device) for v in second.values()), None)  # depth / HHA
        y = self.model(self.pre(torch.from_numpy(images).to(self.device), z))
        if not self.heads:
            return y.argmax(1).cpu()
        return {k: v.cpu() for k, v in split(finish(y, "labels", self.heads), "labels", self.heads).items()}


def evaluate_model(model: nn.Module, ds, num_classes: int, batch: int = 16, device=None) -> dict:
    """Mean IU etc. of a model (eval mode, reference forward) over a dataset (``fastfcn.evaluate``);
    for a net with several heads ``{head: scores}``, each over its own classes."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return evaluate(_Forward(model, device), ds, num_classes, batch=batch)[0]
    finally:
        model.train(was_training)


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


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What the stages of one run share: arguments, processes, data and progress so far."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    stages: list[tuple[str, int]]
    ds: object
    val: object
    num_classes: int
    class_names: list[str] | None
    step: int
    history: dict
    state: dict | None  # the resume state, None for a fresh run
    # ((name, classes), ...) of a net with several heads (SIFT Flow), else None
    heads: tuple | None = None
    # The preprocessing an --init classifier set (torchvision's RGB 0..1 ImageNet mean/std): every
    # later stage's model is fed as the weights it starts from were trained.
    preprocessing: dict = field(default_factory=dict)
    # The resume point's model (last.safetensors, BatchNorm folded), None for a fresh run
    last: nn.Module | None = None

    @property
    def main_rank(self) -> bool:
        return self.rank == 0

    @property
    def total(self) -> int:
        return sum(n for _, n in self.stages)

    def say(self, msg: str) -> None:
        if self.main_rank:
            print(msg, file=sys.stderr)


def _device(args, world: int, device: torch.device) -> torch.device:
    if args.device != "auto":
        return torch.device(args.device)
    if world == 1 and torch.cuda.is_available():
        return torch.device("cuda")
    return device


def _open_val(args, num_classes: int, heads=None, arch: str | None = None):
    """The validation set: synthetic scenes of another seed (with the heads and second input of
    ``arch``, as the training scenes), or the first --val-n of a VOC split."""
    if not (args.val_every and args.val_n):
        return None
    if args.data == "synthetic":
        return open_dataset("synthetic", "", n=args.val_n, size=args.size, seed=args.seed + VAL_SEED_OFFSET,
                            num_classes=args.num_classes, heads=_head_names(heads),
                            second=second_input(args, arch), image=_image_input(arch))  # fmt: skip
    if not args.val_split:
        return None
    val = open_dataset(args.data, args.val_split, n=0, size=0, seed=0, num_classes=num_classes,
                       heads=_head_names(heads), second=second_input(args, arch))  # fmt: skip
    return Subset(val, args.val_n) if len(val) > args.val_n else val


def second_input(args, arch: str | None = None) -> tuple[str, Path | None] | None:
    """(modality, folder) of ``--depth`` / ``--hha`` (checked against the nets by the CLI); with
    --data synthetic, (the second input of ``arch``, None): the scenes make it; else None."""
    if args.data == "synthetic":
        from ..config import arch_inputs

        inputs = arch_inputs(arch) if arch else ()
        return (inputs[1], None) if len(inputs) == 2 else None
    given = [(m, Path(d)) for m in ("depth", "hha") if (d := getattr(args, m, None)) is not None]
    return given[0] if given else None


def _image_input(arch: str | None) -> str:
    """The modality of ``arch``'s first input: what the synthetic scenes give as the image ("hha"
    for nyud-fcn32s-hha, which takes HHA images in the image slot; "color" for the others)."""
    from ..config import arch_inputs

    return arch_inputs(arch)[0] if arch else "color"


def _head_names(heads) -> tuple[str, ...] | None:
    return tuple(n for n, _ in heads) if heads else None


def _classes(args, ds, arch: str) -> tuple[int, list[str] | None]:
    """(num_classes, class names) to train: the dataset's. A net with several heads counts every
    head's classes (SIFT Flow 33 + 3): a VOC-layout folder's ``class_names.txt`` lists them all in
    head order; without one, the arch's own (the VOC class list does not apply)."""
    from ..models import DEFAULT_CLASSES
    from ..models.multihead import output_heads

    base = getattr(ds, "ds", ds)  # a Paired dataset's images and labels
    if output_heads({"arch": arch, "num_classes": DEFAULT_CLASSES[arch]}) and args.data != "synthetic" \
            and not (base.root / "class_names.txt").is_file():  # fmt: skip
        return DEFAULT_CLASSES[arch], None
    return getattr(ds, "num_classes", args.num_classes), list(getattr(ds, "class_names", [])) or None


def _heads(arch: str, num_classes: int):
    """The heads of ``arch`` at ``num_classes`` in all; InputError when the last head takes them all."""
    from ..models.multihead import GEOMETRIC_CLASSES, output_heads

    heads = output_heads({"arch": arch, "num_classes": num_classes})
    if heads and num_classes <= GEOMETRIC_CLASSES:
        raise InputError(
            f"{arch} has {num_classes} classes in all, but its geometric head alone takes "
            f"{GEOMETRIC_CLASSES}: list every head's classes in the data's class_names.txt "
            "(semantic, then geometric)"
        )
    return heads


def setup(args: argparse.Namespace) -> Run:
    """Processes, device, data and resume state, all checked before anything is written."""
    rank, world, device = _dist_setup()
    device = _device(args, world, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch % world:
        raise InputError(f"--batch {args.batch} must be divisible by the number of processes ({world})")
    from ..models import DEFAULT_CLASSES
    from ..models.multihead import output_heads

    stages = parse_stages(args.stages, args.arch, args.iters)
    arch = stages[0][0]
    heads = output_heads({"arch": arch, "num_classes": DEFAULT_CLASSES[arch]})
    second = second_input(args, arch)
    ds = open_dataset(args.data, args.split, n=args.train_n, size=args.size, seed=args.seed,
                      num_classes=args.num_classes, heads=_head_names(heads), second=second,
                      image=_image_input(arch))  # fmt: skip
    num_classes, class_names = _classes(args, ds, arch)
    heads = _heads(arch, num_classes)
    out = Path(args.out)
    state = load_state(out) if args.resume else None
    val = _open_val(args, num_classes, heads, arch)
    run = Run(args, rank, world, device, out, stages, ds, val, num_classes, class_names,
              step=int(state["step"]) if state else 0, state=state, heads=heads,
              history=state["history"] if state else new_history(heads))  # fmt: skip
    if state:
        run.last = resume_point(run)
    if run.main_rank:
        # Only now, with the arguments, the data and the resume state checked, is anything written.
        out.mkdir(parents=True, exist_ok=True)
    what = f"{num_classes} classes" + (f": {', '.join(f'{n} {c}' for n, c in heads)}" if heads else "")
    with_second = f" with {second[0]} from {second[1] or 'the scenes'}" if second else ""
    run.say(f"training {' -> '.join(f'{a} ({n} it)' for a, n in run.stages)} on {args.data}{with_second} "
            f"({len(ds)} images, {what}), {world} process(es), device {device}")  # fmt: skip
    return run


def resume_point(run: Run) -> nn.Module:
    """The model of the resume point in ``run.out``, after checking that it is the one this run
    would build where the run stopped: stage and step, arch, classes, width, learnable
    upsampling, BatchNorm and optimizer as it was trained; one InputError listing what differs
    (loading its weights or optimizer state into another net fails deep inside torch, or, where
    the shapes happen to fit, continues another run)."""
    import fastfcn
    from fastfcn.checkpoint.classifier import TORCHVISION_PREPROCESSING

    args, state = run.args, run.state
    last = fastfcn.load(run.out / "last.safetensors")
    cfg = last.config
    trained = (cfg.get("meta") or {}).get("trained", {})
    step, stage = int(state["step"]), int(state["stage"])
    firsts = [sum(n for _, n in run.stages[:i]) for i in range(len(run.stages))]
    now = next((i for i, f in enumerate(firsts) if f < step <= f + run.stages[i][1]), None)
    saved = {"stage": (stage + 1, None if now is None else now + 1),
             "--arch": (cfg["arch"], run.stages[now][0] if now is not None else None),
             "classes": (cfg["num_classes"], run.num_classes), "--width": (cfg["width"], args.width),
             "--learnable-upsampling": (bool((cfg.get("options") or {}).get("learnable_upsampling")),
                                        bool(args.learnable_upsampling)),
             "--batchnorm": ("model" in state, bool(args.batchnorm)),
             "--optimizer": (trained.get("optimizer", args.optimizer), args.optimizer)}  # fmt: skip
    shown = lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # noqa: E731
    differ = [f"{k} {shown(a)} (now {shown(b)})" for k, (a, b) in saved.items() if a != b]
    if differ:
        raise InputError(
            f"--resume: the run in {run.out} stopped at step {step} with {', '.join(differ)}; resume it "
            "with the options (--arch, --stages, --iters, --width, data) it was started with, or train "
            "afresh in another --out"
        )
    run.preprocessing = {k: getattr(cfg, k) for k in TORCHVISION_PREPROCESSING}
    return last


def build_model(run: Run, si: int, arch: str, prev_state: dict | None) -> nn.Module:
    """Stage ``si``'s model: fresh weights, then the resume point, the previous stage or --init."""
    import fastfcn
    from fastfcn import models
    from fastfcn.checkpoint import is_classifier_file

    args = run.args
    options = {"dropout": args.dropout}
    if args.learnable_upsampling:
        options["learnable_upsampling"] = True
    model = models.build(arch, num_classes=run.num_classes, width=args.width, **options)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    init_weights(model)
    if run.class_names:
        model.config = model.config.replace(class_names=tuple(run.class_names))
    resumed = _resumes(run, si)
    if resumed:
        model.load_state_dict(run.last.state_dict())
    elif prev_state is not None:
        copied = copy_by_name(model, prev_state)
        run.say(f"stage {si + 1}: {arch} initialised from the previous stage ({len(copied)} tensors)")
    elif args.init and is_classifier_file(args.init):
        report = fastfcn.init_from_classifier(model, args.init)
        run.preprocessing = {k: getattr(model.config, k) for k in report.preprocessing}
        run.say(f"{arch} initialised from the ImageNet classifier {args.init} "
                f"({report.source}): {report.summary()}")  # fmt: skip
    elif args.init:
        src = fastfcn.load(args.init)
        if src.config["width"] != args.width:
            # Every convolution would differ in shape: only a few class-sized tensors would be
            # copied and the run would start from scratch under an "initialised" line.
            raise InputError(
                f"--init {args.init} is a net of width {src.config['width']}, this run trains width "
                f"{args.width}: its layers do not fit; expected a checkpoint of --width {args.width}"
            )
        copied = copy_by_name(model, src.state_dict())
        run.say(f"{arch} initialised from {args.init} ({len(copied)} tensors by name)")
    if run.preprocessing:
        model.config = model.config.replace(**run.preprocessing)
    if args.batchnorm:
        add_batchnorm(model)
        if resumed and "model" in run.state:
            model.load_state_dict(run.state["model"])
    return model.to(run.device).train()


def _resumes(run: Run, si: int) -> bool:
    return run.state is not None and int(run.state["stage"]) == si


def make_optimizer(run: Run, model: nn.Module, si: int):
    """SGD or Adam over the trainable parameters; on a resume, its state and the torch RNG back."""
    args = run.args
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if _resumes(run, si):
        opt.load_state_dict(run.state["optimizer"])
        torch.set_rng_state(run.state["torch_rng"])
        cuda_rng = run.state.get("cuda_rng")  # a run on a GPU: its dropout masks continue too
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
    return opt


def _lr(args, i: int, n: int) -> float:
    if args.schedule == "poly":
        return args.lr * (1 - i / n) ** 0.9
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * i / n))
    return args.lr


def training_batch(run: Run, pre: Preprocessor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The net's input and labels of this rank's share of the batch of ``step``, augmented:
    x (n, C, H, W) float, y (n, H, W) long, or (n, K, H, W) for K heads."""
    images, labels, second, scale, flips = draw_batch(run.args, run.ds, step, run.rank, run.world,
                                                      _head_names(run.heads))  # fmt: skip
    # The runtime's Preprocessor: training and inference cannot disagree on colour order,
    # scale, mean or std, nor on a second input's (log depth minus its mean, HHA minus its
    # own). For one image input: the same values and (channels_last) strides as the loop's own
    # preprocessing before it, so training results are unchanged. A second input is
    # concatenated to the image's channels here, so augment flips and scales it with the image
    # by construction.
    device = run.device
    x = pre(images.to(device), None if second is None else second.to(device))
    if run.heads:
        labels = labels.permute(0, 3, 1, 2)  # (n, H, W, K) -> (n, K, H, W)
    return augment(x, labels.to(device), scale, flips.to(device))


def train_step(run: Run, net: nn.Module, opt, pre: Preprocessor) -> float:
    """One optimizer step on this rank's share of the global batch of ``run.step``; returns the loss."""
    args = run.args
    x, y = training_batch(run, pre, run.step)
    try:
        loss, parts = segmentation_loss(net(x), y, run.heads, args.loss_reduction)
    except InputError as e:  # labels outside the classes: name the file among thousands
        raise InputError(f"{e}{_bad_labels(run, run.step)}") from None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    run.step += 1
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise InputError(
            f"loss became {lv} at step {run.step}; lower --lr (now {args.lr}) or use mean loss reduction"
        )
    run.history["loss"].append([run.step, lv])
    if run.heads:
        for name, part in parts.items():
            run.history["heads"][name]["loss"].append([run.step, float(part.detach())])
    return lv


def _bad_labels(run: Run, step: int) -> str:
    """``" (in <label file> (item i))"`` of the first item of this rank's batch of ``step`` whose
    labels hold an id outside its classes (255 aside), "" when none does."""
    from ..evaluate import item_name

    for i in batch_items(run.args, run.ds, step, run.rank, run.world):
        target = run.ds[i][1]
        for head, classes in run.heads or ((None, run.num_classes),):
            lab = target[head] if head else target
            if ((lab != IGNORE) & (lab >= classes)).any():
                return f" (in {item_name(run.ds, i, 'labels', head)})"
    return ""


def validate(run: Run, model: nn.Module, loss: float, lr: float, progress: Progress) -> None:
    """Mean IU on the validation set (BatchNorm folded, on the CPU, when training with it)."""
    folded = run.args.batchnorm
    r = evaluate_model(plain_copy(model) if folded else model, run.val, run.num_classes,
                       device=torch.device("cpu") if folded else run.device)  # fmt: skip
    if run.heads:  # one mean IU per head, each over its own classes
        for name, _ in run.heads:
            run.history["heads"][name]["val_mean_iu"].append([run.step, r[name]["mean_iu"]])
        ius = "  ".join(f"{name} {100 * r[name]['mean_iu']:.2f}" for name, _ in run.heads)
        msg = f"step {run.step}: loss {loss:.4f}  val mean IU {ius}  lr {lr:.3g}"
    else:
        run.history["val_mean_iu"].append([run.step, r["mean_iu"]])
        msg = f"step {run.step}: loss {loss:.4f}  val mean IU {100 * r['mean_iu']:.2f}  lr {lr:.3g}"
    print(("\n" if progress.tty else "") + msg, file=sys.stderr, flush=True)


def run_stage(run: Run, si: int, arch: str, first: int, iters: int, prev_state: dict | None) -> nn.Module:
    """Train stage ``si`` (steps ``first`` .. ``first + iters``) from ``run.step``; returns its model."""
    args = run.args
    model = build_model(run, si, arch, prev_state)
    opt = make_optimizer(run, model, si)
    net = model
    if run.world > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    pre = Preprocessor(model.config, run.device)
    progress = Progress(run.total, label=arch, enabled=run.main_rank and not args.quiet)
    progress.start = run.step
    end = first + iters
    while run.step < end:
        lr = _lr(args, run.step - first, iters)
        for g in opt.param_groups:
            g["lr"] = lr
        train_step(run, net, opt, pre)
        sm = smooth([v for _, v in run.history["loss"][-50:]], 50)[-1]
        progress.update(run.step, f"loss {sm:.4f}")
        last = run.step == end
        if run.val is not None and run.main_rank and (run.step % args.val_every == 0 or last):
            validate(run, model, sm, lr, progress)
        if run.main_rank and (run.step % args.save_every == 0 or last):
            save_point(model, run.out, run.step, si, opt, run.history, args, arch)
    if run.world > 1:
        _check_in_sync(model)
    return plain_copy(model) if args.batchnorm else model


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by the ``fastfcn train`` arguments; returns the history."""
    run = setup(args)
    model, prev_state, first, arch = None, None, 0, args.arch
    t_start = time.time()
    for si, (arch, iters) in enumerate(run.stages):
        if run.step < first + iters:
            model = run_stage(run, si, arch, first, iters, prev_state)
            prev_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        elif _resumes(run, si):
            # Finished before a resume, whose point is this stage's end: the next stage starts
            # from its weights, as it would have without the stop.
            prev_state = {k: v.detach().cpu() for k, v in run.last.state_dict().items()}
        first += iters
    if model is None:
        raise InputError(f"nothing to do: {run.out} already holds a run of {run.total} iterations")
    if run.main_rank:
        save_final(model, run.out, run.step, run.history, args, arch)
        final = run.out / "final.safetensors"
        print(f"done: {run.step} iterations in {time.time() - t_start:.0f} s; wrote {final}"
              + (f" and {args.export}" if args.export else ""), file=sys.stderr)  # fmt: skip
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return run.history
