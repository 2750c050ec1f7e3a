"""Learning-rate schedule: linear warmup, then cosine to min_lr, per optimizer step.

LRs in the config are base values per 512 images; with `optim.lr_scaling: linear` (the
SimMIM rule) the run uses base x global_batch / 512.
"""

from __future__ import annotations

import copy
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


def describe_lr(cfg: Config) -> str:
    """The LR rule this run applies, in one line (the training verbs say it at start-up): the
    peak, how it follows from optim.lr, and the warmup and cosine ends."""
    o, peak = cfg.optim, peak_lr(cfg)
    if o.lr_scaling == "linear":
        rule = (f"optim.lr {o.lr:.4g} per 512 images x global batch {cfg.train.global_batch_size} / 512 "
                f"(optim.lr_scaling=linear; lr_scaling=none takes optim.lr as it is)")
    else:
        rule = "optim.lr as it is (optim.lr_scaling=none)"
    warmup = (f"linear warmup from {o.warmup_lr * lr_scale(cfg):.3g} over {o.warmup_steps} steps, "
              if o.warmup_steps else "no warmup, ")
    return (f"LR peak {peak:.4g} = {rule}; {warmup}cosine to {o.min_lr * lr_scale(cfg):.3g} "
            f"at step {cfg.train.max_steps}")


def make_lr_scheduler(cfg: Config):
    """A callable DeepSpeed gives the optimizer to; the engine steps it and saves its state."""
    import torch

    peak = peak_lr(cfg)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak)

    return build


# ---------------------------------------------------------------------- the LR schedule in the meta

# The config keys the LR at a step depends on (`lr_at` above): recorded in every tag's meta.
LR_SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.warmup_lr", "optim.warmup_steps", "optim.lr_scaling",
                    "train.max_steps", "train.global_batch_size")


def lr_schedule_record(cfg: Config) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in LR_SCHEDULE_KEYS}


def lr_schedule_change(saved: dict | None, cfg: Config, step: int) -> str | None:
    """One line when the config's schedule gives another LR at `step` than the saved run's did
    (the config wins; the line says what changed), else None. Tags without a record: None."""
    if not saved:
        return None
    old_cfg = copy.deepcopy(cfg)
    for key, value in saved.items():
        section, leaf = key.split(".")
        if hasattr(getattr(old_cfg, section, None), leaf):
            setattr(getattr(old_cfg, section), leaf, value)
    old, new = lr_at(step, old_cfg), lr_at(step, cfg)
    if abs(old - new) <= 1e-9 * max(abs(old), abs(new), 1e-30):
        return None
    now = lr_schedule_record(cfg)
    changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in LR_SCHEDULE_KEYS if k in saved and saved[k] != now[k])
    return (f"the LR schedule changed since the checkpoint ({changed}): the LR at step {step} is now {new:.4g} "
            f"(the saved run would use {old:.4g}); the config is followed")
