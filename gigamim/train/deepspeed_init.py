"""Build the DeepSpeed config from a template plus the gigamim config.

The template (gigamim/configs/deepspeed/*.json, by name: zero3_bf16, cpu, ...) says how to partition and communicate (ZeRO stage,
offload, buckets). Everything that must agree with the gigamim config (batch sizes,
precision, gradient clipping, the optimizer) is written here from it, and a template
that sets any of those is rejected, so nothing is ever set twice.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from gigamim.config import Config, ConfigError, gradient_accumulation_steps, resolve_ds_config_path

# Keys gigamim owns. DeepSpeed silently defaults some of them (gradient_clipping=1.0),
# so a template setting them would be a second, conflicting source of truth.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)


def load_template(path: str) -> dict:
    p = resolve_ds_config_path(path)
    try:
        tree = json.loads(Path(p).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config '{p}' is not valid JSON: {e}") from None
    clash = [k for k in OWNED_KEYS if k in tree]
    if clash:
        raise ConfigError(
            f"deepspeed.config '{p}' sets {', '.join(clash)}: these come from the gigamim config "
            f"(train.*, optim.*); remove them from the DeepSpeed file"
        )
    return {k: v for k, v in tree.items() if not k.startswith("_")}


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return cfg.train.precision


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def build_ds_config(cfg: Config, world_size: int, on_gpu: bool, peak_lr: float) -> dict:
    ds = load_template(cfg.deepspeed.config)
    precision = resolve_precision(cfg, on_gpu)
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation_steps(cfg, world_size)
    ds["train_batch_size"] = cfg.train.global_batch_size
    ds["gradient_clipping"] = float(cfg.train.grad_clip)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 1000}
    if precision != "bf16" and ds.get("communication_data_type") == "bf16":
        ds.pop("communication_data_type")
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": peak_lr,
            "betas": list(cfg.optim.betas),
            "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
        },
    }
    # DeepSpeed picks DeepSpeedCPUAdam when the optimizer is offloaded and FusedAdam on
    # GPUs; on CPU ranks without offload, torch's AdamW (no op to JIT-build).
    if not on_gpu and not offloads_optimizer(ds):
        ds["optimizer"]["params"]["torch_adam"] = True
    return ds


PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def build_engine(cfg: Config, build_model, world_size: int, on_gpu: bool, load_universal: bool = False,
                 groups=None, partition_at_build: bool = True, after_build=None):
    """(engine, lr_scheduler, model, zero stage): the model built under `zero.Init` for ZeRO-3
    (no rank ever holds the whole model: parameters are partitioned as they are made), on the
    rank's GPU for ZeRO-0/1/2 (each rank holds it anyway), then `deepspeed.initialize` with
    gigamim's param groups and schedule; `model.compile` compiles each block afterwards (ZeRO-3:
    the blocks are registered as z3 leaf modules first, one gather per block).

    `build_model()` returns a plain nn.Module. Seeds are the caller's business (the same
    seed on every rank before this call gives every rank the same initial weights).
    groups(model): the optimizer's param groups (default: `models.param_groups`, one LR).
    partition_at_build=False: `build_model()` is called plainly (a whole model handed over);
    DeepSpeed partitions it at initialize. after_build(model): called once the model exists,
    outside `zero.Init` and before `initialize` copies it into the optimizer's partitions (the
    place to read pretrained weights into a partitioned model)."""
    import deepspeed

    from gigamim.models.param_groups import param_groups
    from gigamim.train.optim import make_lr_scheduler, peak_lr

    ds_config = build_ds_config(cfg, world_size, on_gpu, peak_lr=peak_lr(cfg))
    precision = resolve_precision(cfg, on_gpu)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    stage = zero_stage(ds_config)
    if not partition_at_build:
        model = build_model()
    elif stage == 3:
        # The dtype comes from the config's bf16/fp16 flags. Do not pass dtype= : in
        # DeepSpeed 0.19 an explicit dtype is overridden by an operator-precedence slip
        # (`dtype or fp16 if ... else bf16`), which gives bf16 on CPU ranks.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model()
    elif on_gpu:
        # ZeRO-0/1/2 keep full parameters on every rank: build them straight on this rank's
        # GPU in the training dtype (SwinV2-G in bf16: 6 GB, never 12 GB of fp32 weights, no
        # host copy); DeepSpeed makes the fp32 master partitions from them, initialize()
        # broadcasts rank 0's weights.
        import torch
        from deepspeed.accelerator import get_accelerator

        with torch.device(get_accelerator().current_device_name()), default_dtype(PRECISION_DTYPES[precision]):
            model = build_model()
    else:
        model = build_model()
    if after_build is not None:
        after_build(model)
    if cfg.model.compile and stage == 3:
        from gigamim.train.compile import mark_z3_leaf_blocks

        # Before initialize: DeepSpeed installs its per-module hooks there; a leaf block gets
        # one hook (one gather), and its inside is free for the compiler.
        mark_z3_leaf_blocks(model)
    groups = groups or (lambda m: param_groups(m, cfg.optim.weight_decay))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups(model), config=ds_config,
        lr_scheduler=make_lr_scheduler(cfg), dist_init_required=False,
    )
    if cfg.model.compile:
        from gigamim.train.compile import compile_blocks

        compile_blocks(engine, zero_stage=stage, mode=cfg.model.compile_mode)
    return engine, scheduler, model, stage
