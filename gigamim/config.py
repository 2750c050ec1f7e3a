"""gigamim's run configuration: typed sections, YAML files, `--set a.b=value` overrides.

Precedence is CLI (`--set`) > YAML file > dataclass defaults. The resolved config is the
single source of truth for a run: the trainer writes batch sizes, precision, clipping and
optimizer settings from it into the DeepSpeed config (see `train/engines/deepspeed.py`), so they
are never set in two places.

Errors are `ConfigError`s with one clear line (unknown key with the closest valid one,
wrong type, impossible batch split, missing file), raised before any rank does work.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message is one clear line."""


@dataclass
class ModelConfig:
    name: str = "swinv2_nano"
    img_size: int = 192
    window_size: int | None = None  # None: the variant's default for img_size
    pretrained_window_sizes: list[int] | None = None
    drop_path_rate: float = 0.0
    # "auto" (the measured default of the device: explicit on CPU, sdpa on GPU), "explicit"
    # (reference), "sdpa", "flex" (FlexAttention: CPB bias and shift mask inside the kernel)
    attn_impl: str = "auto"
    sequential_stages: list[int] = field(default_factory=list)  # stages whose attention runs in chunks
    attn_chunk: int = 64  # windows per chunk for sequential stages
    # False, True (every block), k (every k-th block) or a list of stage ids.
    grad_checkpointing: bool | int | list[int] = False
    checkpoint_offload: bool = False  # keep checkpointed activations on the CPU
    # torch.compile each block (ZeRO-3: blocks become z3 leaf modules, one gather per block)
    compile: bool = False
    compile_mode: str = "default"  # default, reduce-overhead (not with ZeRO-3), max-autotune, max-autotune-no-cudagraphs
    # pretraining only: start from these weights (gigamim safetensors: `gigamim import` of an
    # official SimMIM checkpoint, or an export); a --resume overrides them
    init_from: str = ""


@dataclass
class DataConfig:
    shards: str = ""  # brace pattern, comma-separated list, or an index.json
    num_workers: int = 2
    mode: str = "epoch"  # "epoch" (each sample once per epoch) or "resampled"
    shuffle_buffer: int = 1000
    mask_ratio: float = 0.6
    mask_patch_size: int = 32
    # SimMIM's normalised target (official SwinV2 config NORM_TARGET): the target pixels are
    # normalised by their local mean / variance over norm_target_patch x norm_target_patch
    norm_target: bool = False
    norm_target_patch: int = 47
    # Which tar member is the image: None = the default priority (jpg, jpeg, png, webp, ...),
    # or e.g. "input.jpg;png" (first match wins), webdataset's key naming
    image_key: str | None = None
    cache_dir: str | None = None  # per-node cache of remote shards (pipe:/s3:/https:), None = no cache
    cache_size: str | None = None  # cache bound, e.g. "200GB" (None: unbounded)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: int = 16  # = micro x accumulation x world size
    max_steps: int = 100
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32
    engine: str = "deepspeed"  # the training engine (train/engines): deepspeed (ZeRO, `deepspeed:`) or fsdp2 (`fsdp:`)
    grad_clip: float = 5.0  # 0 disables; DeepSpeed's own default (1.0) is never used
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    # End this job after this step, checkpointed (0: run to max_steps). For scheduler time
    # limits: the LR schedule still spans max_steps, and `--resume auto` continues.
    stop_at_step: int = 0
    # Also end it, checkpointed (exit 0), this long after start: seconds or "3h50m", "90m",
    # "1d2h", "HH:MM:SS" (0: no time limit). Set it below the scheduler's limit minus a save.
    stop_after: int | str = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4  # base LR per 512 images (scaled linearly with the global batch)
    min_lr: float = 5e-6  # base LR at the end of the cosine, scaled the same way
    warmup_lr: float = 5e-7  # base LR at step 0, scaled the same way
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_scaling: str = "linear"  # "linear" (x global_batch/512) or "none" (lr is absolute)
    # The official schedulers (lr_schedules.py), per optimizer step: "cosine" (to min_lr)
    # or "multistep" (x gamma at each of milestones, optimizer steps), both after the warmup.
    schedule: str = "cosine"
    # cosine only: True counts the cosine from the end of the warmup (Swin-Transformer's
    # WARMUP_PREFIX default); False from step 0 over max_steps (microsoft/SimMIM's scheduler)
    warmup_prefix: bool = True
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class CheckpointConfig:
    dir: str = "runs/simmim/checkpoints"
    every_steps: int = 1000  # 0: only at the end (and on SIGTERM)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    # Write tags in the background (the step loop waits only for a host copy of the state):
    # auto/true = on (deepspeed: gigamim's snapshot writer; fsdp2: DCP async_save); false = never.
    # The last save of a run and a SIGTERM / stop_after save are always waited for.
    async_save: bool | str = "auto"


@dataclass
class LogConfig:
    dir: str = "runs/simmim/logs"
    every_steps: int = 10
    tensorboard: bool = True
    image_every_steps: int = 0  # a reconstruction PNG every N steps (0: only at the end)
    num_images: int = 4
    progress_bar: bool = True
    # Audit trail: every rank appends the sample keys each step trained on (padding repeats
    # and substitutes left out) to <log.dir>/sample_keys/rank<R>.jsonl
    sample_keys: bool = False


@dataclass
class DeepSpeedSection:
    # template file, or a packaged name (ds_configs/): ZeRO stage, offload, comms; "auto" is the
    # device's: zero3_bf16 where a GPU is visible, cpu (ZeRO-3 for CPU ranks) where none is
    config: str = "auto"


@dataclass
class FsdpSection:
    """train.engine=fsdp2 only: PyTorch FSDP2, each block its own `fully_shard` unit."""

    reshard_after_forward: bool = True  # free gathered parameters after each block's forward (ZeRO-3-like)
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer states in host memory (GPU runs)
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype: fp32 (default, also under bf16) or bf16


@dataclass
class FinetuneConfig:
    """`gigamim finetune` only (classification fine-tuning); pretraining ignores it."""

    # consolidated SimMIM / exported encoder / DeepSpeed checkpoint; "" = from scratch. The model
    # (model.name, img_size, window_size, pretrained windows) comes from the weights' recorded run
    # unless the config gives it explicitly (`gigamim finetune` says what it took).
    weights: str = ""
    num_classes: int = 0  # 0: the number of classes the training shards' index.json lists
    train_shards: str = ""  # labelled shards (make-shards of an ImageFolder: .cls members)
    val_shards: str = ""
    eval_every_steps: int = 0  # 0: only at the end
    layer_decay: float = 0.75  # 1.0 = off; official: SwinV2-B 0.75, Swin-B 0.8, Swin-L 0.7, ViT-B 0.65
    mixup: float = 0.8  # Mixup alpha (0 off)
    cutmix: float = 1.0  # CutMix alpha (0 off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    ema: bool = False  # timm ModelEmaV3 of the weights (ZeRO 0-2: needs whole parameters per rank)
    ema_decay: float = 0.9999
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    hflip: bool = True
    # The official loaders' augmentation (timm's create_transform with the AUG.* defaults of
    # microsoft/SimMIM and microsoft/Swin-Transformer config.py); timm's color jitter is skipped
    # whenever a policy is set, so the official pipeline has none (AUG.COLOR_JITTER unused).
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm policy string (RandAugment 'rand-*', 'augmix-*', 'v0'); "" off
    reprob: float = 0.25  # random erasing probability per image (0 off), on the normalised image
    remode: str = "pixel"  # erased box fill: pixel (per-pixel N(0,1)), rand (per-channel), const (zero)
    recount: int = 1  # erasing boxes per image: 1..recount
    interpolation: str = "bicubic"  # the crops' (and the augmentation ops') resampling: bicubic (official) or bilinear


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    fsdp: FsdpSection = field(default_factory=FsdpSection)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- loading


def _all_keys() -> list[str]:
    sections = typing.get_type_hints(Config)
    return [f"{name}.{leaf}" for name, cls in sections.items() for leaf in typing.get_type_hints(cls)]


def _unknown_key_error(key: str) -> ConfigError:
    valid = _all_keys()
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    # A bare leaf name ("lr") is a common slip: suggest its full dotted name.
    if not close:
        close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, hint) -> Any:
    """Check/convert one leaf value against its annotated type; errors name key and value."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return None
        errors = []
        # bool before int: YAML's `true` must not become 1, and 1 must not become True.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is not bool):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1] if errors else ConfigError(f"config key '{key}': bad value {value!r}")
    if origin is list:
        if isinstance(value, (int, str)) and not isinstance(value, bool) and args and args[0] is int:
            value = [value] if isinstance(value, int) else [int(v) for v in str(value).split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise _unknown_key_error(key)
    section_name, leaf = parts
    if section_name not in {f.name for f in dataclasses.fields(Config)}:
        raise _unknown_key_error(key)
    section = getattr(cfg, section_name)
    hints = typing.get_type_hints(type(section))
    if leaf not in hints:
        raise _unknown_key_error(key)
    setattr(section, leaf, _coerce(key, value, hints[leaf]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            flat.update(_flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config path as given, else a packaged config by file name or stem (`demo`)."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = Path(__file__).parent / "configs"
    for candidate in (packaged / p.name, packaged / f"{p.name}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(c.stem for c in packaged.glob("*.yaml"))
    raise ConfigError(f"config file '{path}' not found (packaged configs: {', '.join(names)})")


def explicit_keys(cfg: Config) -> frozenset[str]:
    """The dotted keys the YAML file or a `--set` gave (`load_config` records them): what a
    run takes from elsewhere (fine-tuning: the weights' model) yields to these. A config built
    in code has no record: its keys that differ from the defaults count as given."""
    given = getattr(cfg, "explicit", None)
    if given is not None:
        return frozenset(given)
    default = Config()
    return frozenset(key for key in _all_keys()
                     if getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
                     != getattr(getattr(default, key.split(".")[0]), key.split(".")[1]))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `--set` overrides, each key checked. The keys given
    are recorded (`explicit_keys`)."""
    cfg = Config()
    given: set[str] = set()
    if path is not None:
        p = resolve_config_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            # PyYAML's own text spans lines; its mark says where (0-based line and column).
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file '{p}' is not valid YAML{where}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must be a mapping of sections")
        for key, value in _flatten(tree).items():
            _apply(cfg, key, value)
            given.add(key)
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(cfg, key, value)
        given.add(key)
    cfg.explicit = frozenset(given)  # not a dataclass field: never dumped, copied with the config
    return cfg


# --------------------------------------------------------------------------- validation

_CHOICES = {
    "model.attn_impl": ("auto", "explicit", "sdpa", "flex"),
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "data.mode": ("epoch", "resampled"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "optim.lr_scaling": ("linear", "none"),
    "optim.schedule": ("cosine", "multistep"),
    "fsdp.reduce_dtype": ("fp32", "bf16"),
}


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x world size {world_size} = {per_step}; "
            f"global = micro x accumulation x world"
        )
    return cfg.train.global_batch_size // per_step


def validate(cfg: Config, world_size: int = 1, check_files: bool = True) -> None:
    """Everything that can be checked before a rank builds a model or reads a shard."""
    try:
        parse_duration(cfg.train.stop_after)
    except ValueError as e:
        raise ConfigError(f"config key 'train.stop_after': {e}") from None
    for key, choices in _CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
    positive = {
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.max_steps": cfg.train.max_steps,
        "model.img_size": cfg.model.img_size,
        "optim.lr": cfg.optim.lr,
        "log.every_steps": cfg.log.every_steps,
        "model.attn_chunk": cfg.model.attn_chunk,
        "data.mask_patch_size": cfg.data.mask_patch_size,
        "data.norm_target_patch": cfg.data.norm_target_patch,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0; got {value!r}")
    if cfg.checkpoint.async_save not in (True, False, "auto"):
        raise ConfigError(f"config key 'checkpoint.async_save' must be auto, true or false; got "
                          f"{cfg.checkpoint.async_save!r}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0 (0: read in the training process); "
                          f"got {cfg.data.num_workers!r}")
    _validate_model(cfg)
    if not 0.0 < cfg.data.mask_ratio < 1.0:
        raise ConfigError(f"data.mask_ratio must be in (0, 1); got {cfg.data.mask_ratio}")
    if cfg.data.norm_target_patch % 2 == 0:
        raise ConfigError(f"data.norm_target_patch must be odd (a centred window); got {cfg.data.norm_target_patch}")
    try:
        from gigamim.sizes import parse_size

        parse_size(cfg.data.cache_size)
    except ValueError as e:
        raise ConfigError(f"config key 'data.cache_size': {e}") from None
    _validate_finetune(cfg.finetune)
    from gigamim.lr_schedules import Schedule

    problem = Schedule(cfg.optim.schedule, cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.min_lr, cfg.optim.warmup_steps,
                       cfg.train.max_steps, cfg.optim.warmup_prefix, tuple(cfg.optim.milestones),
                       cfg.optim.gamma).problem()
    if problem:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule}: {problem}")
    gradient_accumulation_steps(cfg, world_size)
    if check_files:
        if not str(cfg.data.shards).strip():
            raise ConfigError("data.shards is empty: give a brace pattern, a list, a folder or an index.json of tar shards")
        missing = missing_local_shards(cfg.data.shards)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"data.shards: shard file '{missing[0]}' does not exist{more}")
        resolve_ds_config_path(cfg.deepspeed.config)


def _validate_model(cfg: Config) -> None:
    """The model-shape rules are the model family's (`gigamim.models.build.check_model_section`)."""
    from gigamim.models.build import check_model_section
    from gigamim.models.family import ModelConfigError

    try:
        check_model_section(dataclasses.asdict(cfg.model), dataclasses.asdict(ModelConfig()), cfg.data.mask_patch_size)
    except ModelConfigError as e:
        key = f"{'data' if e.key == 'mask_patch_size' else 'model'}.{e.key}"
        raise ConfigError(f"config key '{key}': {e}") from None


def _validate_finetune(ft: FinetuneConfig) -> None:
    """The finetune section's ranges (the defaults pass, so pretraining is never refused here)."""
    if ft.num_classes < 2 and ft.num_classes != 0:
        raise ConfigError(f"finetune.num_classes must be >= 2 (or 0: from the training shards' classes), "
                          f"got {ft.num_classes}")
    if ft.eval_every_steps < 0:
        raise ConfigError(f"finetune.eval_every_steps must be >= 0 (0: only at the end); got {ft.eval_every_steps}")
    if not 0.0 < ft.layer_decay <= 1.0:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1] (1: off); got {ft.layer_decay}")
    for key in ("mixup", "cutmix"):
        if getattr(ft, key) < 0:
            raise ConfigError(f"finetune.{key} must be >= 0 (0: off); got {getattr(ft, key)}")
    for key in ("mixup_prob", "mixup_switch_prob"):
        if not 0.0 <= getattr(ft, key) <= 1.0:
            raise ConfigError(f"finetune.{key} must be in [0, 1]; got {getattr(ft, key)}")
    if not 0.0 <= ft.label_smoothing < 1.0:
        raise ConfigError(f"finetune.label_smoothing must be in [0, 1); got {ft.label_smoothing}")
    if not 0.0 < ft.ema_decay < 1.0:
        raise ConfigError(f"finetune.ema_decay must be in (0, 1); got {ft.ema_decay}")
    if len(ft.crop_scale) != 2 or not 0.0 < ft.crop_scale[0] <= ft.crop_scale[1] <= 1.0:
        raise ConfigError(f"finetune.crop_scale must be [min, max] with 0 < min <= max <= 1; got {ft.crop_scale}")
    if not 0.0 <= ft.reprob <= 1.0:
        raise ConfigError(f"finetune.reprob must be in [0, 1] (0: no random erasing); got {ft.reprob}")
    if ft.remode not in ("pixel", "rand", "const"):
        raise ConfigError(f"finetune.remode must be pixel, rand or const; got {ft.remode!r}")
    if ft.recount < 1:
        raise ConfigError(f"finetune.recount must be >= 1; got {ft.recount}")
    from gigamim.data.transforms import auto_augment_transform, resampling

    try:
        resampling(ft.interpolation)  # the crop's own rule and message
    except ValueError as e:
        raise ConfigError(f"finetune.{e}") from None
    if ft.auto_augment and ft.auto_augment != "none":
        try:
            auto_augment_transform(str(ft.auto_augment), 224)
        except ValueError as e:
            raise ConfigError(f"finetune.auto_augment: {e} (e.g. rand-m9-mstd0.5-inc1; \"\" for none)") from None


def missing_local_shards(spec) -> list[str]:
    """Local shard files in `spec` that do not exist (remote and `pipe:` URLs are not checked),
    by the one shard-spec parser (`gigamim.data.shardspec`, which the loader uses too). A spec
    that means no shard list (unbalanced braces, empty folder, bad index) is a ConfigError."""
    from gigamim.data import shardspec

    try:
        return shardspec.missing_local_shards(spec)
    except shardspec.ShardSpecError as exc:
        raise ConfigError(f"data.shards: {exc}") from None


AUTO_TEMPLATES = {"gpu": "zero3_bf16", "cpu": "cpu"}


def auto_ds_template(on_gpu: bool | None = None) -> str:
    """The packaged template `deepspeed.config: auto` means on this machine: ZeRO-3 in bf16 on
    GPUs, the CPU ranks' ZeRO-3 template (small buckets, no comm overlap) without one."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return AUTO_TEMPLATES["gpu" if on_gpu else "cpu"]


def ds_template_dir() -> Path:
    """Where the packaged DeepSpeed templates are: the checkout's top-level `ds_configs/`, or,
    installed from a wheel, `gigamim/configs/deepspeed/` (setup.py maps one to the other)."""
    here = Path(__file__).parent
    checkout = here.parent / "ds_configs"
    return checkout if (checkout / "zero3_bf16.json").is_file() else here / "configs" / "deepspeed"


def resolve_ds_config_path(path: str) -> Path:
    """The DeepSpeed template as given, else a packaged one (`ds_template_dir()`) by name:
    `zero3_bf16`, `zero3_bf16.json`, `ds_configs/zero3_bf16.json` (the pre-0.2 spelling, still
    in the configs saved with old checkpoints, so they resume) or
    `gigamim/configs/deepspeed/zero3_bf16.json` (where 0.1 kept them); `auto`: `auto_ds_template`."""
    if path == "auto":
        path = auto_ds_template()
    p = Path(path)
    if p.is_file():
        return p
    packaged = ds_template_dir()
    for candidate in (packaged / p.name, packaged / f"{p.name}.json"):
        if candidate.is_file():
            return candidate
    names = sorted(c.stem for c in packaged.glob("*.json"))
    raise ConfigError(f"deepspeed.config: DeepSpeed config file '{path}' not found (packaged: {', '.join(names)})")


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value) -> float:
    """`train.stop_after` -> seconds (0: none). Seconds as a number, "3h50m" / "90m" / "1d2h" /
    "45s" (units d h m s, each at most once, in that order), or SLURM's "[D-]HH:MM:SS"."""
    import re

    if value in (None, "", 0):
        return 0.0
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 3h50m, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    text = str(value).strip().lower()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", text)
    if m:
        days, h, mi, sec = (int(g or 0) for g in m.groups())
        return float(days * 86400 + h * 3600 + mi * 60 + sec)
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or not m:
        raise ValueError(f"expected a duration such as 3h50m, 90m, 45s or 03:50:00, got {value!r}")
    return float(sum(float(g) * _UNITS[u] for g, u in zip(m.groups(), "dhms") if g))
