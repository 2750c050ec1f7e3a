"""The training-engine seam: `train.engine` names one backend, one file each.

    deepspeed   DeepSpeed ZeRO 0-3 (the default; its template in `deepspeed.config`)
    fsdp2       PyTorch FSDP2, a `fully_shard` unit per block, DCP checkpoints (`fsdp:` section)

Outside this package (and the readers of DeepSpeed's checkpoint format in `checkpoint/`),
nothing in gigamim imports an engine's library or switches on an engine's name: the trainer,
the step, the tasks and the checkpoint code talk to `base.Engine`.
"""

from __future__ import annotations

import importlib

from gigamim.config import ConfigError

# name -> "module:class", imported on first use (an engine's library is heavy to import).
ENGINES = {
    "deepspeed": "gigamim.train.engines.deepspeed:DeepSpeedEngine",
    "fsdp2": "gigamim.train.engines.fsdp2:FSDP2Engine",
}


def engine_class(cfg):
    """The engine class `cfg.train.engine` names (its config checks are class methods)."""
    name = cfg.train.engine
    if name not in ENGINES:
        raise ConfigError(f"train.engine={name!r} is not one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_engine_config(cfg) -> None:
    """Before any process group: the engine exists and accepts its part of the config."""
    engine_class(cfg).check_config(cfg)


def partitions_at_build(cfg) -> bool:
    """Whether the configured engine keeps the whole model off every rank (ZeRO-3, FSDP)."""
    return engine_class(cfg).partitions_at_build(cfg)


def create_engine(cfg, dist, precision: str):
    """The configured engine, for this rank of the process group `dist` (`runtime.dist.DistInfo`)."""
    return engine_class(cfg)(cfg, dist, precision)
