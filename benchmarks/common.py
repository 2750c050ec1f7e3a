"""What every benchmark result carries: machine, versions, command, load; JSON writing; medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import torch

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "gpu": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                       "capability": f"{p.major}.{p.minor}"}
    return info


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("gigamim", "torch", "timm", "deepspeed", "triton", "numpy", "matplotlib", "webdataset"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    import torch

    out["torch"] = torch.__version__  # with the build tag (+cu130, +cpu), which the metadata lacks
    out["cuda"] = torch.version.cuda
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def command_line(argv) -> str:
    return " ".join(["gigamim", "bench"] + list(argv if argv is not None else sys.argv[1:]))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


class Clock:
    """perf_counter that synchronises the GPU first, so a phase's time is its own."""

    def __init__(self, device):
        self.device = device

    def __call__(self) -> float:
        sync(self.device)
        return time.perf_counter()


def cpu_matmul_peak_tflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM TFLOP/s of ``torch.mm`` at n x n x n with the current thread count:
    the CPU 'peak' that CPU MFU is measured against (in the same run, same load)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12
