"""The training precision: `train.precision` resolved for the device, and its torch dtype."""

from __future__ import annotations

import contextlib

PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """"auto" is bf16 on GPUs and fp32 on CPUs; anything else as given."""
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def pick_for_device(cfg, on_gpu: bool | None = None) -> str | None:
    """Resolve `deepspeed.config: auto` to the device's packaged template (in the config, so the
    run's saved config names it) and say, in one line, what `auto` became for the template and
    the precision (None when neither is auto). Same answer on every rank of a machine."""
    from gigamim.config import auto_ds_template

    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    parts = []
    if cfg.train.precision == "auto":
        parts.append(f"precision {resolve_precision('auto', on_gpu)} (train.precision=auto)")
    if cfg.deepspeed.config == "auto":
        cfg.deepspeed.config = auto_ds_template(on_gpu)
        parts.append(f"DeepSpeed template {cfg.deepspeed.config} (deepspeed.config=auto)")
    if not parts:
        return None
    return f"{'a GPU' if on_gpu else 'no GPU'} here: " + ", ".join(parts)


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
