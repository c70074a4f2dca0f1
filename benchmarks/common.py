"""Helpers shared by every benchmark file: device description, peak table,
compute floor, memory peak, statistics and GB/s.

Kernel and end-to-end benchmarks record the same fields through these, so a
stored result can be read without knowing which file produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import resource
import subprocess
import sys
from functools import lru_cache

import torch

# The paper's FCN-8s inference time (Long et al., CVPR 2015, Table 3: "~175 ms"; 500x500 input
# class, one image on a Tesla K40c). Ratios against it are reported for every case, but only
# FCN-8s 500x500 batch 1 is the like-for-like comparison.
PAPER_MS = 175.0
PAPER_SOURCE = "Long, Shelhamer, Darrell, CVPR 2015, Table 3 (FCN-8s, ~175 ms per image)"

# Dense (no sparsity) peak TFLOP/s by precision, and HBM TB/s, from NVIDIA's datasheets.
# "fp32" is the non-tensor-core rate: fp32 convolutions with TF32 disabled run there.
# Entries are matched in order against torch.cuda.get_device_name(): the first whose
# every pattern occurs (case-insensitive) wins, so the specific names come first.
_H100_SXM = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}
GPU_PEAKS: list[dict] = [
    {
        "match": ("h200",),
        "label": "H200 (SXM/NVL compute of H100 SXM)",
        "tflops": _H100_SXM,
        "hbm_tbps": 4.8,
        "source": "NVIDIA H200 Tensor Core GPU datasheet (same compute as H100 SXM; 4.8 TB/s HBM3e)",
    },
    {
        "match": ("h100", "pcie"),
        "label": "H100 PCIe",
        "tflops": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
        "hbm_tbps": 2.0,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe column (dense = sparse / 2)",
    },
    {
        "match": ("h100", "nvl"),
        "label": "H100 NVL",
        "tflops": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
        "hbm_tbps": 3.9,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL column (dense = sparse / 2)",
    },
    {
        "match": ("h100",),
        "label": "H100 SXM",
        "tflops": _H100_SXM,
        "hbm_tbps": 3.35,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (dense = sparse / 2)",
    },
    {
        "match": ("a100", "80gb"),
        "label": "A100 80GB",
        "tflops": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        "hbm_tbps": 2.039,
        "source": "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM; PCIe 80GB: 1.935 TB/s)",
    },
    {
        "match": ("a100",),
        "label": "A100 40GB",
        "tflops": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        "hbm_tbps": 1.555,
        "source": "NVIDIA A100 Tensor Core GPU datasheet (40GB)",
    },
]


def gpu_peak(name: str) -> dict | None:
    """The GPU_PEAKS entry for a CUDA device name, or None when the table has none."""
    low = name.lower()
    for entry in GPU_PEAKS:
        if all(p in low for p in entry["match"]):
            return entry
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The flags that decide which convolutions and precisions a CPU runs natively.
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags_of_interest() -> list[str]:
    """The CPU_FLAGS_OF_INTEREST this machine has, in that order (recorded with every result)."""
    flags = _cpu_flags()
    return [f for f in CPU_FLAGS_OF_INTEREST if f in flags]


def native_bf16_cpu() -> tuple[bool, str]:
    """(whether the CPU has native bf16 arithmetic: AVX512-BF16 or AMX-BF16, a sentence saying
    so with the CPU model and its flags); read at run time from /proc/cpuinfo."""
    flags = cpu_flags_of_interest()
    ok = "avx512_bf16" in flags or "amx_bf16" in flags
    what = "has" if ok else "has no"
    return ok, f"{cpu_model()} {what} native bf16 (flags: {' '.join(flags) or 'none of interest'})"


def _cpu_mhz() -> tuple[float | None, str]:
    # cpuinfo_max_freq is the rated boost clock where the kernel exposes cpufreq; VMs often
    # do not, and /proc/cpuinfo then reports the nominal clock (turbo may run above it).
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1000.0, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    mhz = float(line.split(":", 1)[1])
                    return mhz, "/proc/cpuinfo 'cpu MHz' (nominal; turbo not visible)"
    except (OSError, ValueError):
        pass
    return None, "no clock frequency readable"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu_peak() -> dict:
    """Estimated fp32 peak of the cores this process may use: cores x clock x FLOP/cycle.

    FLOP/cycle assumes two FMA pipes per core (Zen 2+, Skylake-SP Gold/Platinum and
    later): AVX-512 2 x 16 lanes x 2 = 64, AVX2+FMA 2 x 8 x 2 = 32. Only fp32 is
    estimated; other precisions are null with the reason.
    """
    flags = _cpu_flags()
    mhz, mhz_src = _cpu_mhz()
    cores = cpu_cores()
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA pipes x 16 fp32 lanes x 2)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA (2 FMA pipes x 8 fp32 lanes x 2)"
    else:
        per_cycle, isa = None, "vector width unknown (no avx2/fma/avx512f flags readable)"
    if mhz is None or per_cycle is None:
        reason = mhz_src if mhz is None else isa
        return {"tflops": {"fp32": None}, "reason": reason, "source": None, "label": cpu_model()}
    tflops = cores * mhz * 1e6 * per_cycle / 1e12
    return {
        "tflops": {"fp32": tflops},
        "label": cpu_model(),
        "source": (
            f"estimate: {cores} cores x {mhz:.0f} MHz ({mhz_src}) x {per_cycle} FLOP/cycle, {isa}; "
            "Winograd/FFT convolutions and turbo clocks can beat this direct-convolution floor"
        ),
        "reason": None,
    }


def peak_tflops(info: dict, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s for precision on the device of `info`, source or reason)."""
    peaks = info.get("peak") or {}
    value = (peaks.get("tflops") or {}).get(precision)
    if value is None:
        if peaks.get("reason"):
            return None, peaks["reason"]
        return None, f"no {precision} peak in the table for {info.get('name')}"
    return value, peaks.get("source") or ""


def _version(*dists: str) -> str | None:
    """Installed version of the first distribution found (metadata only: importing
    triton just to read its version costs seconds and prints leak noise at exit)."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 12080 = the CUDA API level of the driver
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:
        return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_info(device: torch.device | str) -> dict:
    """Name, slug, peaks and software versions of `device` ("cpu" or "cuda[:i]")."""
    device = torch.device(device)
    info: dict = {
        "kind": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "openvino": _version("openvino"),
        "numpy": _version("numpy"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "cpu_flags": cpu_flags_of_interest(),
        "native_bf16_cpu": native_bf16_cpu()[0],
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import fastfcn

        info["fastfcn"] = fastfcn.__version__
    except Exception:
        info["fastfcn"] = None
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        name = torch.cuda.get_device_name(idx)
        peak = gpu_peak(name)
        info.update(
            name=name,
            slug=slug(name.replace("NVIDIA ", "")),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
            sm_count=props.multi_processor_count,
            memory_gb=round(props.total_memory / 2**30, 1),
            peak=peak
            if peak is not None
            else {"tflops": {}, "reason": f"{name} is not in the peak table (benchmarks/common.py)"},
        )
    else:
        name = cpu_model()
        info.update(
            name=f"{name} ({info['cpu_cores']} cores)",
            slug=slug(f"cpu-{name}-{info['cpu_cores']}c"),
            cuda=None,
            driver=None,
            peak=cpu_peak(),
        )
    return info


ENV_KEYS = ("name", "driver", "cuda", "torch", "triton", "onnxruntime", "openvino", "python", "fastfcn")


def env_extra(info: dict) -> dict:
    """The per-result environment fields (device name, driver, versions)."""
    out = {"device": info.get("name")}
    out.update({k: info.get(k) for k in ENV_KEYS if k != "name"})
    return out


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def sync(device: torch.device | str) -> None:
    """Wait for the device: call inside the timed region, or GPU times measure launches only."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class MemoryPeak:
    """Peak memory between reset() and read(), in MiB.

    GPU: torch.cuda.max_memory_allocated (tensors only, not the caching allocator's reserve).
    CPU: the process's peak RSS (VmHWM); Linux resets it by writing 5 to
    /proc/self/clear_refs, otherwise it is the peak since the process started
    (ru_maxrss), which the field name then says.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.kind = "unknown"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "rss_peak_since_reset"
        except OSError:
            self.kind = "rss_peak_since_process_start"

    def read(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_peak_since_reset":
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            return int(line.split()[1]) / 1024.0
            except OSError:
                pass
        # ru_maxrss is KiB on Linux, bytes on macOS.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform == "darwin" else 1024.0)


def stats_ms(benchmark) -> dict:
    """Median and spread of a finished pytest-benchmark run, in ms."""
    s = benchmark.stats.stats
    return {
        "median_ms": s.median * 1e3,
        "iqr_ms": s.iqr * 1e3,
        "stddev_ms": s.stddev * 1e3 if s.rounds > 1 else 0.0,
        "q1_ms": s.q1 * 1e3,
        "q3_ms": s.q3 * 1e3,
        "min_ms": s.min * 1e3,
        "max_ms": s.max * 1e3,
        "rounds": s.rounds,
    }


def gbps(nbytes: float, seconds: float) -> float | None:
    """Bytes moved per second, in GB/s (1e9): for kernels, the bytes the op must read and write."""
    return nbytes / seconds / 1e9 if seconds > 0 else None


def floor_fields(flops: float, seconds: float, info: dict, precision: str) -> dict:
    """Achieved TFLOP/s, the compute floor (flops / peak) and the fraction of it reached."""
    peak, src = peak_tflops(info, precision)
    out = {
        "achieved_tflops": flops / seconds / 1e12 if seconds > 0 else None,
        "peak_tflops": peak,
        "peak_source": src if peak is not None else None,
        "floor_ms": None,
        "fraction_of_floor": None,
    }
    if peak is None:
        out["floor_reason"] = src
    else:
        floor_s = flops / (peak * 1e12)
        out["floor_ms"] = floor_s * 1e3
        out["fraction_of_floor"] = floor_s / seconds if seconds > 0 else None
    return out


def bandwidth_fields(nbytes: float, seconds: float, info: dict) -> dict:
    """GB/s and its fraction of the device's HBM bandwidth (GPU table entries only)."""
    rate = gbps(nbytes, seconds)
    hbm = (info.get("peak") or {}).get("hbm_tbps")
    return {
        "bytes": nbytes,
        "gbps": rate,
        "hbm_gbps": hbm * 1e3 if hbm else None,
        "fraction_of_hbm": rate / (hbm * 1e3) if (rate is not None and hbm) else None,
    }
