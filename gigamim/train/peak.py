"""The device's dense GEMM peak, measured once: the denominator of MFU/HFU where no datasheet
number applies (CPUs, unknown GPUs), and a sanity check where one does.

    from gigamim.train.peak import peak_tflops
    peak, source = peak_tflops(device, "bf16")   # datasheet for known GPUs, else a probe
    measured = measure_gemm_tflops(device, "bf16")  # the probe alone (~0.2 s GPU, ~1 s CPU)

The probe times square matmuls (n=2048 fp32 on CPU with the current thread count; n=8192 in
the given dtype on a GPU), takes the best of a few repeats, and caches the answer per
(device, dtype) for the process. On a shared CPU it is measured under the same load as the
step it divides, which is the point.
"""

from __future__ import annotations

import time
from typing import Optional, Tuple

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CACHE: dict = {}


def measure_gemm_tflops(device, precision: str = "fp32", n: Optional[int] = None, repeats: int = 5) -> float:
    """Best dense-GEMM TFLOP/s of ``torch.mm`` at n x n x n on ``device`` in ``precision``."""
    device = torch.device(device)
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    # CPU matmul in bf16 is not what the CPU step runs (autocast is off there): use fp32.
    dtype = torch.float32 if device.type == "cpu" else _DTYPES[precision]
    n = n or (2048 if device.type == "cpu" else 8192)
    key = (str(device), dtype, n, torch.get_num_threads())
    if key in _CACHE:
        return _CACHE[key]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    _CACHE[key] = 2 * n**3 / best / 1e12
    return _CACHE[key]


def peak_tflops(device, precision: str = "bf16") -> Tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from): a known GPU's datasheet dense peak, else the probe."""
    from gigamim.train.metrics import device_peak_tflops

    device = torch.device(device)
    if device.type == "cuda":
        sheet = device_peak_tflops(device, precision)
        if sheet:
            return sheet, f"datasheet dense {precision} ({torch.cuda.get_device_name(device)})"
    measured = measure_gemm_tflops(device, precision)
    what = "fp32" if device.type == "cpu" else precision
    return measured, f"measured torch.mm {what} GEMM probe on {device}"
