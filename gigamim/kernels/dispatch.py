"""Which implementation runs: "triton", "apex" or "torch".

The choice is made per call from the tensor's device and the env var GIGAMIM_KERNELS:

    auto (default)  torch, on every device. Measured on an H200 (torch 2.11, triton 3.6;
                    benchmarks/results/gpu_smoke_2026-12-04): the Triton residual+post-norm
                    kernel is 2.1-2.9x faster than torch forward at (64, 2304, 128) but its
                    backward makes forward+backward 0.22-0.73x torch's at the SwinV2 shapes
                    (0.34x at (64, 144, 512) bf16), so training would lose with it. It stays
                    opt-in (triton below) until its backward wins; per-block torch.compile
                    (train.compile) is the fused path that measured faster (x1.05-1.22).
    triton          triton on any device; CPU tensors need TRITON_INTERPRET=1 set before
                    triton is first imported (the interpreter is how tests run it on CPU).
    apex            NVIDIA apex FusedLayerNorm (CUDA only, and only if already built).
    torch           plain PyTorch, everywhere.

A forced backend that cannot run raises a clear RuntimeError instead of silently doing
something else; an input a fused kernel does not take (float64, an odd drop-path scale
shape, very wide rows) always falls back to torch, which `backend(...)` does not know
about because it looks at the device only.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

ENV_VAR = "GIGAMIM_KERNELS"
CHOICES = ("auto", "torch", "triton", "apex")


def requested() -> str:
    """The GIGAMIM_KERNELS setting, validated (read on every call, so tests may change it)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # any failure (missing, broken CUDA toolchain) means "not available"
        return False
    return True


@functools.lru_cache(maxsize=None)
def apex_importable() -> bool:
    # Only NVIDIA apex has `apex.normalization`; PyPI's unrelated `apex` fails this import.
    try:
        importlib.import_module("apex.normalization.fused_layer_norm")
    except Exception:
        return False
    return True


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_of(where) -> torch.device:
    if where is None:
        return _default_device()
    if isinstance(where, torch.Tensor):
        return where.device
    return torch.device(where)


@functools.lru_cache(maxsize=None)
def _cuda_driver_usable() -> bool:
    # False on this torch's CUDA build without a GPU or driver: a launch would fail with
    # "CUDA driver version is insufficient", so nothing may pick a hand-launched kernel.
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def _is_fake(where) -> bool:
    """A FakeTensor (or one made while a fake mode is active): it has a device and no storage."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(where, torch.Tensor) and is_fake(where):
        return True
    return detect_fake_mode() is not None


def real_cuda(where=None) -> bool:
    """Whether a kernel launched for `where` (device, name or tensor) reaches a real GPU: a
    CUDA device, a usable driver, and a tensor with storage (not a fake one)."""
    return _device_of(where).type == "cuda" and _cuda_driver_usable() and not _is_fake(where)


def available_backends(device=None) -> list[str]:
    """Backends that can run on `device` (a device, its name, or a tensor; default: cuda if present)."""
    dev = _device_of(device)
    found = ["torch"]
    if triton_importable() and (real_cuda(device) or (dev.type == "cpu" and triton_interpret())):
        found.append("triton")
    if real_cuda(device) and apex_importable():
        found.append("apex")
    return found


def backend(device=None) -> str:
    """The backend a call on `device` (device, name or tensor) will use; raises if a forced one cannot run."""
    dev = _device_of(device)
    want = requested()
    if want == "torch":
        return "torch"
    if want == "triton":
        if not triton_importable():
            raise RuntimeError(f"{ENV_VAR}=triton but `import triton` fails; unset it or install triton")
        if dev.type == "cuda" and not real_cuda(device):
            raise RuntimeError(
                f"{ENV_VAR}=triton needs a real CUDA device, and this is a fake tensor or CUDA has no "
                f"usable driver here; use {ENV_VAR}=auto (torch) for shape-only runs"
            )
        if dev.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"{ENV_VAR}=triton on a {dev.type} tensor needs TRITON_INTERPRET=1 set before triton "
                f"is imported (or use {ENV_VAR}=auto to run torch on CPU)"
            )
        return "triton"
    if want == "apex":
        if not apex_importable():
            raise RuntimeError(
                f"{ENV_VAR}=apex but `apex.normalization` does not import; build NVIDIA apex from "
                "source (PyPI's `apex` is an unrelated package) or unset it"
            )
        if not real_cuda(device):
            raise RuntimeError(f"{ENV_VAR}=apex needs real CUDA tensors, got a {dev.type} tensor"
                               f"{'' if dev.type != 'cuda' else ' that is fake or has no usable driver'}")
        return "apex"
    # auto: torch (see the module docstring for the measurement). Under torch.compile inductor
    # generates its own fused add+LayerNorm.
    return "torch"
