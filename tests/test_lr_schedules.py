"""LR schedules against the official stepping: timm's schedulers driven the way the official
SimMIM / Swin-Transformer training loop drives them (`lr_scheduler.py`: per optimizer step,
`t_in_epochs=False`; `step_update(i)` after optimizer step `i`), read off the optimizer's
parameter groups before each step, compared with gigamim's LR at every step of short runs.

The references are timm's `CosineLRScheduler` (what the official `build_scheduler` builds for
`cosine`, with `warmup_prefix` as in Swin-Transformer or without as in microsoft/SimMIM) and
timm's `MultiStepLRScheduler`; timm's decays at `bisect_right(decay_t, t + 1)` while the
official MultiStepLRScheduler (a timm `Scheduler`) decays at `bisect_right(milestones, t)`, so
the reference is given `decay_t = milestone + 1` (the same count of passed milestones).
"""

from __future__ import annotations

import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.multistep_lr import MultiStepLRScheduler

from gigamim.config import ConfigError, load_config, validate
from gigamim.train.optim import lr_at, lr_schedule_change, lr_schedule_record, make_lr_scheduler


def _official_lrs(cfg, steps: int, scales=(1.0,)):
    """The LR of each parameter group at each optimizer step of the official loop (base LR,
    warmup LR and min LR already scaled per 512 as `main_simmim.py` scales them)."""
    s = cfg.train.global_batch_size / 512.0
    peak, warm, floor = cfg.optim.lr * s, cfg.optim.warmup_lr * s, cfg.optim.min_lr * s
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
    # layer decay: each group's own peak (official get_finetune_param_groups: "lr": lr * scale);
    # (the official t_mul=1. is timm 0.4's name for cycle_mul)
    opt = torch.optim.SGD([{"params": [p], "lr": peak * sc} for p, sc in zip(params, scales)], lr=peak)
    o = cfg.optim
    if o.schedule == "cosine":
        total = cfg.train.max_steps
        sched = CosineLRScheduler(opt, t_initial=(total - o.warmup_steps) if o.warmup_prefix else total, cycle_mul=1.0,
                                  lr_min=floor, warmup_lr_init=warm, warmup_t=o.warmup_steps, cycle_limit=1,
                                  t_in_epochs=False, warmup_prefix=o.warmup_prefix)
    else:
        sched = MultiStepLRScheduler(opt, decay_t=[m + 1 for m in o.milestones], decay_rate=o.gamma,
                                     warmup_t=o.warmup_steps, warmup_lr_init=warm, warmup_prefix=False,
                                     t_in_epochs=False)  # official: milestones count from step 0
    out = []
    for idx in range(steps):
        out.append([g["lr"] for g in opt.param_groups])  # what optimizer.step() uses
        opt.step()
        sched.step_update(idx)  # epoch * num_steps + idx, one epoch here
    return out


_BASE = ["train.global_batch_size=2048", "train.micro_batch_size=128", "optim.lr=1e-4", "optim.warmup_lr=5e-7",
         "optim.min_lr=5e-6"]
CASES = {
    # SwinV2-B / Swin / ViT pretraining (800 ep, warmup 10, x0.1 at 700) shortened: 1 epoch = 4 steps
    "multistep": ["optim.schedule=multistep", "optim.warmup_steps=40", "optim.milestones=[2800]",
                  "train.max_steps=3200", "optim.gamma=0.1"],
    "multistep_two": ["optim.schedule=multistep", "optim.warmup_steps=3", "optim.milestones=[7,12]",
                      "train.max_steps=20", "optim.gamma=0.5"],
    "multistep_no_warmup": ["optim.schedule=multistep", "optim.warmup_steps=0", "optim.milestones=[5]",
                            "train.max_steps=12"],
    # microsoft/SimMIM fine-tuning (cosine over the whole run, warmup inside it)
    "cosine_simmim": ["optim.schedule=cosine", "optim.warmup_prefix=false", "optim.lr=1.25e-3",
                      "optim.warmup_lr=2.5e-7", "optim.min_lr=2.5e-7", "optim.warmup_steps=20", "train.max_steps=100"],
    # Swin-Transformer fine-tuning (WARMUP_PREFIX: cosine after the warmup)
    "cosine_prefix": ["optim.schedule=cosine", "optim.warmup_prefix=true", "optim.lr=1.25e-3",
                      "optim.warmup_lr=2.5e-7", "optim.min_lr=2.5e-7", "optim.warmup_steps=20", "train.max_steps=100"],
    "cosine_no_warmup": ["optim.warmup_steps=0", "train.max_steps=30"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lr_every_step_equals_official_scheduler(case):
    cfg = load_config(None, _BASE + CASES[case])
    validate(cfg, check_files=False)
    steps = cfg.train.max_steps + 5  # past the end too: the cosine's floor
    scales = (1.0, 0.65 ** 3, 0.65 ** 13)  # layer decay: warmup_lr / min_lr are not scaled
    ref = _official_lrs(cfg, steps, scales)
    ours = [[lr_at(k, cfg, sc) for sc in scales] for k in range(steps)]
    worst = max(abs(a - b) / abs(b) for r, o in zip(ref, ours) for a, b in zip(o, r))
    assert worst <= 1e-12, (case, worst)


def test_engine_scheduler_steps_each_group_like_the_official_one():
    """The LambdaLR the engines step (one factor per group, its lr_scale) gives the same LRs."""
    cfg = load_config(None, _BASE + CASES["cosine_simmim"])
    scales = (1.0, 0.5)
    peak = 1.25e-3 * 4
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in scales]
    opt = torch.optim.SGD([{"params": [p], "lr": peak * sc, "lr_scale": sc} for p, sc in zip(params, scales)], lr=peak)
    sched = make_lr_scheduler(cfg)(opt)
    ref = _official_lrs(cfg, 110, scales)
    for k in range(110):
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx(ref[k], rel=1e-12, abs=0), k
        opt.step()
        sched.step()


def test_schedule_values_are_refused_as_the_official_code_would():
    bad = {
        "optim.milestones=[]": "needs milestones",
        "optim.milestones=[5]": "must not exceed the first milestone",  # warmup 10 > 5 (official assert)
        "optim.milestones=[50,20]": "increasing",
    }
    for item, words in bad.items():
        cfg = load_config(None, ["optim.schedule=multistep", "optim.warmup_steps=10", "train.max_steps=100", item])
        with pytest.raises(ConfigError, match=words):
            validate(cfg, check_files=False)
    with pytest.raises(ConfigError, match="optim.schedule"):
        validate(load_config(None, ["optim.schedule=step"]), check_files=False)


def test_resume_check_reports_another_schedule_kind_even_with_the_same_lr_now():
    """In the warmup a cosine and a multistep run give the same LR: the kind is still reported."""
    saved_cfg = load_config(None, ["optim.warmup_steps=100", "train.max_steps=1000"])
    saved = lr_schedule_record(saved_cfg)
    cfg = load_config(None, ["optim.warmup_steps=100", "train.max_steps=1000", "optim.schedule=multistep",
                             "optim.milestones=[700]"])
    assert lr_at(50, cfg) == lr_at(50, saved_cfg)
    line = lr_schedule_change(saved, cfg, 50)
    assert line and "optim.schedule cosine -> multistep" in line
    # milestones moved: same LR now, another one later
    cfg2 = load_config(None, ["optim.warmup_steps=100", "train.max_steps=1000", "optim.schedule=multistep",
                              "optim.milestones=[800]"])
    line = lr_schedule_change(lr_schedule_record(cfg), cfg2, 200)
    assert line and "optim.milestones [700] -> [800]" in line
    assert lr_schedule_change(lr_schedule_record(cfg), cfg, 200) is None
    # a record from before the schedule keys existed ran the cosine: a multistep config is reported
    old = {k: v for k, v in saved.items() if k not in ("optim.schedule", "optim.warmup_prefix", "optim.milestones",
                                                       "optim.gamma")}
    assert "optim.schedule" in (lr_schedule_change(old, cfg, 50) or "")
    assert lr_schedule_change(old, saved_cfg, 50) is None
