"""Static sm_90a build report of every Triton kernel specialisation fastfcn launches on CUDA.

No GPU and no driver: each specialisation is compiled with ``triton.compile(ASTSource(...))``
for ``GPUTarget("cuda", 90, 32)`` (Hopper, H100/H200), and ptxas's own report of that build
(the ``-v`` log Triton's NVIDIA backend asks for, the same command and flags as on a GPU
machine) gives registers, spill stores / loads and the stack frame; Triton's metadata gives the
shared memory. A specialisation that does not compile here would not compile on the GPU either,
so the first GPU contact cannot fail on one of these; and the launch-config comments in
kernels/ cite the measured registers and spills from the files this writes.

    python benchmarks/triton_sm90.py [--out DIR] [--only PATTERN [--merge]]

writes DIR/sm90a-triton-<version>.json and .md (default DIR: benchmarks/results/static).
--only keeps the specialisations whose name contains PATTERN (a regular expression, searched);
with --merge they replace or join the rows of the existing report for this Triton version.

What is enumerated (derived from the code, so a new kind, output, config or layer shows up here):

- ``upsample.upsample_kernel``: every weight kind (structure.KINDS) x output (structure.OUTPUTS,
  labels in both widths, and the add stage) x the dtypes fastfcn.ops passes (``head_dtypes``: the
  one hand-written rule, checked against real ops calls by tests/test_triton_sm90.py) for the
  (kernel, stride) of every head in fastfcn.heads.HEADS, constexprs from
  ``upsample.stage_constexprs`` and the config from ``upsample.launch_config(True, ...)``;
- ``unpool``: pooling with switches and the unpool gather for the pool geometries of every net
  with switches (DeconvNet), int32 and int64 indexing (``unpool.needs_int64``), relu, uint8
  switches and int64 indices, fp32/bf16/fp16, config ``unpool.launch_config(.., True)``;
- ``pool.max_pool_kernel``: every pool without switches that follows a conv in fastfcn.models'
  nets (the fused CUDA backend's conv_pool candidate), per channel count, channels_last
  strides, int32 and int64 indexing, fp32/bf16/fp16, config ``pool.launch_config(.., True)``;
- ``conv_epilogue.conv_bias_relu_kernel``: every backbone conv that the fused CUDA backend gives
  a Triton candidate (``fastfcn.runtime.cuda_fast.install`` on each net of fastfcn.models,
  built on the meta device), with the pool epilogue where a 2x2/2 pool without switches
  follows, for fp32 (IEEE and TF32), bf16 and fp16, config ``conv_epilogue.launch_config``.

Runtime int arguments are specialised by Triton (== 1 becomes a constexpr, a multiple of 16
gets a divisibility hint, which changes vectorisation and registers: a 3-channel conv1_1 needs
more than a 64-channel conv). The report builds every layer's channel counts, and for the conv
every padding class the planner of image-independent positions can pass (the layer's own, 0
and 1) at batch 1, 8 and 32, but spatial sizes at one representative call each (``SIZES``
below: not multiples of 16); their other classes are specialisations this report does not build.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_model, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "static"
TARGET = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp_size): sm_90a, what an H100/H200 runs
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int32: "i32", torch.int64: "i64"}  # fmt: skip

# Representative sizes (FCN-8s 500x500 head; DeconvNet 224x224 first pooling level; a conv at
# 175x175, no multiple of 16, at batch 1, 8 and 32: a constexpr, a plain int and a multiple of
# 16). Classes per image: 21 (VOC); 300 for the int32 labels.
SIZES = {
    "classes": 21, "classes_i32": 300,
    "add_in": 34, "add_skip_offset": 9,  # upscore_pool4: 34x34 -> 70x70 + crop(score_pool3 88x88, 9)
    "final_in": 70, "final_out": 500, "final_offset": 31,  # upscore8: 70x70 -> 568x568, crop 500 at 31
    "pool_in": 224, "pool_out": 112, "pool_channels": 64, "int64_total": 2**31 + 4096,
    "conv_batches": (1, 8, 32), "conv_in": 175,  # the first contact's headline batches
}  # fmt: skip


@dataclass
class Launch:
    """One specialisation: the kernel (``module.name`` in fastfcn.kernels), its runtime arguments
    in order (a torch.dtype stands for a tensor of that dtype) and constexprs, its config."""

    name: str
    kernel: str
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int | None = None
    config: str = ""
    uses: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        """What Triton compiles separately: argument types with its specialisation of each (an
        int == 1 is a constexpr, a multiple of 16 carries a divisibility hint, one past int32 is
        an i64), constexprs and config."""
        return (self.kernel, tuple(_arg_class(a) for a in self.args), tuple(sorted(self.constexprs.items())),
                self.num_warps, self.num_stages)  # fmt: skip


def _arg_class(a) -> str:
    if isinstance(a, torch.dtype):
        return "*" + _SHORT[a]
    if isinstance(a, bool) or not isinstance(a, int):
        return type(a).__name__
    if a == 1:
        return "1"
    width = "i64" if not -(2**31) <= a < 2**31 else "i32"
    return width + ("/16" if a % 16 == 0 else "")


def _dt(d) -> str:
    return _SHORT[d] if d is not None else "none"


def _add(table: dict, launch: Launch, use: str) -> None:
    """Add a launch, merging it with an identical specialisation (recording the extra use)."""
    have = table.setdefault(launch.key(), launch)
    if use not in have.uses:
        have.uses.append(use)


# ---------------------------------------------------------------- upsample (the FCN heads)


def head_dtypes():
    """(stage, x, skip, out, via, reaches) for every way fastfcn.ops launches upsample_kernel.
    stage: "add" (an intermediate stage: logits plus a scaled skip) or "final"; dtypes of x, skip
    (None: no skip) and out (logits / probs; labels have their own); reaches(i, taps): whether
    the call runs stage i of a head with ``taps`` skips. fcn_head keeps intermediate stages in
    fp32; the public upsample_add / upsample_crop keep x's dtype, at any stage's geometry."""
    f32 = torch.float32
    for d in FLOATS:
        yield "add", d, d, f32, "fcn_head first skip stage", lambda i, taps: i == 0
        yield "add", f32, d, f32, "fcn_head later skip stage", lambda i, taps: i > 0
        yield "add", d, d, d, "ops.upsample_add", lambda i, taps: True
        yield "add", d, None, d, "ops.upsample_add without skip", lambda i, taps: True
        yield "final", f32, None, d, "fcn_head after skip stages", lambda i, taps: taps > 0
        yield "final", d, None, d, "fcn_head without skips", lambda i, taps: taps == 0
        yield "final", d, None, d, "ops.upsample_crop", lambda i, taps: True


def head_geometries():
    """{"add" | "final": {(kernel, stride): [(head name, stage index, number of skips)]}} over
    fastfcn.heads.HEADS."""
    from fastfcn.heads import HEADS

    geo: dict = {"add": {}, "final": {}}
    for name, head in HEADS.items():
        for i, st in enumerate(head.stages):
            where = "final" if i == len(head.stages) - 1 else "add"
            geo[where].setdefault((st.kernel, st.stride), []).append((name, i, len(head.taps)))
    return geo


def _stage_ints(stage: str, k: int, s: int, c: int, has_skip: bool) -> tuple:
    """upsample_kernel's int arguments (C, h, w, Ho, Wo, off, soff, Hs, Ws) at SIZES."""
    if stage == "add":
        h, soff = SIZES["add_in"], SIZES["add_skip_offset"] if has_skip else 0
        ho = (h - 1) * s + k
        hs = ho + 2 * soff if has_skip else 0
        return c, h, h, ho, ho, 0, soff, hs, hs
    h, ho = SIZES["final_in"], SIZES["final_out"]
    return c, h, h, ho, ho, SIZES["final_offset"], 0, 0, 0


def upsample_launches(table: dict) -> None:
    from fastfcn.kernels import structure as st
    from fastfcn.kernels import upsample as up

    geo = head_geometries()
    for stage, x, skip, out, via, reaches in head_dtypes():
        outputs = ["logits"] if stage == "add" else list(st.OUTPUTS)
        for (k, s), used in sorted(geo[stage].items()):
            heads = list(dict.fromkeys(name for name, i, taps in used if reaches(i, taps)))
            if not heads:
                continue
            for kind in st.KINDS:
                for output in outputs:
                    labels = output == "labels"
                    for c in (SIZES["classes"], SIZES["classes_i32"]) if labels else (SIZES["classes"],):
                        o = st.labels_dtype(c) if output == "labels" else out
                        ints = _stage_ints(stage, k, s, c, skip is not None)
                        cfg = up.launch_config(True, kind, output, c, ints[3] * ints[4])
                        cx = up.stage_constexprs(k, s, kind, output, c, skip is not None)
                        wk = x if kind == "bilinear" else torch.float32  # bilinear passes x, never read
                        sk = x if skip is None else skip  # no skip: the launcher passes x, never read
                        name = (f"upsample/{stage}/{kind}/{output if stage == 'final' else 'add'}-{_dt(o)}/"
                                f"x{_dt(x)}-skip{_dt(skip)}/k{k}s{s}")  # fmt: skip
                        launch = Launch(
                            name,
                            "upsample.upsample_kernel",
                            (x, wk, sk, o, *ints, 1.0),
                            {**cx, "BLOCK_P": cfg[0], "BLOCK_C": cfg[1]},
                            cfg[2],
                            config=f"upsample.CUDA_LAUNCH[{kind!r}] = {cfg}",
                        )
                        _add(table, launch, f"{via} ({', '.join(heads)})")


# ---------------------------------------------------------------- unpool (DeconvNet)


def switch_pools() -> dict:
    """{(kernel, stride): [arch]} of every Pool step with switches in fastfcn.models' nets."""
    from fastfcn import models
    from fastfcn.models.backbone import Pool

    found: dict = {}
    for arch in models.available():
        with torch.device("meta"):
            m = models.build(arch)
        for steps in m.backbone_streams().values():
            for s in steps:
                if isinstance(s, Pool) and s.switches is not None:
                    found.setdefault((s.kernel, s.stride), [])
                    if arch not in found[(s.kernel, s.stride)]:
                        found[(s.kernel, s.stride)].append(arch)
    return found


def unpool_launches(table: dict) -> None:
    from fastfcn.kernels import unpool

    H, h, c = SIZES["pool_in"], SIZES["pool_out"], SIZES["pool_channels"]
    small = c * h * h
    for (k, s), archs in sorted(switch_pools().items()):
        uses = ", ".join(archs)
        for d in FLOATS:
            # int64 indexing: when the output or (pooling) the input passes 2**31 elements; the
            # pool's total (its output) may still be an int32 then
            pool_cases = [(small, False), (small, True), (SIZES["int64_total"], True)]
            for total, int64 in pool_cases:
                block, warps = unpool.launch_config(total, True)
                launch = Launch(
                    f"unpool/pool/{_dt(d)}/int64={int64}/total={_arg_class(total)}/k{k}s{s}",
                    "unpool.max_pool_switches_kernel",
                    (d, d, torch.uint8, total, H, H, h, h),
                    {"KERNEL": k, "STRIDE": s, "INT64": int64, "BLOCK": block},
                    warps,
                    config=f"unpool.CUDA_LAUNCH = {(block, warps)}",
                )
                _add(table, launch, f"ops.max_pool2d_with_switches ({uses})")
            for idx in (torch.uint8, torch.int64):
                for relu in (False, True):
                    for total, int64 in [(small * 4, False), (SIZES["int64_total"], True)]:
                        block, warps = unpool.launch_config(total, True)
                        launch = Launch(
                            f"unpool/unpool/{_dt(d)}/idx={_dt(idx)}/relu={relu}/int64={int64}/k{k}s{s}",
                            "unpool.max_unpool_gather_kernel", (d, idx, d, total, H, H, h, h),
                            {"KERNEL": k, "STRIDE": s, "SWITCHES": idx == torch.uint8, "RELU": relu,
                             "INT64": int64, "BLOCK": block}, warps,
                            config=f"unpool.CUDA_LAUNCH = {(block, warps)}",
                        )  # fmt: skip
                        _add(table, launch, f"ops.max_unpool2d ({uses})")


def plain_pools() -> dict:
    """{(kernel, stride, channels): [arch]} of every Pool step without switches right after a Conv
    step in fastfcn.models' nets: the pools the fused CUDA backend's conv_pool may run through
    pool.max_pool_kernel."""
    from fastfcn import models
    from fastfcn.models.backbone import Conv, Pool

    found: dict = {}
    for arch in models.available():
        with torch.device("meta"):
            m = models.build(arch)
        for steps in m.backbone_streams().values():
            for a, b in zip(steps, steps[1:]):
                if isinstance(a, Conv) and isinstance(b, Pool) and b.switches is None:
                    c = getattr(m, a.name).out_channels
                    archs = found.setdefault((b.kernel, b.stride, c), [])
                    if arch not in archs:
                        archs.append(arch)
    return found


def pool_launches(table: dict) -> None:
    from fastfcn.kernels import pool

    H = SIZES["conv_in"]
    for (k, s, c), archs in sorted(plain_pools().items()):
        h = (H - k + s - 1) // s + 1
        for d in FLOATS:
            for int64 in (False, True):
                for n in SIZES["conv_batches"]:
                    p = n * h * h
                    bp, bc, warps = pool.launch_config(p, c, True)
                    # channels_last strides of the input and the output
                    strides = (H * H * c, 1, H * c, c, h * h * c, 1, h * c, c)
                    launch = Launch(
                        f"pool/{_dt(d)}/int64={int64}/k{k}s{s}/c{c}/n{n}",
                        "pool.max_pool_kernel", (d, d, p, c, H, H, h, h, *strides),
                        {"KERNEL": k, "STRIDE": s, "INT64": int64, "BLOCK_P": bp, "BLOCK_C": bc}, warps,
                        config=f"pool.CUDA_TILE = {pool.CUDA_TILE}, pool.CUDA_WARPS = {warps}",
                    )  # fmt: skip
                    _add(table, launch, f"cuda_fast conv_pool ({', '.join(archs)})")


# ---------------------------------------------------------------- conv epilogue (fused backbone)


def triton_convs() -> list[tuple]:
    """(arch, layer, conv module, pool) for every backbone conv fastfcn's fused CUDA backend gives
    a Triton candidate: cuda_fast.install on each net (meta device, BatchNorm folded as the
    backend does); pool where run_steps hands it the 2x2/2 pool without switches that follows."""
    from fastfcn import models
    from fastfcn.models.backbone import Pool, step_convs
    from fastfcn.runtime import cuda_fast

    out = []
    for arch in models.available():
        with torch.device("meta"):
            m = models.build(arch).eval()
        models.fold_batchnorm(m)
        installed = cuda_fast.install(m)
        for steps in m.backbone_streams().values():
            steps = tuple(steps)
            for i, step in enumerate(steps):
                after = steps[i + 1] if i + 1 < len(steps) else None
                for c in step_convs((step,)):  # the step itself, or an Inception block's branch convs
                    impl = installed.get(c.name)
                    if isinstance(impl, cuda_fast.EpilogueConv) and "triton" in impl.chooser.candidates:
                        conv = getattr(m, c.name)
                        out.append((arch, c.name, conv, False))
                        pooled = isinstance(after, Pool) and after.switches is None and c is step
                        if pooled and (after.kernel, after.stride) == (2, 2) and impl._pool_candidates:
                            out.append((arch, c.name, conv, True))
    return out


def conv_launches(table: dict) -> None:
    from fastfcn.kernels import conv_epilogue as ce
    from fastfcn.models.backbone import conv_padding

    H = SIZES["conv_in"]
    # fp32 with IEEE products (the default) and with TF32 (allow_tf32), bf16, fp16
    precisions = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, False),
                  (torch.float16, False)]  # fmt: skip
    for arch, layer, conv, pool in triton_convs():
        (kh, kw), stride, dil = conv.kernel_size, conv.stride[0], conv.dilation[0]
        own = conv_padding(conv)[0]
        pads = sorted({own, *(q for q in (0, 1) if q <= own)})
        cin, cout = conv.in_channels, conv.out_channels
        for (d, ieee), p, n in itertools.product(precisions, pads, SIZES["conv_batches"]):
            ho = (H + 2 * p - dil * (kh - 1) - 1) // stride + 1
            hp = (ho + 1) // 2 if pool else ho
            ie = ce.ieee_dot(True, d, ieee)
            cfg = ce.launch_config(True, pool, ie)
            prec = _dt(d) if d != torch.float32 else ("fp32-ieee" if ie else "tf32")
            launch = Launch(
                f"conv/{'pool' if pool else 'nopool'}/{prec}/k{kh}x{kw}s{stride}d{dil}/pad{p}/"
                f"cin{cin}-cout{cout}/n{n}",
                "conv_epilogue.conv_bias_relu_kernel",
                (d, d, torch.float32, d, n, cin, H, H, cout, ho, ho, hp, hp, p, p),
                {"KH": kh, "KW": kw, "STRIDE": stride, "DIL": dil, "POOL": pool, "IEEE": ie,
                 "BLOCK_M": cfg[0], "BLOCK_N": cfg[1], "BLOCK_K": cfg[2]}, cfg[3], cfg[4],
                config=f"conv_epilogue.CUDA_LAUNCH[{(pool, ie)}] = {cfg}",
            )  # fmt: skip
            _add(table, launch, f"{arch}:{layer}")


def all_launches(only: str | None = None) -> list[Launch]:
    """Every distinct specialisation, in a stable order; ``only``: a regex on the names."""
    table: dict = {}
    upsample_launches(table)
    unpool_launches(table)
    pool_launches(table)
    conv_launches(table)
    launches = list(table.values())
    if only:
        pat = re.compile(only)
        launches = [x for x in launches if pat.search(x.name)]
    return launches


# ---------------------------------------------------------------- compiling


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores / loads and stack frame (bytes) from a ``ptxas -v`` log."""
    out = {}
    for k, pat in _PTXAS.items():
        m = pat.search(log)
        out[k] = int(m.group(1)) if m else None
    return out


class Compiler:
    """Compiles launches for sm_90a with the installed Triton. Must run with the interpreter off
    (TRITON_INTERPRET unset before triton is imported: main() sees to it)."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.triton = triton
        self.target = GPUTarget(*TARGET)
        self.backend = make_backend(self.target)
        self._binders: dict = {}

    def _kernel(self, qualname: str):
        import importlib

        mod, name = qualname.split(".")
        fn = getattr(importlib.import_module(f"fastfcn.kernels.{mod}"), name)
        if not hasattr(fn, "params"):
            raise RuntimeError(
                f"{qualname} is {type(fn).__name__}, not a JITFunction: Triton's interpreter is on "
                "(TRITON_INTERPRET=1 when triton was imported); run this report without it"
            )
        return fn

    def specialise(self, launch: Launch):
        """(fn, signature, constexprs, attrs) as a launch with these arguments would compile:
        Triton's own binder decides each argument's type and specialisation."""
        from triton.runtime.jit import create_function_from_signature

        fn = self._kernel(launch.kernel)
        binder = self._binders.get(launch.kernel)
        if binder is None:
            binder = self._binders[launch.kernel] = create_function_from_signature(
                fn.signature, fn.params, self.backend
            )
        args = [torch.empty(1, dtype=a) if isinstance(a, torch.dtype) else a for a in launch.args]
        _, spec, _ = binder(*args, **launch.constexprs)
        names = [p.name for p in fn.params]
        signature = {nm: sp[0] for nm, sp in zip(names, spec)}
        constexprs, attrs = {}, {}
        for i, (nm, sp) in enumerate(zip(names, spec)):
            if sp[0] == "constexpr":
                constexprs[(i,)] = launch.constexprs.get(nm, sp[1])
            elif isinstance(sp[1], str):
                attrs[(i,)] = self.backend.parse_attr(sp[1])
        return fn, signature, constexprs, attrs

    def compile(self, launch: Launch) -> dict:
        from triton import knobs
        from triton.compiler import ASTSource

        row = {
            "name": launch.name,
            "kernel": launch.kernel,
            "config": launch.config,
            "num_warps": launch.num_warps,
            "num_stages": launch.num_stages,
            "uses": launch.uses,
        }
        options = {"num_warps": launch.num_warps}
        if launch.num_stages is not None:
            options["num_stages"] = launch.num_stages
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            fn, signature, constexprs, attrs = self.specialise(launch)
            row["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
            row["constexprs"] = {fn.params[i[0]].name: v for i, v in constexprs.items()}
            knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas's -v log of its own build
            with contextlib.redirect_stdout(log):
                kernel = self.triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                             options=options)  # fmt: skip
        except Exception as e:  # a failed build is a result: recorded, never raised
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:2000]}",
                       compile_s=round(time.perf_counter() - t0, 3))  # fmt: skip
            return row
        row.update(ok=True, compile_s=round(time.perf_counter() - t0, 3), **parse_ptxas(log.getvalue()))
        row["shared_bytes"] = int(kernel.metadata.shared)
        if row["regs"] is None:
            row["ptxas_log"] = log.getvalue()[-2000:]
        return row


def environment(compiler: Compiler) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, get_ptxas_version

    ptxas = get_ptxas(compiler.target.arch)
    version = get_ptxas_version(compiler.target.arch).strip().splitlines()[-1]
    return {
        "triton": compiler.triton.__version__, "torch": torch.__version__,
        "python": sys.version.split()[0], "target": "sm_90a (GPUTarget('cuda', 90, 32))",
        "ptxas": f"{Path(ptxas.path).name}: {version}", "cpu": cpu_model(),
        "date": utc_now().strftime("%Y-%m-%d %H:%M UTC"), "sizes": SIZES,
    }  # fmt: skip


# ---------------------------------------------------------------- report


def _cell(v) -> str:
    return "-" if v is None else str(v)


def markdown(env: dict, rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("ok")]
    spilling = [r for r in ok if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0]
    lines = [
        f"# Triton {env['triton']}: static sm_90a build of every fastfcn CUDA kernel specialisation",
        "",
        f"{env['date']}, compiled on {env['cpu']} (no GPU); {env['ptxas']}; torch {env['torch']}, "
        f"Python {env['python']}. Written by `python benchmarks/triton_sm90.py`."
        + (
            f" Rows of `--only {env['merged'].get('only')}` rebuilt on {env['merged']['date']} and merged in."
            if env.get("merged")
            else ""
        ),
        "",
        f"{len(rows)} specialisations: {len(ok)} compiled, {len(rows) - len(ok)} failed, "
        f"{len(spilling)} spill; total compile {sum(r['compile_s'] for r in rows):.1f} s.",
        "",
        "| specialisation | warps | stages | regs | spill st/ld (B) | stack (B) | smem (B) | compile (s) "
        "| config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("ok"):
            spill = f"{_cell(r['spill_stores'])}/{_cell(r['spill_loads'])}"
            lines.append(
                f"| {r['name']} | {r['num_warps']} | {_cell(r['num_stages'])} | {_cell(r['regs'])} | {spill} "
                f"| {_cell(r['stack'])} | {r['shared_bytes']} | {r['compile_s']} | {r['config']} |"
            )
        else:
            err = r["error"].splitlines()[0][:120].replace("|", "/")
            lines.append(f"| {r['name']} | {r['num_warps']} | {_cell(r['num_stages'])} | FAILED: {err} "
                         f"| | | | {r['compile_s']} | {r['config']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="folder for the .json and .md (default: %(default)s)")
    ap.add_argument("--only", default=None, help="a regular expression: keep the specialisations it finds")
    ap.add_argument(
        "--merge", action="store_true",
        help="keep the existing report's other rows (this Triton's, in --out) and replace or add only the "
        "ones built now: a new kernel is reported without rebuilding the rest",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton was imported with TRITON_INTERPRET=1: run this report in a fresh process")
    # Triton's interpreter makes @triton.jit plain Python (nothing to compile), and a warm cache
    # would skip ptxas (no log): interpreter off, and a fresh cache for this run.
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.TemporaryDirectory(prefix="triton-sm90-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    # Triton 3.9 warns that its default (fp fusion on, as in every launch of ours) will change
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    compiler = Compiler()
    launches = all_launches(args.only)
    if not launches:
        raise SystemExit(f"--only {args.only!r} matches no specialisation")
    env = environment(compiler)
    rows = []
    for i, launch in enumerate(launches):
        row = compiler.compile(launch)
        rows.append(row)
        state = (f"{row['regs']} regs, spills {row['spill_stores']}/{row['spill_loads']} B" if row.get("ok")
                 else "FAILED " + row["error"].splitlines()[0][:160])  # fmt: skip
        print(f"[{i + 1}/{len(launches)}] {launch.name}: {state} ({row['compile_s']} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"sm90a-triton-{env['triton']}"  # no with_suffix: the version has dots
    if args.merge and Path(f"{stem}.json").exists():
        old = json.loads(Path(f"{stem}.json").read_text())
        built = {r["name"]: r for r in rows}
        kept = {r["name"]: r for r in old["specialisations"] if r["name"] not in built}
        order = [x.name for x in all_launches()]  # today's order; rows the code no longer launches last
        merged = {**kept, **built}
        rows = [merged.pop(n) for n in order if n in merged] + list(merged.values())
        env = {**old["environment"], "merged": {**env, "only": args.only}}
    # one specialisation per line: diffs between runs stay readable
    body = ",\n".join(json.dumps(r) for r in rows)
    text = f'{{"environment": {json.dumps(env)},\n"specialisations": [\n{body}\n]}}\n'
    Path(f"{stem}.json").write_text(text)
    Path(f"{stem}.md").write_text(markdown(env, rows))
    failed = [r["name"] for r in rows if not r.get("ok")]
    print(f"wrote {stem}.json and .md: {len(rows)} specialisations, {len(failed)} failed")
    cache.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
