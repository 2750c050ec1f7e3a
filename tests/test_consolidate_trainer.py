"""`gigamim pretrain` checkpoints through consolidate/export, and resume on another world
size from a universal checkpoint (2 ranks -> 1 and -> 3). Slow: several real launches.

Elastic resume: the data stream continues the same epoch on the new world size (the
loader replays the saved geometry and splits what is left of the epoch over the new
ranks), so over the epoch every sample is trained on exactly once across the change. The
reference is the dataset itself: the keys `make-shards` wrote, read back from the shards
with webdataset, against the keys every rank logged (`log.sample_keys`). Losses after the
change see other batches, so they are compared loosely; the LR schedule exactly.
"""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from gigamim.checkpoint import consolidate, export
from gigamim.models import create_model
from tests.launch import deepspeed_cmd, run, tail
from tests.test_trainer import by_step, pretrain_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# Global batch 12 = micro 2 x {1, 2, 3} ranks x {6, 3, 2} accumulation steps; 96 samples:
# one epoch is 8 steps. The reference stops at 6 (stop_at_step keeps the 8-step schedule).
BATCH = ("train.micro_batch_size=2", "train.global_batch_size=12", "log.sample_keys=true")
EPOCH_STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    return str(write_synthetic_shards(out, 96, image_size=112, samples_per_shard=48))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """6 steps on 2 ranks, checkpoints at 4 and 6: the reference run."""
    wd = tmp_path_factory.mktemp("ref")
    r = run(deepspeed_cmd(2, *pretrain_args(wd, shards, EPOCH_STEPS, "checkpoint.every_steps=4",
                                            "train.stop_at_step=6", *BATCH)), timeout=600)
    assert r.returncode == 0, tail(r.stdout + r.stderr)
    return wd


def test_trainer_checkpoint_consolidates_and_exports(trained, tmp_path):
    out = tmp_path / "full"
    assert consolidate.main([str(trained / "ck"), str(out)]) == 0  # latest = step 6
    sd = load_file(str(out / "model.safetensors"))
    assert "encoder.mask_token" in sd and "decoder.0.weight" in sd
    enc_out = tmp_path / "enc.safetensors"
    assert export.main([str(out), str(enc_out), "--format", "encoder"]) == 0
    enc, md = export.load_export(str(enc_out))
    assert md["step"] == "6" and "swinv2_nano" in md["gigamim_config"]
    create_model("swinv2_nano", img_size=96).load_state_dict(enc, strict=True)


@pytest.mark.parametrize("new_world", [1, 3])
def test_trainer_resumes_universal_on_other_world_size(trained, tmp_path, shards, new_world):
    uni = tmp_path / "uni" / "step_00000004_universal"
    consolidate.to_universal(str(trained / "ck"), tag="step_00000004", out=str(uni))
    r = run(deepspeed_cmd(new_world, *pretrain_args(tmp_path, shards, EPOCH_STEPS, "checkpoint.every_steps=100",
                                                    *BATCH),
                          "--resume", str(uni)), timeout=600)
    assert r.returncode == 0, tail(r.stdout + r.stderr)
    assert "resumed from" in r.stdout + r.stderr
    ref, got = by_step(trained), by_step(tmp_path)
    assert min(got) == 5, "the step counter must continue from the checkpoint"
    for step in (5, 6):
        # the LR schedule (scheduler state) continues exactly
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
        # other batches (the rest of the epoch split another way), same weights: a close loss
        assert math.isfinite(got[step]["loss"])
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=0.15), (step, got[step], ref[step])
    # Every sample of the epoch exactly once across the change: steps 1-4 of the 2-rank run,
    # steps 5-8 of the resumed run.
    seen = _trained_keys(trained, 1, 4) + _trained_keys(tmp_path, 5, EPOCH_STEPS)
    dataset = _dataset_keys(shards)
    assert len(dataset) == 96
    assert sorted(seen) == sorted(dataset), (len(seen), len(set(seen)), len(dataset))


def _trained_keys(workdir, first: int, last: int) -> list[str]:
    import json

    keys, steps = [], set()
    for log in sorted((workdir / "log" / "sample_keys").glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if first <= rec["step"] <= last:
                keys += rec["keys"]
                steps.add(rec["step"])
    assert steps == set(range(first, last + 1)), steps
    return keys


def _dataset_keys(index: str) -> list[str]:
    """The keys in the shards, as webdataset itself reads them (an independent reader)."""
    import json
    import os

    import webdataset as wds

    entries = json.loads(open(index).read())["shards"]
    urls = [e["url"] if os.path.isabs(e["url"]) else os.path.join(os.path.dirname(index), e["url"]) for e in entries]
    return [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
