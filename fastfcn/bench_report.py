"""``fastfcn bench-report``: stored benchmark results -> markdown table and PNG chart.

    fastfcn bench-report                                  # every file in benchmarks/results/
    fastfcn bench-report benchmarks/results/nvidia-h200-2026-11-30.json --markdown out.md --png out.png

Reads the files the benchmark suite writes (``benchmarks/results/<device>-<date>.json``)
and pytest-benchmark's ``--benchmark-json`` files. Per device: one table of the
end-to-end cases (case, backend, precision, ms/image, img/s, speedup over torch fp32,
x faster than the paper's 175 ms, % of the compute floor), one of fused against the
fastest peer (onnxruntime, openvino, compile) per case and precision, one of the kernel
benchmarks (median, GB/s), and the cases that were skipped or failed, with the
reason. Where several files hold the same case, the newest result wins.
The chart is drawn with Pillow (no matplotlib): ms per image, log scale, one panel
per device.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .runtime.registry import available_backends

PRECISION_ORDER = ("fp32", "tf32", "bf16", "fp16")
BACKEND_COLOURS = {
    "torch": (96, 96, 96),
    "fused": (214, 39, 40),
    "onnxruntime": (31, 119, 180),
    "compile": (44, 160, 44),
    "openvino": (148, 103, 189),
}
DEFAULT_DIR = Path("benchmarks") / "results"
# The other inference stacks fastfcn's own "fused" backend is compared with (torch is the
# reference, not a peer).
PEERS = ("onnxruntime", "openvino", "compile")


@dataclass
class DeviceResults:
    """Everything stored for one device, merged over files."""

    name: str
    environment: dict = field(default_factory=dict)
    e2e: dict = field(default_factory=dict)  # (case_key, backend, precision) -> row dict
    kernels: dict = field(default_factory=dict)  # fullname -> row dict
    not_measured: dict = field(default_factory=dict)  # nodeid -> {outcome, reason}
    sources: list = field(default_factory=list)


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _fmt(x, spec: str, empty: str = "-") -> str:
    x = _num(x)
    return empty if x is None else format(x, spec)


def _gb(x) -> str:
    x = _num(x)
    return "-" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.3g}")


def find_files(paths: list[str]) -> list[Path]:
    """Result files named on the command line (files or folders); the default folder when none."""
    if not paths:
        here = DEFAULT_DIR
        if not here.is_dir():
            here = Path(__file__).resolve().parent.parent / DEFAULT_DIR
        paths = [str(here)]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.glob("*.json") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no benchmark results at {p}: expected a .json file or a folder of them")
    return files


def _environment(doc: dict) -> dict:
    if "environment" in doc:  # written by benchmarks/conftest.py
        return doc["environment"]
    if "fastfcn_environment" in doc:  # pytest-benchmark --benchmark-json with our hook
        return doc["fastfcn_environment"]
    mi = doc.get("machine_info", {})  # plain pytest-benchmark file
    cpu = mi.get("cpu", {}).get("brand_raw") or mi.get("processor") or "unknown CPU"
    return {"device": {"name": cpu, "kind": "cpu"}, "date": (doc.get("datetime") or "")[:10]}


def _stamp(env: dict, bench: dict) -> str:
    return bench.get("datetime") or env.get("started") or env.get("date") or ""


def load(paths: list[str]) -> dict[str, DeviceResults]:
    """Device name -> merged results of the given files (newest result per case wins)."""
    devices: dict[str, DeviceResults] = {}
    for path in find_files(paths):
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(f"{path} is not JSON ({e}); expected a benchmark results file") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
            raise InputError(f"{path} has no 'benchmarks' list; expected a fastfcn or pytest-benchmark file")
        env = _environment(doc)
        dev = env.get("device", {})
        name = dev.get("name") or "unknown device"
        d = devices.setdefault(name, DeviceResults(name))
        d.sources.append(str(path))
        if (env.get("started") or env.get("date") or "") >= (
            d.environment.get("started") or d.environment.get("date") or ""
        ):
            d.environment = env
        for b in doc["benchmarks"]:
            extra = b.get("extra_info") or {}
            stats = b.get("stats") or {}
            row = dict(extra)
            row.setdefault("median_ms", _num(stats.get("median")) and stats["median"] * 1e3)
            row.setdefault("iqr_ms", _num(stats.get("iqr")) and stats["iqr"] * 1e3)
            row["name"] = b.get("name") or b.get("fullname")
            row["_stamp"] = _stamp(env, b)
            if extra.get("backend") and extra.get("case_key"):
                key = (extra["case_key"], extra["backend"], extra.get("precision", "fp32"))
                table = d.e2e
            else:
                key = b.get("fullname") or row["name"]
                table = d.kernels
            if key not in table or row["_stamp"] >= table[key]["_stamp"]:
                table[key] = row
        for o in doc.get("not_measured", []):
            d.not_measured[o["nodeid"]] = o
    # A case measured in any file is not "not measured".
    for d in devices.values():
        measured = {r.get("name") for r in (*d.e2e.values(), *d.kernels.values())}
        d.not_measured = {k: o for k, o in d.not_measured.items() if k.split("::")[-1] not in measured}
    return devices


def _index(names, name) -> int:
    return list(names).index(name) if name in names else 99


def _order(row: dict):
    b, p = row.get("backend"), row.get("precision")
    return (
        not row.get("headline", False),
        row.get("arch", ""),
        row.get("batch", 0),
        row.get("height", 0) * row.get("width", 0),
        _index(available_backends(), b),
        _index(PRECISION_ORDER, p),
    )


def e2e_rows(d: DeviceResults) -> list[dict]:
    return sorted(d.e2e.values(), key=_order)


def _speedup(row: dict, d: DeviceResults):
    s = _num(row.get("speedup_vs_torch_fp32"))
    if s is not None:
        return s
    # Older files, or a baseline measured in another session of the same device.
    base = d.e2e.get((row.get("case_key"), "torch", "fp32"))
    if base and _num(base.get("median_ms")) and _num(row.get("median_ms")):
        return base["median_ms"] / row["median_ms"]
    return None


def peer_ratios(rows) -> list[dict]:
    """Fused against the fastest peer, per case and precision, from end-to-end rows (dicts
    with case_key, backend, precision and ms_per_image or median_ms). Returns one dict per
    (case, precision) that has a fused result: fused_ms, peer, peer_ms (ms per image) and
    ratio = peer_ms / fused_ms (> 1: fused is faster), or peer/ratio None with ``reason``
    when no peer ran at that precision.
    """
    by: dict = {}
    for r in rows:
        ms = _num(r.get("ms_per_image")) or _num(r.get("median_ms"))
        if ms is None or not r.get("case_key"):
            continue
        by.setdefault((r["case_key"], r.get("precision", "fp32")), {})[r.get("backend")] = (ms, r)
    out = []
    for (case, prec), got in by.items():
        if "fused" not in got:
            continue
        fused_ms, row = got["fused"]
        peers = {b: v[0] for b, v in got.items() if b in PEERS}
        entry = {"case_key": case, "case": row.get("case", case), "precision": prec, "fused_ms": fused_ms,
                 "peer": None, "peer_ms": None, "ratio": None}  # fmt: skip
        if peers:
            best = min(peers, key=peers.get)
            entry.update(peer=best, peer_ms=peers[best], ratio=peers[best] / fused_ms)
        else:
            entry["reason"] = f"no peer ({', '.join(PEERS)}) measured at {prec} for this case"
        out.append(entry)
    return sorted(out, key=lambda e: (e["case_key"], PRECISION_ORDER.index(e["precision"])
                                      if e["precision"] in PRECISION_ORDER else 99))


def floor_fraction(row: dict):
    """The fraction of the compute floor reached for the work the backend did. Results that
    record ``floor_work_gmac`` were measured that way; in older ones a fused row with
    ``computed_gmac`` below ``gmac`` skipped the dead zone but its floor counted the nominal
    MACs (up to 113% of the floor on FCN-16s 250x250), so it is rescaled to the computed ones."""
    floor = _num(row.get("fraction_of_floor"))
    if floor is None or "floor_work_gmac" in row or row.get("backend") != "fused":
        return floor
    nominal, computed = _num(row.get("gmac")), _num(row.get("computed_gmac"))
    if nominal and computed and computed < nominal:
        return floor * computed / nominal
    return floor


def device_header(d: DeviceResults) -> str:
    env = d.environment
    dev = env.get("device", {})
    parts = [f"date {env.get('date', '?')}"]
    for k in ("torch", "triton", "onnxruntime", "openvino", "cuda", "driver"):
        if dev.get(k):
            parts.append(f"{k} {dev[k]}")
    if dev.get("cpu_flags") is not None:
        parts.append(f"CPU flags {' '.join(dev['cpu_flags']) or 'none of interest'}")
    if env.get("profile"):
        parts.append(f"profile {env['profile']}" + (" (reduced sizes)" if env.get("cpu_reduced") else ""))
    return f"### {d.name}\n\n{', '.join(parts)}"


def markdown(devices: dict[str, DeviceResults]) -> str:
    out: list[str] = []
    for d in devices.values():
        out.append(device_header(d))
        rows = e2e_rows(d)
        if rows:
            out.append("")
            out.append(
                "| case | backend | precision | ms/image | IQR ms | img/s | speedup vs torch fp32 "
                "| x vs paper 175 ms | % of floor |"
            )
            out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                case = r.get("case", r.get("case_key", "?"))
                if r.get("reduced_from"):
                    case += f" (for {r['reduced_from']})"
                floor = floor_fraction(r)
                batch = r.get("batch") or 1
                iqr = _num(r.get("iqr_ms"))
                speed = _speedup(r, d)
                ms = _fmt(r.get("ms_per_image"), ".2f")
                out.append(
                    f"| {case} | {r.get('backend')} | {r.get('precision')} | {ms} "
                    f"| {_fmt(iqr / batch if iqr is not None else None, '.2f')} "
                    f"| {_fmt(r.get('images_per_s'), '.2f')} "
                    f"| {_fmt(speed, '.2f') + 'x' if speed is not None else '-'} "
                    f"| {_fmt(r.get('x_faster_than_paper'), '.2f')} "
                    f"| {_fmt(floor * 100 if floor is not None else None, '.1f')} |"
                )
        ratios = peer_ratios(rows)
        if ratios:
            out.append("")
            out.append("| case | precision | fused ms/image | fastest peer | peer ms/image | peer / fused |")
            out.append("|---|---|---:|---|---:|---:|")
            for e in ratios:
                ratio = _fmt(e["ratio"], ".2f") + "x" if e["ratio"] else "-"
                out.append(
                    f"| {e['case']} | {e['precision']} | {_fmt(e['fused_ms'], '.1f')} | {e['peer'] or '-'} "
                    f"| {_fmt(e['peer_ms'], '.1f')} | {ratio} |"
                )
        if d.kernels:
            out.append("")
            out.append("| kernel benchmark | median ms | IQR ms | GB/s | % of HBM |")
            out.append("|---|---:|---:|---:|---:|")
            for name in sorted(d.kernels):
                r = d.kernels[name]
                hbm = _num(r.get("fraction_of_hbm"))
                hbm_pct = _fmt(hbm * 100 if hbm is not None else None, ".1f")
                out.append(
                    f"| {r['name']} | {_fmt(r.get('median_ms'), '.4g')} | {_fmt(r.get('iqr_ms'), '.3g')} "
                    f"| {_gb(r.get('gbps'))} | {hbm_pct} |"
                )
        if d.not_measured:
            out.append("")
            out.append("Not measured:")
            for nodeid, o in sorted(d.not_measured.items()):
                reason = (o.get("reason") or "").splitlines()[0] if o.get("reason") else "no reason recorded"
                out.append(f"- `{nodeid.split('::')[-1]}` {o.get('outcome', 'skipped')}: {reason}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------- chart (Pillow only)


def chart(devices: dict[str, DeviceResults], path: str | Path) -> Path:
    """Horizontal bars of ms per image (log scale), one panel per device; returns the path."""
    from PIL import Image, ImageDraw

    from .charts import Scale, axis
    from .charts import font as chart_font

    panels = [(d, e2e_rows(d)) for d in devices.values()]
    panels = [(d, [r for r in rows if _num(r.get("ms_per_image"))]) for d, rows in panels]
    panels = [(d, rows) for d, rows in panels if rows]
    if not panels:
        raise ValueError("no end-to-end results with ms/image to chart")
    font, small = chart_font(14), chart_font(12)
    bar_h, gap, label_w, plot_w, margin = 18, 6, 420, 560, 16
    heights = [60 + len(rows) * (bar_h + gap) + 40 for _, rows in panels]
    img = Image.new("RGB", (label_w + plot_w + 2 * margin + 90, sum(heights) + 40), "white")
    draw = ImageDraw.Draw(img)
    y0 = margin
    for (d, rows), h in zip(panels, heights):
        vals = [r["ms_per_image"] for r in rows]
        xpos = Scale.decades(min(vals), max(vals), margin + label_w, margin + label_w + plot_w)
        draw.text(
            (margin, y0), f"{d.name}: ms per image (log scale; shorter is faster)", fill="black", font=font
        )
        top = y0 + 30
        bottom = top + len(rows) * (bar_h + gap)
        axis(draw, xpos, xpos.ticks(), vertical=False, label_at=bottom + 4, fmt=lambda v: f"{v:g}",
             across=(top - 4, bottom), font=small)  # fmt: skip
        for i, r in enumerate(rows):
            y = top + i * (bar_h + gap)
            label = f"{r.get('case', r.get('case_key'))}  {r.get('backend')} {r.get('precision')}"
            draw.text((margin, y + 2), label[:60], fill="black", font=small)
            x1 = max(xpos(r["ms_per_image"]), margin + label_w + 2)
            colour = BACKEND_COLOURS.get(r.get("backend"), (140, 86, 75))
            draw.rectangle([margin + label_w, y, x1, y + bar_h], fill=colour)
            v = r["ms_per_image"]
            draw.text((x1 + 4, y + 2), f"{v:,.0f}" if v >= 100 else f"{v:.3g}", fill="black", font=small)
        y0 += h
    x = margin
    for b, colour in BACKEND_COLOURS.items():
        draw.rectangle([x, y0, x + 12, y0 + 12], fill=colour)
        draw.text((x + 16, y0 - 1), b, fill="black", font=small)
        x += 130
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
