"""Learning-rate schedule of a run: the official schedulers (`lr_schedules.py`: linear
warmup from warmup_lr, then cosine to min_lr or multistep), per optimizer step.

LRs in the config are base values per 512 images; with `optim.lr_scaling: linear` (the
SimMIM rule) the run uses base x global_batch / 512 for lr, warmup_lr and min_lr alike.
"""

from __future__ import annotations

import copy

from gigamim.config import Config
from gigamim.lr_schedules import Schedule, lr_for_step


def lr_scale(cfg: Config) -> float:
    return cfg.train.global_batch_size / 512.0 if cfg.optim.lr_scaling == "linear" else 1.0


def peak_lr(cfg: Config) -> float:
    return cfg.optim.lr * lr_scale(cfg)


def schedule_of(cfg: Config) -> Schedule:
    """The run's schedule, LRs scaled by the global batch as the official code scales them."""
    s, o = lr_scale(cfg), cfg.optim
    return Schedule(kind=o.schedule, peak=o.lr * s, warmup_lr=o.warmup_lr * s, min_lr=o.min_lr * s,
                    warmup_steps=o.warmup_steps, total_steps=cfg.train.max_steps, warmup_prefix=o.warmup_prefix,
                    milestones=tuple(o.milestones), gamma=o.gamma)


def lr_at(step: int, cfg: Config, scale: float = 1.0) -> float:
    """The LR used for optimizer step `step` (0-based) by a parameter group whose peak is
    peak x `scale` (layer decay; warmup_lr and min_lr are not scaled, as in the official code)."""
    return lr_for_step(step, schedule_of(cfg), scale)


def lr_factor(step: int, cfg: Config, scale: float = 1.0) -> float:
    """`lr_at` over the group's peak (peak x scale): the LambdaLR factor of that group."""
    return lr_at(step, cfg, scale) / (peak_lr(cfg) * scale)


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
    """A callable DeepSpeed gives the optimizer to; the engine steps it and saves its state.
    One factor per parameter group (its `lr_scale`): LambdaLR multiplies each group's peak."""
    import torch

    def build(optimizer):
        scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lambda step, sc=sc: lr_factor(step, cfg, sc) for sc in scales])

    return build


# ---------------------------------------------------------------------- the LR schedule in the meta

# The config keys the LR at a step depends on (`lr_at` above): recorded in every tag's meta.
LR_SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.warmup_lr", "optim.warmup_steps", "optim.lr_scaling",
                    "train.max_steps", "train.global_batch_size", "optim.schedule", "optim.warmup_prefix",
                    "optim.milestones", "optim.gamma")
# What a record written before the schedule keys existed ran with (the cosine, counted from the
# end of the warmup): an old tag compares as that, not as whatever this config says.
_RECORD_DEFAULTS = {"optim.schedule": "cosine", "optim.warmup_prefix": True, "optim.milestones": [],
                    "optim.gamma": 0.1}


def lr_schedule_record(cfg: Config) -> dict:
    return {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in LR_SCHEDULE_KEYS}


def lr_schedule_change(saved: dict | None, cfg: Config, step: int) -> str | None:
    """One line when the config's schedule gives another LR at `step` than the saved run's did
    (the config wins; the line says what changed), else None. Tags without a record: None."""
    if not saved:
        return None
    old_cfg = copy.deepcopy(cfg)
    saved = {**_RECORD_DEFAULTS, **saved}
    for key, value in saved.items():
        section, leaf = key.split(".")
        if hasattr(getattr(old_cfg, section, None), leaf):
            setattr(getattr(old_cfg, section), leaf, value)
    old, new = lr_at(step, old_cfg), lr_at(step, cfg)
    now = lr_schedule_record(cfg)
    changed = ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in LR_SCHEDULE_KEYS if k in saved and saved[k] != now[k])
    same_lr = abs(old - new) <= 1e-9 * max(abs(old), abs(new), 1e-30)
    # Another kind of schedule (or other milestones / gamma) may give the same LR at this step
    # (in the warmup) and another one later: the kind and its shape are reported regardless.
    shape_keys = ("optim.schedule",) + (("optim.milestones", "optim.gamma") if cfg.optim.schedule == "multistep"
                                         else ("optim.warmup_prefix",))
    if same_lr and not any(saved[k] != now[k] for k in shape_keys):
        return None
    return (f"the LR schedule changed since the checkpoint ({changed}): the LR at step {step} is now {new:.4g} "
            f"(the saved run would use {old:.4g}); the config is followed")
