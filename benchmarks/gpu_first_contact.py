"""The stages of benchmarks/gpu_first_contact.sh: ``python gpu_first_contact.py STAGE OUT [--dry-run]``.

Stages, in the order the shell script runs them, each writing its JSON file under OUT after
every case (atomically), so a run killed by its time limit keeps what it measured:

  env          device, driver, versions; measured copy bandwidth and bf16 / fp32 matmul TFLOP/s
  correctness  every Triton kernel compiled vs the reference at full size (1080p batch 8 final
               stage: labels / logits / probs for each weight kind, with the launch-config
               variants' registers and spills; the whole FCN-8s head; upsample_add; pool / unpool
               fp32 and bf16, exact), then the CUDA-graph path of the Segmenter
  headline     FCN-8s 500x500 bf16: fused / torch / compile at batch 1, 8, 32: ms, images/s,
               TFLOP/s, % of the measured bf16 peak; fused without the dead-zone skip at batch 1
               (the skip's ablation: the conv + pool epilogues run with and without it)
  profile      device time per kernel category (convolution, bias, ReLU, pool, layout copies,
               fastfcn kernels, ...) for fused and torch
  summary      one table of everything above (also printed)

--dry-run: tiny sizes on the CPU (Triton's interpreter, TRITON_INTERPRET=1 set by the caller),
so the test suite runs every stage and the script cannot rot.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import math
import os
import re
import shutil
import statistics
import sys
import sysconfig
import threading
import time
import traceback

import torch

STAGES = ("env", "correctness", "headline", "profile", "summary")


class Record:
    """One stage's JSON file under OUT, rewritten (atomically) after every case."""

    def __init__(self, out: str, name: str, **fields):
        self.path = os.path.join(out, f"{name}.json")
        self.data = {"errors": [], **fields}
        self.dump()

    def dump(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def add(self, key: str, item) -> None:
        self.data.setdefault(key, []).append(item)
        self.dump()
        print(json.dumps(item, default=str)[:600], flush=True)

    def error(self, where: str, ex: BaseException) -> None:
        self.add("errors", f"{where}: {type(ex).__name__}: {str(ex)[:400]}\n{traceback.format_exc()[-1500:]}")


def load(out: str, name: str) -> dict:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_missing": repr(e)}


def cuda_here(dry: bool) -> bool:
    return torch.cuda.is_available() and not dry


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def bench(fn, cuda: bool) -> float:
    """Seconds per call: do_bench's median on CUDA; NaN in a dry run (interpreter times mean nothing)."""
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    return float("nan")


def conv_plan(seg) -> dict:
    """The fused CUDA backend's measured choices per layer (cuda_fast.Chooser): {layer: {"choice":
    {input shape: candidate}, "pool": {...} (conv + 2x2 pool), "failed": {candidate: why}}}; the
    CPU backend's plan (Segmenter.plan) in a dry run. Failures are what a first GPU run must see:
    a candidate that raised (cuDNN's refusal, a Triton compile error) falls back silently."""
    model = seg._backend.model
    impls = dict(getattr(model, "_conv_impls", {}))
    impls.update({n: m for n, m in model.named_children() if hasattr(m, "chooser")})  # fc6 (ChosenConv2d)
    plan = {}
    for name, impl in impls.items():
        chooser = getattr(impl, "chooser", None)
        if chooser is None:
            continue
        choosers = [("choice", chooser)] + [("pool", c) for c in getattr(impl, "_pool_choosers", {}).values()]
        entry: dict = {}
        for what, ch in choosers:
            entry.setdefault(what, {}).update({str(k[0]): v for k, v in ch.choice.items()})
            entry.setdefault("failed", {}).update({f"{k[1]} {k[0][0]}": v for k, v in ch.failed.items()})
        plan[name] = {k: v for k, v in entry.items() if v}
    runners = getattr(seg._backend, "dead_zone", None)
    for stream, dz in (runners.items() if isinstance(runners, dict) else [("", runners)]):
        if getattr(dz, "choice", None):  # the skip against whole maps, per input (CUDA)
            plan[f"dead_zone{stream}"] = {
                str(k[0]): {"choice": v, "ms": {w: t * 1e3 for w, t in dz.times.get(k, {}).items()}}
                for k, v in dz.choice.items()
            }
    return plan or {"cpu_plan": [f"{p.get('layer')} {p.get('chosen')}" for p in seg.plan]}


# ------------------------------------------------------------------ env


def stage_env(out: str, dry: bool) -> None:
    import triton

    rec = Record(
        out,
        "env",
        python=sys.version.split()[0],
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        dry_run=dry,
        # Triton builds its launchers (and inductor its wrappers) with a C compiler against
        # Python.h at the first launch: without either every fastfcn kernel fails on the GPU
        c_compiler=os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang"),
        python_h=os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    )
    cuda = cuda_here(dry)
    d = rec.data
    if cuda:
        p = torch.cuda.get_device_properties(0)
        d.update(
            name=p.name,
            sms=p.multi_processor_count,
            mem_gib=round(p.total_memory / 2**30, 1),
            cc=f"{p.major}.{p.minor}",
        )
    else:
        d["name"] = "cpu (dry run)"
    rec.dump()
    dev = "cuda" if cuda else "cpu"
    size, mm = (2 * 2**30, 8192) if cuda else (2**20, 256)
    try:
        x = torch.empty(size, dtype=torch.uint8, device=dev)
        y = torch.empty_like(x)
        d["copy_tbps_read_plus_write"] = 2 * x.numel() / bench(lambda: y.copy_(x), cuda) / 1e12
        x = y = None  # free the 4 GiB before the matmuls
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(mm, mm, device=dev, generator=g).to(torch.bfloat16)  # random: zeros run faster
        b = torch.randn(mm, mm, device=dev, generator=g).to(torch.bfloat16)
        d["bf16_mm_tflops"] = 2 * mm**3 / bench(lambda: a @ b, cuda) / 1e12
        a32, b32 = a.float(), b.float()
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            d["fp32_mm_tflops_no_tf32"] = 2 * mm**3 / bench(lambda: a32 @ b32, cuda) / 1e12
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    except Exception as ex:  # noqa: BLE001 - recorded; the next stages still run
        rec.error("ceilings", ex)
    rec.dump()
    print(json.dumps(d, indent=1, default=str), flush=True)


# ------------------------------------------------------------------ correctness


def _labels_check(out, logits) -> dict:
    """Label mismatches, and those not explained by a top-2 margin within fp32 rounding."""
    want = logits.argmax(1)
    diff = out.long() != want
    top2 = logits.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    tie = margin <= 1e-5 * float(logits.abs().max())
    return {
        "label_mismatch_frac": float(diff.float().mean()),
        "mismatch_beyond_ties": int((diff & ~tie).sum()),
    }


def _covering(size, k, s, off):
    return math.ceil((off + size - k) / s) + 1


def _final_stage(rec: Record, dev: str, cuda: bool, dry: bool) -> None:
    from fastfcn import ops
    from fastfcn.kernels import reference as ref
    from fastfcn.kernels import structure as st
    from fastfcn.kernels import upsample as up

    n, c, (H, W) = (8, 21, (1080, 1920)) if not dry else (1, 3, (20, 28))
    k, s, off = 16, 8, 31
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, c, _covering(H, k, s, off), _covering(W, k, s, off), device=dev, generator=g)
    for kind in ("bilinear", "depthwise", "dense"):
        try:
            w = st.bilinear_weight(c, k).to(dev)
            if kind == "depthwise":
                w = torch.zeros_like(w)
                w[torch.arange(c), torch.arange(c)] = torch.rand(c, k, k, device=dev, generator=g)
            elif kind == "dense":
                w = torch.randn(c, c, k, k, device=dev, generator=g) / c
            assert ops.weight_kind(w) == kind
            logits = ref.upsample_crop(x, w, s, off, (H, W))  # fp32 cuDNN, TF32 off
            lab = ops.upsample_crop(x, w, s, off, (H, W), "labels", impl="triton")
            chk = _labels_check(lab, logits)
            lg = ops.upsample_crop(x, w, s, off, (H, W), "logits", impl="triton")
            chk["logits_max_err_over_max"] = float((lg - logits).abs().max() / logits.abs().max())
            del lg
            pr = ops.upsample_crop(x[:1], w, s, off, (H, W), "probs", impl="triton")
            chk["probs_max_abs_err"] = float((pr - torch.softmax(logits[:1], 1)).abs().max())
            del pr, logits
            chk["expect"] = "logits err <= 1e-5, probs err <= 1e-5, no mismatch beyond ties"
            t_tri = bench(lambda w=w: ops.upsample_crop(x, w, s, off, (H, W), "labels", impl="triton"), cuda)
            t_ref = bench(lambda w=w: ref.upsample_crop(x, w, s, off, (H, W), "labels"), cuda)
            nb = x.numel() * 4 + lab.numel()
            rec.add(
                "kernels",
                {
                    "name": f"final_stage_{kind}_b{n}_{H}x{W}",
                    "ms": t_tri * 1e3,
                    "gbps": nb / t_tri / 1e9,
                    "torch_ms": t_ref * 1e3,
                    **chk,
                },
            )
            _variants(rec, up, x, w, kind, lab, (H, W), (k, s, off), cuda)
            free(cuda)
        except Exception as ex:  # noqa: BLE001
            rec.error(f"final stage {kind}", ex)


def _launch_variant(up, x, wk, out, output, kind, size, geom, cfg):
    """One launch of the head kernel with launch configuration cfg = (BLOCK_P, BLOCK_C, num_warps)."""
    import triton

    (H, W), (k, s, off), (bp, bc, nw) = size, geom, cfg
    factor = (k + 1) // 2
    center = factor - 1.0 if k % 2 == 1 else factor - 0.5
    grid = (triton.cdiv(H * W, bp), x.shape[0], 1)
    args = (x, wk, x, out, x.shape[1], x.shape[2], x.shape[3], H, W, off, 0, 0, 0, 1.0)
    consts = {
        "K": k,
        "S": s,
        "T": triton.cdiv(k, s),
        "KIND": up.KIND_CODES[kind],
        "OUTPUT": up.output_code(output, x.shape[1]),
    }
    return up.upsample_kernel[grid](
        *args,
        **consts,
        HAS_SKIP=False,
        CENTER=center,
        FACTOR=float(factor),
        BLOCK_P=bp,
        BLOCK_C=bc,
        num_warps=nw,
    )


def _variants(rec, up, x, w, kind, lab, size, geom, cuda) -> None:
    """The labels / probs kernel under other launch configurations: registers, spills, time, equality."""
    (H, W), c = size, x.shape[1]
    if kind == "bilinear":
        wk = x
    elif kind == "depthwise":
        wk = torch.diagonal(w, dim1=0, dim2=1).permute(2, 0, 1).float().contiguous()
    else:
        wk = w.float().contiguous()
    # the chosen config, its neighbours, and the old tiles (128 x 8, 256 x 32) that spilled;
    # probs (the worst spiller) with the chosen and the old tiles only: each config is a compile
    old = [(128, 8, 4), (256, 32, 4)]
    configs = [up.CUDA_LAUNCH[kind], (512, 1, 4), (128, 1, 4), (256, 1, 8), *old]
    configs = list(dict.fromkeys(configs)) if cuda else [up.CUDA_LAUNCH[kind], (256, 32, 4)]
    for output in ("labels", "probs"):
        if output == "probs":
            configs = [up.CUDA_LAUNCH[kind], *old] if cuda else configs
        xx = x if output == "labels" else x[:1].contiguous()
        for cfg in configs:
            out = torch.empty_like(lab) if output == "labels" else torch.empty(1, c, H, W, device=x.device)
            launch = functools.partial(
                _launch_variant, up, xx, xx if kind == "bilinear" else wk, out, output, kind, size, geom, cfg
            )
            try:
                kobj = launch()
                item = {
                    "name": f"variant_{kind}_{output}_P{cfg[0]}_C{cfg[1]}_w{cfg[2]}",
                    "chosen": cfg == up.CUDA_LAUNCH[kind],
                    "n_regs": getattr(kobj, "n_regs", None),
                    "n_spills": getattr(kobj, "n_spills", None),
                }
                if output == "labels":
                    item["equals_chosen"] = bool(torch.equal(out, lab))
                item["ms"] = bench(launch, cuda) * 1e3
                rec.add("kernels", item)
            except Exception as ex:  # noqa: BLE001
                rec.error(f"variant {kind} {output} {cfg}", ex)


def _head_add_pool(rec: Record, dev: str, cuda: bool, dry: bool) -> None:
    import torch.nn.functional as F

    from fastfcn import ops
    from fastfcn.kernels import reference as ref
    from fastfcn.kernels import structure as st

    n, c, (H, W) = (8, 21, (1080, 1920)) if not dry else (1, 3, (20, 28))
    g = torch.Generator(device=dev).manual_seed(1)
    try:  # the whole FCN-8s head, reference geometry (score at 1/32 -> labels)
        h5 = w5 = 1
        while ((h5 - 1) * 2 + 3) * 2 * 8 + 16 < 31 + H:
            h5 += 1
        while ((w5 - 1) * 2 + 3) * 2 * 8 + 16 < 31 + W:
            w5 += 1
        (h4, w4), (h3, w3) = ((h5 - 1) * 2 + 4, (w5 - 1) * 2 + 4), ((h5 - 1) * 4 + 10, (w5 - 1) * 4 + 10)
        score = torch.randn(n, c, h5, w5, device=dev, generator=g)
        skips = [
            torch.randn(n, c, h4 + 10, w4 + 10, device=dev, generator=g),
            torch.randn(n, c, h3 + 18, w3 + 18, device=dev, generator=g),
        ]
        w2, w8 = st.bilinear_weight(c, 4).to(dev), st.bilinear_weight(c, 16).to(dev)
        args = (score, skips, [w2, w2, w8], [2, 2, 8], [5, 9, 31], [1.0, 1.0], (H, W))
        logits = ref.fcn_head(*args, "logits")
        lab = ops.fcn_head(*args, "labels", impl="triton")
        chk = _labels_check(lab, logits)
        del logits
        t_tri = bench(lambda: ops.fcn_head(*args, "labels", impl="triton"), cuda)
        t_ref = bench(lambda: ref.fcn_head(*args, "labels"), cuda)
        rec.add(
            "kernels",
            {"name": f"fcn8s_head_labels_b{n}_{H}x{W}", "ms": t_tri * 1e3, "torch_ms": t_ref * 1e3, **chk},
        )
        xa = torch.randn(n, c, h4, w4, device=dev, generator=g)
        sk = skips[1]
        want = ref.upsample_add(xa, w2, 2, sk, 9, 1.0)
        got = ops.upsample_add(xa, w2, 2, sk, 9, 1.0, impl="triton")
        t_tri = bench(lambda: ops.upsample_add(xa, w2, 2, sk, 9, 1.0, impl="triton"), cuda)
        rec.add(
            "kernels",
            {
                "name": f"upsample_add_b{n}",
                "ms": t_tri * 1e3,
                "max_err_over_max": float((got - want).abs().max() / want.abs().max()),
            },
        )
        score = skips = xa = sk = want = got = None
        free(cuda)
    except Exception as ex:  # noqa: BLE001
        rec.error("head / upsample_add", ex)
    for dt in (torch.float32, torch.bfloat16):  # DeconvNet pool1 / unpool1: exact
        try:
            shape = (8, 64, 224, 224) if not dry else (1, 4, 13, 14)
            xp = torch.randn(shape, device=dev, generator=g).to(dt)
            v, sw = ops.max_pool2d_with_switches(xp, impl="triton")
            vr, ir = F.max_pool2d(xp, 2, 2, ceil_mode=True, return_indices=True)
            exact = bool(torch.equal(v, vr)) and bool(torch.equal(sw, ref.max_pool2d_with_switches(xp)[1]))
            t = bench(lambda xp=xp: ops.max_pool2d_with_switches(xp, impl="triton"), cuda)
            t_ref = bench(lambda xp=xp: F.max_pool2d(xp, 2, 2, ceil_mode=True, return_indices=True), cuda)
            name = str(dt).split(".")[-1]
            rec.add(
                "kernels",
                {"name": f"maxpool_switches_{name}", "ms": t * 1e3, "torch_ms": t_ref * 1e3, "exact": exact},
            )
            size = tuple(xp.shape[-2:])
            want = F.max_unpool2d(torch.relu(vr), ir, 2, 2, output_size=size)
            for iname, idx in (("uint8", sw), ("int64", ir)):
                got = ops.max_unpool2d(vr, idx, size, relu=True, impl="triton")
                t = bench(
                    lambda idx=idx, vr=vr, size=size: ops.max_unpool2d(
                        vr, idx, size, relu=True, impl="triton"
                    ),
                    cuda,
                )
                rec.add(
                    "kernels",
                    {
                        "name": f"unpool_relu_{iname}_{name}",
                        "ms": t * 1e3,
                        "exact": bool(torch.equal(got, want)),
                    },
                )
            free(cuda)
        except Exception as ex:  # noqa: BLE001
            rec.error(f"pool/unpool {dt}", ex)


def _backbone_pool_copy(rec: Record, dev: str, cuda: bool, dry: bool) -> None:
    """The fused backbone's two data movers against torch's, on FCN-8s 500x500's largest map
    (conv1_2's output under the skip, 64 x 506^2, batch 8): the Triton pool after a conv
    (kernels/pool.py, exact) and the dead-zone skip's window paste (deadzone._paste: channels
    as 8-byte words) against copy_, each with its bytes over the measured time."""
    import torch.nn.functional as F

    from fastfcn.kernels import pool
    from fastfcn.runtime.deadzone import _paste

    n, c, hw = (8, 64, 506) if not dry else (1, 8, 11)
    g = torch.Generator(device=dev).manual_seed(7)
    for dt in (torch.bfloat16, torch.float32):
        name = str(dt).split(".")[-1]
        try:
            x = torch.randn(n, c, hw, hw, device=dev, generator=g).to(dt)
            x = x.contiguous(memory_format=torch.channels_last)
            got, want = pool.max_pool2d(x, 2, 2), F.max_pool2d(x, 2, 2, ceil_mode=True)
            t = bench(lambda x=x: pool.max_pool2d(x, 2, 2), cuda)
            t_ref = bench(lambda x=x: F.max_pool2d(x, 2, 2, ceil_mode=True), cuda)
            moved = (x.numel() + got.numel()) * x.element_size()
            rec.add("kernels", {
                "name": f"maxpool_nhwc_{name}_b{n}_c{c}_{hw}", "ms": t * 1e3, "torch_ms": t_ref * 1e3,
                "exact": bool(torch.equal(got, want)), "tbps": moved / t / 1e12 if t == t else None,
            })  # fmt: skip
            buf = torch.empty(n, c, hw + 3, hw + 3, device=dev, dtype=dt).contiguous(
                memory_format=torch.channels_last
            )
            win = buf[:, :, 1 : hw + 1, 2 : hw + 2]
            _paste(win, x)
            same = bool(torch.equal(win, x))
            t = bench(lambda win=win, x=x: _paste(win, x), cuda)
            t_ref = bench(lambda win=win, x=x: win.copy_(x), cuda)
            moved = 2 * x.numel() * x.element_size()
            rec.add("kernels", {
                "name": f"window_paste_{name}_b{n}_c{c}_{hw}", "ms": t * 1e3, "copy_ms": t_ref * 1e3,
                "exact": same, "tbps": moved / t / 1e12 if t == t else None,
            })  # fmt: skip
            x = got = want = buf = win = None
            free(cuda)
        except Exception as ex:  # noqa: BLE001
            rec.error(f"backbone pool / paste {dt}", ex)


def _graph_path(rec: Record, dev: str, dry: bool) -> None:
    """The Segmenter's CUDA-graph path at full size (on the CPU in a dry run: the same calls)."""
    import fastfcn

    H = W = 500 if not dry else 40
    width = 1.0 if not dry else 0.0625
    model = fastfcn.models.build("fcn8s", 21, width).eval()
    gen = torch.Generator().manual_seed(3)
    imgs = [torch.randint(0, 256, (1, H, W, 3), generator=gen, dtype=torch.uint8) for _ in range(2)]
    x1, x2 = (t.to(dev) for t in imgs)
    c = rec.data.setdefault("graph_checks", {})
    try:
        ref = fastfcn.Segmenter(copy.deepcopy(model), backend="torch", precision="fp32", device=dev)
        ref_logits, ref_labels = ref.run(x1, "logits"), ref.run(x1)
        del ref
        s = fastfcn.Segmenter(copy.deepcopy(model), backend="fused", precision="bf16", device=dev)
        a1, b1, a2 = s.run(x1).clone(), s.run(x2).clone(), s.run(x1).clone()
        host = s.run(imgs[0]).clone()  # host uint8 -> pinned staging
        lg = s.run(x1, "logits")
        c["fused_bf16_vs_torch_fp32"] = {
            "logit_err_over_range": float(
                (lg.cpu() - ref_logits.cpu()).abs().max() / (ref_logits.max() - ref_logits.min()).cpu()
            ),
            "label_agreement": float((a1.cpu() == ref_labels.cpu()).float().mean()),
            "expect": "err <= 0.03, agreement >= 0.98 (untrained weights: flat logits)",
        }
        c["replay_bitwise_repeatable"] = bool(torch.equal(a1, a2))
        c["sensitive_to_input"] = not bool(torch.equal(a1, b1))
        c["pinned_host_input_equals_device_input"] = bool(torch.equal(a1.cpu(), host.cpu()))
        c["graphs_cached"] = len(s._cuda.graphs) if getattr(s, "_cuda", None) is not None else 0
        rec.data["fused_bf16_conv_plan"] = conv_plan(s)
        rec.dump()
        outs: dict = {}

        def worker(i):
            xx = x1 if i % 2 == 0 else x2
            outs[i] = [s.run(xx).cpu() for _ in range(3)]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c["threads_4x3_consistent"] = len(outs) == 4 and all(
            torch.equal(o, (a1 if i % 2 == 0 else b1).cpu()) for i, v in outs.items() for o in v
        )
        rec.dump()
        ng = fastfcn.Segmenter(
            copy.deepcopy(model), backend="fused", precision="bf16", device=dev, graph_cache=0
        )
        lg0 = ng.run(x1, "logits")
        c["graph_vs_no_graph"] = {
            "logit_max_abs_diff": float((lg0 - lg).abs().max()),
            "label_agreement": float((ng.run(x1).cpu() == a1.cpu()).float().mean()),
            "expect": "equal up to cuDNN's per-instance algorithm choice (agreement >= 0.999)",
        }
        rec.dump()
        s = ng = None
    except Exception as ex:  # noqa: BLE001
        rec.error("graph path", ex)


def _conv_case(rec, ce, cuda_fast, name, shape, pool, dt, dev, g, cuda) -> None:
    import torch.nn.functional as F

    n, c, co, h, w, k, pad = shape
    x = torch.randn(n, c, h, w, device=dev, generator=g).to(dt).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(co, c, k, k, device=dev, generator=g) / (c * k * k) ** 0.5).to(dt)
    b = torch.randn(co, device=dev, generator=g)
    tri = functools.partial(ce.conv_bias_relu, x, ce.pack_weight(wt), b, (k, k), (pad, pad), 1, 1, pool)

    def eager():
        y = F.relu(F.conv2d(x, wt, b.to(x.dtype), padding=pad), inplace=True)
        return F.max_pool2d(y, 2, 2, ceil_mode=True) if pool else y

    got, want = tri(), eager()
    # fp32 reference of the same (rounded) inputs, TF32 off (set by the stage)
    ref = F.relu(F.conv2d(x.float(), wt.float(), b, padding=pad))
    ref = F.max_pool2d(ref, 2, 2, ceil_mode=True) if pool else ref
    scale = float(ref.abs().max())
    item = {
        "name": f"triton_conv_{name}",
        "ms": bench(tri, cuda) * 1e3,
        "torch_ms": bench(eager, cuda) * 1e3,
        "err_over_max": float((got.float() - ref).abs().max()) / scale,
        "torch_err_over_max": float((want.float() - ref).abs().max()) / scale,
    }
    fused = cuda_fast.cudnn_relu_conv(torch.nn.Conv2d(c, co, k, padding=pad).to(dev, dt))
    if fused is not None and cuda:
        try:
            item["cudnn_relu_ms"] = bench(lambda: fused(x, (pad, pad)), cuda) * 1e3
        except Exception as ex:  # noqa: BLE001 - recorded with the case's other numbers
            item["cudnn_relu_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
    rec.add("kernels", item)


def _conv_epilogue(rec: Record, dev: str, cuda: bool, dry: bool) -> None:
    """The Triton conv with its epilogue vs torch (conv + bias + ReLU (+ pool)) and cuDNN's fused
    op, at FCN-8s 500x500 layer shapes; fc6 as a GEMM vs the conv."""
    from fastfcn.kernels import conv_epilogue as ce
    from fastfcn.runtime import cuda_fast

    # (name, N, C_in, C_out, H, W, k, pad, pool)
    cases = [
        ("conv1_2_pool", 1, 64, 64, 698, 698, 3, 1, True),
        ("conv3_3", 8, 256, 256, 175, 175, 3, 1, False),
        ("conv5_3_pool", 8, 512, 512, 44, 44, 3, 1, True),
    ]
    if dry:
        cases = [("conv_pool", 1, 16, 16, 9, 11, 3, 1, True), ("conv", 2, 16, 32, 8, 8, 3, 1, False)]
    g = torch.Generator(device=dev).manual_seed(2)
    for name, n, c, co, h, w, k, pad, pool in cases:
        try:
            # fp32 on the GPU: not a runtime candidate (cuda_fast.triton_conv), 10-45 s of ptxas
            for dt in (torch.float32, torch.bfloat16) if dry else (torch.bfloat16,):
                label = f"{name}_{str(dt).split('.')[-1]}_b{n}"
                _conv_case(rec, ce, cuda_fast, label, (n, c, co, h, w, k, pad), pool, dt, dev, g, cuda)
                free(cuda)
        except Exception as ex:  # noqa: BLE001
            rec.error(f"triton conv {name}", ex)
    try:  # registers and spills of every specialisation compiled so far (none in the interpreter)
        for cache in getattr(ce.conv_bias_relu_kernel, "device_caches", {}).values():
            for key, kern in cache[0].items():
                rec.add("triton_conv_compiled", {
                    "n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                    "shared": getattr(getattr(kern, "metadata", None), "shared", None), "key": str(key)[:300],
                })  # fmt: skip
    except Exception as ex:  # noqa: BLE001
        rec.error("triton conv registers", ex)
    try:  # fc6: 7x7, 512 -> 4096 on 22x22 (16x16 out): GEMM (cuBLAS's / explicit split-K) vs cuDNN's conv
        c, co, hw = (512, 4096, 22) if not dry else (16, 32, 9)
        conv = torch.nn.Conv2d(c, co, 7).to(dev, torch.bfloat16).requires_grad_(False)
        for n in (1, 8) if not dry else (1,):
            x = torch.randn(n, c, hw, hw, device=dev, generator=g).bfloat16()
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                want = conv(x).float()
                item = {"name": f"fc6_gemm_vs_conv_b{n}", "conv_ms": bench(lambda x=x: conv(x), cuda) * 1e3}
                for split in (1, *cuda_fast.SPLITS):
                    gemm = cuda_fast.gemm_conv(conv, relu=False, split=split)
                    got = gemm(x, (0, 0)).float()
                    item[f"split{split}_err_over_max"] = float((got - want).abs().max() / want.abs().max())
                    item[f"split{split}_ms"] = bench(lambda x=x, gemm=gemm: gemm(x, (0, 0)), cuda) * 1e3
            item["ms"] = item["split1_ms"]
            rec.add("kernels", item)
    except Exception as ex:  # noqa: BLE001
        rec.error("fc6 gemm", ex)


def stage_correctness(out: str, dry: bool) -> None:
    cuda = cuda_here(dry)
    dev = "cuda" if cuda else "cpu"
    # fp32 references without TF32 (the kernels compute in fp32 FMA)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rec = Record(out, "correctness", device=dev, dry_run=dry)
    _final_stage(rec, dev, cuda, dry)
    _head_add_pool(rec, dev, cuda, dry)
    _backbone_pool_copy(rec, dev, cuda, dry)
    _graph_path(rec, dev, dry)
    _conv_epilogue(rec, dev, cuda, dry)  # section-3 candidates: measured here, chosen at run time


# ------------------------------------------------------------------ headline


def stage_headline(out: str, dry: bool, budget_s: float) -> None:
    import fastfcn
    from fastfcn.flops import count_macs

    start = time.time()
    cuda = cuda_here(dry)
    dev = "cuda" if cuda else "cpu"
    H = W = 500 if not dry else 48
    width = 1.0 if not dry else 0.0625
    batches = (1, 8, 32) if not dry else (1, 2)
    env = load(out, "env")
    peak = env.get("bf16_mm_tflops") or 790.0
    model = fastfcn.models.build("fcn8s", 21, width).eval()
    macs = count_macs(model, (1, 3, H, W))
    gmac = macs.macs / 1e9  # tflops below: nominal work per second (fused computes computed_gmac)
    rec = Record(
        out,
        "headline",
        arch="fcn8s",
        width=width,
        size=[H, W],
        precision="bf16",
        device=env.get("name", dev),
        gmac_per_image=gmac,
        # on CUDA each conv before a 2x2 pool computes the pool's whole window (its epilogue)
        computed_gmac_per_image_fused=count_macs(model, (1, 3, H, W), conv_pool=cuda).computed_macs / 1e9,
        peak_tflops_measured=peak,
        input="uint8 NHWC on the device",
        cases=[],
    )

    def measure(backend: str, n: int) -> None:
        # "fused-whole": the fused backend without the dead-zone skip (the ablation): every conv
        # on the whole map, the conv + pool epilogues (cuda_fast) included, as the skip runs
        # them on the windows its plan aligns to each 2x2 pool
        case = {"backend": backend, "batch": n}
        options = {}
        if backend == "fused-whole":
            backend, options = "fused", {"skip_dead_zone": False}
        t0 = time.time()
        try:
            seg = fastfcn.Segmenter(copy.deepcopy(model), backend=backend, precision="bf16", device=dev,
                                    **options)  # fmt: skip
            g = torch.Generator().manual_seed(10 + n)
            xs = [
                torch.randint(0, 256, (n, H, W, 3), generator=g, dtype=torch.uint8).to(dev) for _ in range(2)
            ]
            for i in range(3):  # capture / compile / autotune
                seg.run(xs[i % 2])
            sync(cuda)
            case["setup_s"] = round(time.time() - t0, 1)
            if backend == "fused":  # skip or whole maps, measured per input (CUDA)
                dz = conv_plan(seg).get("dead_zone")
                if dz:
                    case["dead_zone"] = dz
            lat = []
            for i in range(15 if not dry else 2):
                t1 = time.perf_counter()
                seg.run(xs[i % 2])
                sync(cuda)
                lat.append(time.perf_counter() - t1)
            k = 20 if not dry else 2
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for i in range(k):
                    seg.run(xs[i % 2])
                e1.record()
                e1.synchronize()
                thr = e0.elapsed_time(e1) / 1e3 / k
            else:
                t1 = time.perf_counter()
                for i in range(k):
                    seg.run(xs[i % 2])
                thr = (time.perf_counter() - t1) / k
            case.update(
                latency_ms_median=statistics.median(lat) * 1e3,
                ms_per_batch=thr * 1e3,
                ms_per_image=thr * 1e3 / n,
                images_per_s=n / thr,
                tflops=2 * gmac * n / thr / 1e3,
            )
            case["pct_of_measured_peak"] = 100 * case["tflops"] / peak
            if cuda:
                case["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                torch.cuda.reset_peak_memory_stats()
            if backend == "compile":
                seg._backend.close()
            del seg, xs
        except Exception as ex:  # noqa: BLE001
            case["error"] = f"{type(ex).__name__}: {str(ex)[:400]}"
        case["wall_s"] = round(time.time() - t0, 1)
        free(cuda)
        rec.add("cases", case)

    def compile_case(n: int) -> None:
        left = budget_s - (time.time() - start)
        if (dry and os.environ.get("FC_DRY_COMPILE") != "1") or left < 45:
            rec.add("cases", {"backend": "compile", "batch": n, "skipped": f"{left:.0f} s left (or dry run)"})
        else:
            measure("compile", n)

    # fused first, then torch (seconds each: the baseline is never left to a cap), then compile
    # at batch 1, the comparison that matters most, fused without the dead-zone skip, then
    # compile at the larger batches (~30-60 s of inductor per shape on a first run, which the
    # stage's cap may cut; the inductor cache under .fc_cache makes a rerun on the same machine
    # quick)
    for backend in ("fused", "torch"):
        for n in batches:
            measure(backend, n)
    compile_case(batches[0])
    measure("fused-whole", batches[0])  # seconds: what the skip is worth (both run the pool epilogue)
    for n in batches[1:]:
        compile_case(n)
    if len(batches) > 1:  # the skip against whole maps at a larger batch too (its copies scale with it)
        measure("fused-whole", batches[1])
    rec.data["stage_s"] = round(time.time() - start, 1)
    rec.dump()


# ------------------------------------------------------------------ profile

# (category, regex over CUDA kernel names / CPU op names), first match wins
CATEGORIES = [
    ("fastfcn_kernels", r"upsample_kernel|max_pool_switches|unpool_gather|fastfcn::"),
    ("fastfcn_conv", r"conv_bias_relu_kernel"),  # the Triton conv + bias + ReLU (+ pool), where chosen
    # inductor's generated kernels (bias + ReLU epilogues, pools, copies), named after what they fuse
    ("inductor_fused", r"^triton_"),
    ("layout_copies", r"nchwToNhwc|nhwcToNchw|transpose|copy|contiguous|memcpy|memset|fill"),
    ("pool", r"max_pool|maxpool|pool"),
    ("convolution", r"conv|xmma|gemm|implicit|fprop|cutlass|sm90_|sm80_|cudnn|winograd|fft|\bmm|matmul"),
    ("relu", r"clamp|threshold|relu"),
    ("bias", r"add"),
    ("elementwise_other", r"elementwise|mul|cast|where|argmax|reduce|to_copy|sub|div"),
]


def categorize(name: str) -> str:
    return next((cat for cat, rx in CATEGORIES if re.search(rx, name, re.I)), "other")


def stage_profile(out: str, dry: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    import fastfcn

    cuda = cuda_here(dry)
    dev = "cuda" if cuda else "cpu"
    H = W = 500 if not dry else 48
    model = fastfcn.models.build("fcn8s", 21, 1.0 if not dry else 0.0625).eval()
    rec = Record(
        out,
        "profile",
        size=[H, W],
        precision="bf16",
        note="fused runs with graph_cache=0 so each kernel is visible; the graph replays the same kernels",
    )
    for backend, n in (("fused", 1), ("torch", 1)) + ((("fused", 8),) if not dry else ()):
        item = {"backend": backend, "batch": n}
        try:
            kw = {"graph_cache": 0} if backend == "fused" else {}
            seg = fastfcn.Segmenter(copy.deepcopy(model), backend=backend, precision="bf16", device=dev, **kw)
            x = torch.randint(0, 256, (n, H, W, 3), dtype=torch.uint8).to(dev)
            for _ in range(3):
                seg.run(x)
            sync(cuda)
            reps = 3
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(reps):
                    seg.run(x)
                sync(cuda)
            rows = []
            for e in prof.key_averages():
                if cuda:
                    t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                else:
                    t = e.self_cpu_time_total if e.key.startswith(("aten::", "fastfcn::")) else 0
                if t > 0:
                    rows.append((e.key, t / reps / 1e3, e.count // reps))
            cats: dict = {}
            for key, ms, cnt in rows:
                v = cats.setdefault(categorize(key), [0.0, 0])
                v[0] += ms
                v[1] += cnt
            item["total_ms"] = sum(v[0] for v in cats.values())
            item["by_category_ms_count"] = {
                k: [round(v[0], 4), v[1]] for k, v in sorted(cats.items(), key=lambda kv: -kv[1][0])
            }
            item["conv_choices"] = conv_plan(seg)
            item["top_kernels_ms"] = [
                [k[:100], round(ms, 4), cnt] for k, ms, cnt in sorted(rows, key=lambda r: -r[1])[:15]
            ]
            del seg, x
        except Exception as ex:  # noqa: BLE001
            item["error"] = f"{type(ex).__name__}: {str(ex)[:400]}"
        free(cuda)
        rec.add("profiles", item)


# ------------------------------------------------------------------ summary


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def issue_targets(c: dict, h: dict) -> list[str]:
    """The targets this run is judged by (issue 12, H200), each met / missed / not measured:
    fused bf16 FCN-8s 500x500 at batch 1 <= 0.8 ms and >= 1.1x torch.compile; batch 32 >= 1,500
    images/s; the final-stage labels kernel >= 10x the eager composition."""
    rows = {(r["backend"], r["batch"]): r for r in h.get("cases", []) if "ms_per_image" in r}

    def verdict(name: str, value, goal: str, ok) -> str:
        if not _finite(value):
            return f"target {name}: not measured ({goal})"
        return f"target {name}: {value:.3f} ({goal}) {'met' if ok(value) else 'MISSED'}"

    f1, c1, f32 = rows.get(("fused", 1)), rows.get(("compile", 1)), rows.get(("fused", 32))
    lines = [
        verdict("fused b1 ms", f1 and f1["ms_per_batch"], "<= 0.8 ms on an H200", lambda v: v <= 0.8),
        verdict(
            "fused vs compile b1",
            f1 and c1 and c1["ms_per_batch"] / f1["ms_per_batch"],
            ">= 1.1x",
            lambda v: v >= 1.1,
        ),  # fmt: skip
        verdict("fused b32 images/s", f32 and f32["images_per_s"], ">= 1500", lambda v: v >= 1500),
    ]
    for n in (8, 32):
        fn, cn = rows.get(("fused", n)), rows.get(("compile", n))
        if fn and cn:
            lines.append(verdict(f"fused vs compile b{n}", cn["ms_per_batch"] / fn["ms_per_batch"],
                                 "reported", lambda v: True))  # fmt: skip
    for r in c.get("kernels", []):
        if r["name"].startswith("final_stage_"):
            ms, torch_ms = r.get("ms"), r.get("torch_ms")
            ratio = torch_ms / ms if _finite(ms) and _finite(torch_ms) and ms > 0 else None
            lines.append(verdict(f"{r['name']} labels vs eager", ratio, ">= 10x", lambda v: v >= 10))
    return lines


def stage_summary(out: str) -> str:
    e, c, h, p = (load(out, n) for n in ("env", "correctness", "headline", "profile"))
    lines = [
        f"device {e.get('name')} torch {e.get('torch')} triton {e.get('triton')} cudnn {e.get('cudnn')} "
        f"copy {e.get('copy_tbps_read_plus_write') or 0:.2f} TB/s "
        f"bf16 mm {e.get('bf16_mm_tflops') or 0:.1f} TF/s C compiler {e.get('c_compiler')} "
        f"Python.h {e.get('python_h')}"
    ]
    for r in c.get("kernels", []):
        extra = {k: v for k, v in r.items() if k not in ("name", "ms", "expect")}
        lines.append(f"{r['name']:44s} {r.get('ms', float('nan')):8.3f} ms {extra}")
    for r in c.get("triton_conv_compiled", []):
        lines.append(f"triton conv compiled: {r.get('n_regs')} registers, {r.get('n_spills')} spills")
    for k, v in (c.get("graph_checks") or {}).items():
        lines.append(f"check {k}: {v}")
    for layer, v in (c.get("fused_bf16_conv_plan") or {}).items():
        if isinstance(v, dict):
            lines.append(
                f"conv {layer}: {sorted(set(v.get('choice', {}).values()))} "
                f"pool {sorted(set(v.get('pool', {}).values()))} failed {v.get('failed', {})}"
            )
    lines.append(
        f"{'backend':8s} {'N':>3s} {'ms/batch':>9s} {'ms/img':>7s} {'img/s':>8s} {'TF/s':>7s} "
        f"{'%peak':>6s} setup_s"
    )
    for r in h.get("cases", []):
        if "ms_per_image" in r:
            lines.append(
                f"{r['backend']:8s} {r['batch']:3d} {r['ms_per_batch']:9.3f} {r['ms_per_image']:7.3f} "
                f"{r['images_per_s']:8.1f} {r['tflops']:7.2f} {r['pct_of_measured_peak']:6.1f} {r['setup_s']}"
                + (f" dead zone {r['dead_zone']}" if r.get("dead_zone") else "")
            )
        else:
            lines.append(f"{r['backend']:8s} {r['batch']:3d} {r.get('error') or r.get('skipped')}")
    for r in p.get("profiles", []):
        lines.append(
            f"profile {r['backend']} b{r['batch']}: {r.get('total_ms', 0):.3f} ms "
            f"{r.get('by_category_ms_count') or r.get('error')}"
        )
    lines += issue_targets(c, h)
    for d in (e, c, h, p):
        lines += [f"ERROR {str(x)[:300]}" for x in d.get("errors", [])]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")
    ap.add_argument(
        "--budget", type=float, default=180.0, help="headline: seconds before compile cases are skipped"
    )
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.dry_run and os.environ.get("TRITON_INTERPRET") != "1" and a.stage == "correctness":
        ap.error("--dry-run runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    torch.manual_seed(0)
    if a.stage == "env":
        stage_env(a.out, a.dry_run)
    elif a.stage == "correctness":
        stage_correctness(a.out, a.dry_run)
    elif a.stage == "headline":
        stage_headline(a.out, a.dry_run, a.budget)
    elif a.stage == "profile":
        stage_profile(a.out, a.dry_run)
    else:
        stage_summary(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
