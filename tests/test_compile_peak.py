"""The GEMM peak probe: a positive TFLOP/s figure that a timed matmul written here agrees with
(within the noise of a shared CPU), cached per device, and a clear error for a bad precision."""

import time

import pytest
import torch

from gigamim.train.peak import measure_gemm_tflops, peak_tflops


def test_probe_agrees_with_a_timed_matmul():
    got = measure_gemm_tflops("cpu", "fp32", n=512, repeats=3)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    best = min((lambda t: (torch.mm(a, b), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(3))
    ours = 2 * 512**3 / best / 1e12
    assert got > 0 and 0.2 < got / ours < 5  # same order; the machine is shared
    peak, src = peak_tflops("cpu", "bf16")
    assert peak > 0 and "measured" in src and "fp32" in src
    with pytest.raises(ValueError, match="precision"):
        measure_gemm_tflops("cpu", "int8")
