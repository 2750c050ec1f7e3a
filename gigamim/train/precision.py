"""The training precision: `train.precision` resolved for the device, and its torch dtype."""

from __future__ import annotations

import contextlib

PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """"auto" is bf16 on GPUs and fp32 on CPUs; anything else as given."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


@contextlib.contextmanager
def default_dtype(name: str):
    """torch's default dtype set to `name` for the block (parameters are created in it)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
