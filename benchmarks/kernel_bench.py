"""Micro benchmark of the res-post-norm kernel: eager torch vs the dispatched fused path.

    from gigamim_benchmarks.kernel_bench import bench_residual_post_norm
    bench_residual_post_norm((64, 2304, 512), torch.bfloat16, "cuda")

Timing uses torch.utils.benchmark (it synchronises CUDA and warms up). On CPU only the
torch path runs (the fused entries are None): the Triton interpreter is for correctness,
and timing it would mean nothing. The caller (benchmarks/) writes the results to disk.
"""

from __future__ import annotations

import torch
from torch.utils import benchmark

from gigamim.kernels import implementation_for, residual_post_norm, torch_impl


def _time_ms(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def bench_residual_post_norm(shape, dtype=torch.float32, device="cpu", *, drop_path=True,
                             min_run_time: float = 0.5, eps: float = 1e-5) -> dict:
    """Time forward and forward+backward of `shortcut + drop_path_scale * LayerNorm(y)`.

    Returns a JSON-able dict: shape, dtype, device, backend (what the fused call dispatches
    to), torch_fwd_ms, torch_fwd_bwd_ms, fused_fwd_ms, fused_fwd_bwd_ms (None when the
    fused path is torch itself), speedups (torch/fused), max_abs_err (fused vs torch output),
    and gb_per_s_fused_fwd (bytes the fused forward must move / its time).
    """
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*s):
        return torch.randn(*s, generator=gen).to(device=device, dtype=dtype)

    shortcut, y, grad = make(*shape), make(*shape), make(*shape)
    weight, bias = make(n), make(n)
    for t in (shortcut, y, weight, bias):
        t.requires_grad_(True)
    scale = None
    if drop_path:
        # timm drop_path at rate 0.1: keep mask / keep prob, one value per sample.
        keep = (torch.rand(shape[0], generator=gen) > 0.1).to(dtype) / 0.9
        scale = keep.view(shape[0], *([1] * (len(shape) - 1))).to(device)
    inputs = (shortcut, y, weight, bias)

    def run(fn, backward: bool):
        def call():
            out = fn(shortcut, y, weight, bias, eps, scale)
            if backward:
                torch.autograd.grad(out, inputs, grad)
        return call

    impl = implementation_for(y, weight, bias)
    result = {
        "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": str(device), "backend": impl,
        "torch_fwd_ms": _time_ms(run(torch_impl.residual_post_norm, False), min_run_time),
        "torch_fwd_bwd_ms": _time_ms(run(torch_impl.residual_post_norm, True), min_run_time),
        "fused_fwd_ms": None, "fused_fwd_bwd_ms": None, "speedup_fwd": None, "speedup_fwd_bwd": None,
        "max_abs_err": None, "gb_per_s_fused_fwd": None,
    }
    # The Triton interpreter (GIGAMIM_KERNELS=triton on CPU) is for correctness; its
    # timings would mean nothing, so the fused path is timed on CUDA only.
    if impl != "torch" and device.type == "cuda":
        with torch.no_grad():
            ref = torch_impl.residual_post_norm(shortcut, y, weight, bias, eps, scale)
            got = residual_post_norm(shortcut, y, weight, bias, eps, scale)
            result["max_abs_err"] = (got.float() - ref.float()).abs().max().item()
        fwd = _time_ms(run(residual_post_norm, False), min_run_time)
        fwd_bwd = _time_ms(run(residual_post_norm, True), min_run_time)
        moved = 3 * shortcut.numel() * shortcut.element_size()  # read y, shortcut; write out
        result.update(
            fused_fwd_ms=fwd, fused_fwd_bwd_ms=fwd_bwd,
            speedup_fwd=result["torch_fwd_ms"] / fwd, speedup_fwd_bwd=result["torch_fwd_bwd_ms"] / fwd_bwd,
            gb_per_s_fused_fwd=moved / (fwd * 1e-3) / 1e9,
        )
    return result
