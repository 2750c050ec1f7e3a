"""Learning-rate schedules as the official SimMIM / Swin-Transformer code steps them.

The official `lr_scheduler.py` (microsoft/SimMIM and microsoft/Swin-Transformer) builds timm
schedulers per optimizer step (`t_in_epochs=False`), with epochs converted to steps at the
run's batch (`int(EPOCHS * iters_per_epoch)`):

- ``cosine``: timm's ``CosineLRScheduler(t_initial, lr_min, warmup_lr_init, warmup_t,
  cycle_limit=1, warmup_prefix)``. Linear warmup from ``warmup_lr`` over ``warmup_steps``; then
  ``min + (peak - min) (1 + cos(pi t / T)) / 2``. With ``warmup_prefix`` (Swin-Transformer's
  default, ``LR_SCHEDULER.WARMUP_PREFIX: True``) ``t`` counts from the end of the warmup and
  ``T = total - warmup``; without it (microsoft/SimMIM's `lr_scheduler.py`) ``t`` counts from
  step 0 and ``T = total``, so the cosine has already begun when the warmup ends. At and after
  ``T`` the LR is ``min``.
- ``multistep``: the official ``MultiStepLRScheduler`` (a timm ``Scheduler``): the same linear
  warmup, then ``peak * gamma ** (number of milestones <= t)``, ``t`` counted from step 0.
  (timm's own ``MultiStepLRScheduler`` decays one step earlier: ``bisect_right(m, t + 1)``.)

The official training loop calls ``lr_scheduler.step_update(i)`` *after* optimizer step ``i``,
so optimizer step ``k`` runs with the value for update ``k - 1``; step 0 runs with the value
the scheduler set at construction (``warmup_lr`` with a warmup, else the peak). `lr_for_step`
returns exactly that.

Layer-wise LR decay (fine-tuning): each parameter group's peak is ``peak * scale``, while
``warmup_lr`` and ``min_lr`` are the same for every group (timm's scheduler takes one
``warmup_lr_init`` and one ``lr_min`` and each group's own initial LR as its peak).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence, Tuple

SCHEDULES = ("cosine", "multistep")


@dataclass(frozen=True)
class Schedule:
    kind: str  # "cosine" or "multistep"
    peak: float  # the (already batch-scaled) peak LR of a group with scale 1
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    warmup_prefix: bool = True  # cosine only
    milestones: Tuple[int, ...] = ()  # multistep only: optimizer steps
    gamma: float = 0.1  # multistep only

    def problem(self) -> str | None:
        """Why the official scheduler would refuse (or divide by zero on) these values, or None."""
        if self.kind not in SCHEDULES:
            return f"unknown LR schedule {self.kind!r} (one of {', '.join(SCHEDULES)})"
        if self.warmup_steps < 0:
            return f"warmup steps must be >= 0, got {self.warmup_steps}"
        # cosine: a run shorter than its warmup (a smoke run of a recipe: --set train.max_steps=10)
        # never reaches the cosine, and `scheduler_value` holds the floor past a zero-length one.
        if self.kind == "multistep":
            if not self.milestones:
                return "a multistep schedule needs milestones (optimizer steps)"
            if list(self.milestones) != sorted(self.milestones):
                return f"milestones must be in increasing order, got {list(self.milestones)}"
            if self.warmup_steps > min(self.milestones):
                # The official MultiStepLRScheduler asserts warmup_t <= min(milestones).
                return (f"warmup steps ({self.warmup_steps}) must not exceed the first milestone "
                        f"({min(self.milestones)})")
        return None


def scheduler_value(t: int, s: Schedule, scale: float = 1.0) -> float:
    """timm's ``_get_lr(t)`` for the official scheduler of kind ``s.kind``, for a parameter
    group whose peak is ``s.peak * scale``."""
    peak = s.peak * scale
    if t < s.warmup_steps:
        step = (peak - s.warmup_lr) / s.warmup_steps  # timm: (v - warmup_lr_init) / warmup_t
        return s.warmup_lr + t * step
    if s.kind == "multistep":
        return peak * (s.gamma ** bisect.bisect_right(list(s.milestones), t))
    if s.warmup_prefix:
        t = t - s.warmup_steps
        t_initial = s.total_steps - s.warmup_steps
    else:
        t_initial = s.total_steps
    if t_initial <= 0 or t // t_initial >= 1:  # cycle_limit=1: past the first cycle, the floor
        return s.min_lr
    return s.min_lr + 0.5 * (peak - s.min_lr) * (1 + math.cos(math.pi * t / t_initial))


def lr_for_step(step: int, s: Schedule, scale: float = 1.0) -> float:
    """The LR optimizer step ``step`` (0-based) runs with in the official training loop
    (``step_update(i)`` after optimizer step ``i``)."""
    if step <= 0:
        return s.warmup_lr if s.warmup_steps > 0 else s.peak * scale
    return scheduler_value(step - 1, s, scale)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """The official conversion: ``int(EPOCHS * n_iter_per_epoch)``."""
    return int(epochs * steps_per_epoch)


def milestones_to_steps(milestone_epochs: Sequence[int], steps_per_epoch: int) -> list[int]:
    """The official conversion: ``[i * n_iter_per_epoch for i in MULTISTEPS]``."""
    return [int(m) * steps_per_epoch for m in milestone_epochs]


# ImageNet-1k's training set and the official loaders (DistributedSampler + drop_last=True):
# at 16 GPUs x 128 (the configs' batch of 2048), each rank sees ceil(N / 16) = 80,073 images,
# floor(80,073 / 128) = 625 steps per epoch.
IMAGENET1K_TRAIN_IMAGES = 1_281_167


def official_steps_per_epoch(global_batch: int, world_size: int, num_images: int = IMAGENET1K_TRAIN_IMAGES) -> int:
    """``len(data_loader)`` of the official loaders: DistributedSampler (pads to a multiple of
    the world size) then ``drop_last=True`` at the per-GPU batch."""
    per_rank = -(-num_images // world_size)
    return per_rank // (global_batch // world_size)
