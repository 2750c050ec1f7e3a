"""`model.init_from`: a real pretraining run (DeepSpeed ZeRO-3, 1 CPU rank) starts from an
imported official SwinV2 SimMIM checkpoint, decoder included, and a file that does not fit is
one line before any weight moves."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from timm.models.swin_transformer_v2 import SwinTransformerV2

from gigamim.checkpoint.official_import import import_official
from gigamim.config import ConfigError
from gigamim.models import SimMIM, create_model
from gigamim.train.init_from import check_and_plan
from gigamim_benchmarks.reference import ReferenceSimMIM
from tests.helpers.randomize import randomize_weights
from tests.launch import deepspeed_cmd, run, tail
from tests.test_official_import import V2, _official_swin_layout


def _imported(tmp_path):
    ref = ReferenceSimMIM(SwinTransformerV2(num_classes=0, **V2))
    randomize_weights(ref, seed=3)
    torch.save({"model": _official_swin_layout(ref, prefix="encoder.")}, tmp_path / "official.pth")
    out = tmp_path / "imported.safetensors"
    import_official(str(tmp_path / "official.pth"), str(out))
    return out


def test_a_file_that_does_not_fit_is_one_line(tmp_path):
    path = _imported(tmp_path)
    with pytest.raises(ConfigError, match=r"model.init_from=.* does not fit model.name: 0 unknown keys .* of another "
                                          r"shape \[\('decoder.0.weight', \(3072, 256, 1, 1\), \(3072, 768, 1, 1\)\)"):
        check_and_plan(str(path), SimMIM(create_model("swinv2_tiny", img_size=64, window_size=4)))
    assert "encoder.mask_token" in check_and_plan(str(path), SimMIM(create_model("swinv2_nano", img_size=64,
                                                                               window_size=4)))


@pytest.mark.slow
def test_pretraining_starts_from_an_imported_official_checkpoint(tmp_path):
    from gigamim.data.synthetic import write_synthetic_shards

    path = _imported(tmp_path)
    shards = write_synthetic_shards(tmp_path / "shards", 16, image_size=80, samples_per_shard=16)
    sets = [f"data.shards={shards}", "model.name=swinv2_nano", "model.img_size=64", "model.window_size=4",
            f"model.init_from={path}", "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=1",
            "optim.lr=1e-30", "optim.warmup_lr=0", "optim.min_lr=0", "optim.warmup_steps=0", "data.num_workers=0",
            "train.precision=fp32", f"checkpoint.dir={tmp_path}/ck", f"log.dir={tmp_path}/log", "log.tensorboard=false",
            "log.progress_bar=false", "log.image_every_steps=0"]
    args = ["pretrain", "--config", "demo"] + [a for s in sets for a in ("--set", s)]
    p = run(deepspeed_cmd(1, *args), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    p = run([*deepspeed_cmd(1)[:1], "-m", "gigamim", "consolidate", f"{tmp_path}/ck", f"{tmp_path}/after.safetensors"])
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    after, want = load_file(f"{tmp_path}/after.safetensors"), load_file(str(path))
    assert set(want) <= set(after)
    for k, v in want.items():  # one step at lr 1e-30: the imported weights, decoder and mask token included
        assert torch.equal(after[k], v.float()), k
