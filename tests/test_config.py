"""Config loading, overrides, validation and the DeepSpeed config it writes: every bad
config is a one-line error from `gigamim pretrain` that starts no training."""

import json
from pathlib import Path
import math

import pytest

from gigamim.config import ConfigError, load_config, validate
from gigamim.train.engines.deepspeed import build_ds_config
from gigamim.train.optim import lr_at
from gigamim.train.pretrain import main as pretrain_main


@pytest.fixture
def shard(tmp_path):
    import io
    import tarfile

    p = tmp_path / "data-000000.tar"
    # A tar with one member: the start-up check wants one readable shard (the rest is the loader's).
    with tarfile.open(p, "w") as tar:
        info = tarfile.TarInfo("k0.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return p


def _run(argv, tmp_path, capsys, world="1", monkeypatch=None):
    code = pretrain_main(argv + ["--set", f"log.dir={tmp_path / 'log'}", "--set", f"checkpoint.dir={tmp_path / 'ck'}"])
    err = capsys.readouterr().err
    assert not (tmp_path / "log").exists(), "a bad config must not start training"
    return code, err


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 3.0e-4\n  weight_decay: 0.1\ntrain:\n  max_steps: 7\n")
    cfg = load_config(y, ["optim.lr=1e-3", "model.sequential_stages=[0,1]", "model.grad_checkpointing=2"])
    assert cfg.optim.lr == 1e-3  # CLI wins over YAML
    assert cfg.optim.weight_decay == 0.1  # YAML wins over the default 0.05
    assert cfg.train.max_steps == 7
    assert cfg.train.micro_batch_size == 8  # default untouched
    assert cfg.model.sequential_stages == [0, 1] and cfg.model.grad_checkpointing == 2
    assert load_config(None, ["model.grad_checkpointing=true"]).model.grad_checkpointing is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-3", "did you mean 'optim.lr'"),
        ("lr=1e-3", "did you mean 'optim.lr'"),
        ("train.micro_batch_size=eight", "expects an integer"),
        ("model.attn_impl=flash", "must be one of auto, explicit, sdpa, flex"),
        ("model.img_size=200", "divisible by 32"),
        ("data.mask_patch_size=0", "must be > 0"),
        ("data.mask_patch_size=6", "multiple of the model's 4-px patch"),
    ],
)
def test_bad_keys_and_values(override, message, tmp_path, capsys, shard):
    code, err = _run(["--set", f"data.shards={shard}", "--set", override], tmp_path, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


def test_impossible_batch_split(tmp_path, capsys, shard, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, err = _run(["--set", f"data.shards={shard}", "--set", "train.micro_batch_size=4",
                      "--set", "train.global_batch_size=12"], tmp_path, capsys)
    assert code == 2 and "not a multiple" in err and "4 x world size 2 = 8" in err


def test_missing_shard_and_ds_config(tmp_path, capsys, shard):
    code, err = _run(["--set", f"data.shards={tmp_path}/nope-{{000..003}}.tar"], tmp_path, capsys)
    assert code == 2 and "nope-000.tar" in err and "does not exist" in err
    code, err = _run(["--set", f"data.shards={shard}", "--set", "deepspeed.config=missing.json"], tmp_path, capsys)
    assert code == 2 and "missing.json" in err and "not found" in err


def test_ds_template_may_not_set_owned_keys(tmp_path, capsys, shard):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}))
    cfg = load_config(None, [f"deepspeed.config={bad}", f"data.shards={shard}"])
    with pytest.raises(ConfigError, match="gradient_clipping"):
        build_ds_config(cfg, world_size=1, on_gpu=False, peak_lr=1e-3)
    # ... and `gigamim pretrain` says so in one line before any rank starts work
    code, err = _run(["--set", f"data.shards={shard}", "--set", f"deepspeed.config={bad}"], tmp_path, capsys)
    assert code == 2 and "gradient_clipping" in err and len(err.strip().splitlines()) == 1, err


def test_resume_from_missing_checkpoint_is_one_line(tmp_path, capsys, shard):
    code, err = _run(["--set", f"data.shards={shard}", "--resume", str(tmp_path / "nope")], tmp_path, capsys)
    assert code == 2 and "no such checkpoint folder" in err and len(err.strip().splitlines()) == 1, err


def test_ds_config_written_from_gigamim_config(shard):
    cfg = load_config("demo", [f"data.shards={shard}", "train.micro_batch_size=4", "train.global_batch_size=32",
                               "train.grad_clip=3.0", "optim.weight_decay=0.1"])
    validate(cfg, world_size=2)
    ds = build_ds_config(cfg, world_size=2, on_gpu=False, peak_lr=1e-3)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (4 x 2)
    assert ds["gradient_clipping"] == 3.0  # never DeepSpeed's silent default of 1.0
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # CPU: fp32
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["zero_optimization"]["stage"] == 3
    assert build_ds_config(cfg, 2, on_gpu=True, peak_lr=1e-3)["bf16"]["enabled"] is True


def test_lr_schedule_matches_formula():
    """The official stepping: optimizer step k runs with the scheduler's value for update k - 1
    (`step_update(i)` follows optimizer step i), so the peak comes one step after the warmup."""
    cfg = load_config(None, ["optim.lr=1e-4", "optim.min_lr=1e-5", "optim.warmup_lr=1e-6", "optim.warmup_steps=10",
                             "train.max_steps=110", "train.global_batch_size=1024", "train.micro_batch_size=8"])
    s = 1024 / 512  # linear scaling rule
    assert lr_at(0, cfg) == pytest.approx(1e-6 * s)
    assert lr_at(1, cfg) == pytest.approx(1e-6 * s)
    assert lr_at(6, cfg) == pytest.approx((1e-6 + (1e-4 - 1e-6) * 0.5) * s)
    assert lr_at(11, cfg) == pytest.approx(1e-4 * s)
    # halfway through the cosine: the mean of peak and floor
    assert lr_at(61, cfg) == pytest.approx((1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * 0.5))) * s)
    assert lr_at(111, cfg) == pytest.approx(1e-5 * s)
    cfg.optim.lr_scaling = "none"
    assert lr_at(11, cfg) == pytest.approx(1e-4)


def test_packaged_recipes_are_consistent():
    giant = load_config("simmim_swinv2_giant_192")
    validate(giant, world_size=64, check_files=False)  # 36 x 4 x 64 = 9216, the paper's batch
    assert giant.train.global_batch_size == 9216 and giant.optim.lr == 1.4e-3 and giant.train.grad_clip == 100
    base = load_config("simmim_swinv2_base_192")
    validate(base, world_size=16, check_files=False)
    assert base.model.window_size == 12 and base.model.img_size == 192


@pytest.mark.parametrize("name", ["zero3_bf16", "zero3_bf16.json", "ds_configs/zero3_bf16.json",
                                  "gigamim/configs/deepspeed/zero3_bf16.json"])
def test_deepspeed_templates_are_found_from_any_directory(name, tmp_path, monkeypatch):
    """In a checkout the templates are the top-level ds_configs/ (the wheel installs them as
    gigamim/configs/deepspeed/: tests/test_packaging.py); the older spellings saved in old
    checkpoints' configs still resolve."""
    import gigamim
    from gigamim.config import resolve_ds_config_path

    monkeypatch.chdir(tmp_path)
    path = resolve_ds_config_path(name)
    assert path == Path(gigamim.__file__).parent.parent / "ds_configs" / "zero3_bf16.json"
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 3


def test_unknown_deepspeed_template_lists_packaged_ones(tmp_path, monkeypatch):
    from gigamim.config import resolve_ds_config_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'zero9' not found \(packaged: .*zero3_bf16"):
        resolve_ds_config_path("zero9")


def test_finetune_section_is_part_of_the_config():
    """The packaged fine-tune recipes load through the one config loader (the official SimMIM
    Swin-B recipe: layer decay 0.8), `--set finetune.*` overrides them, a list value parses,
    and pretraining's defaults pass the section's validation."""
    cfg = load_config("finetune_swin_base", ["finetune.crop_scale=[0.2, 1.0]", "finetune.ema=true"])
    assert cfg.finetune.layer_decay == 0.8 and cfg.finetune.num_classes == 1000
    assert cfg.finetune.crop_scale == [0.2, 1.0] and cfg.finetune.ema is True
    assert load_config(None, []).finetune.mixup == 0.8
    validate(load_config(None, []), check_files=False)


@pytest.mark.parametrize("item,want", [
    ("finetune.num_classes=1", "finetune.num_classes must be >= 2"),
    ("finetune.layer_decay=0", "finetune.layer_decay must be in (0, 1]"),
    ("finetune.mixup_prob=1.5", "finetune.mixup_prob must be in [0, 1]"),
    ("finetune.label_smoothing=1", "finetune.label_smoothing must be in [0, 1)"),
    ("finetune.crop_scale=[0.9, 0.1]", "finetune.crop_scale must be [min, max]"),
    ("finetune.auto_augment=rand-m9-foo1", "finetune.auto_augment: not a timm augmentation policy: 'rand-m9-foo1'"),
    ("finetune.reprob=1.5", "finetune.reprob must be in [0, 1]"),
    ("finetune.remode=noise", "finetune.remode must be pixel, rand or const"),
    ("finetune.recount=0", "finetune.recount must be >= 1"),
])
def test_bad_finetune_values_are_one_line(item, want):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, [item]), check_files=False)
    assert want in str(e.value) and "\n" not in str(e.value)
