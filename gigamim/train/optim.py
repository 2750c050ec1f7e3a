"""Learning-rate schedule: linear warmup, then cosine to min_lr, per optimizer step.

LRs in the config are base values per 512 images; with `optim.lr_scaling: linear` (the
SimMIM rule) the run uses base x global_batch / 512.
"""

from __future__ import annotations

import math

from gigamim.config import Config


def lr_scale(cfg: Config) -> float:
    return cfg.train.global_batch_size / 512.0 if cfg.optim.lr_scaling == "linear" else 1.0


def peak_lr(cfg: Config) -> float:
    return cfg.optim.lr * lr_scale(cfg)


def lr_at(step: int, cfg: Config) -> float:
    """The LR used for optimizer step `step` (0-based)."""
    s = lr_scale(cfg)
    peak, floor, start = cfg.optim.lr * s, cfg.optim.min_lr * s, cfg.optim.warmup_lr * s
    warmup, total = cfg.optim.warmup_steps, cfg.train.max_steps
    if step < warmup:
        return start + (peak - start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(cfg: Config):
    """A callable DeepSpeed gives the optimizer to; the engine steps it and saves its state."""
    import torch

    peak = peak_lr(cfg)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak)

    return build
