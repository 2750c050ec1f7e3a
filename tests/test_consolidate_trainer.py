"""`gigamim pretrain` checkpoints through consolidate/export, and resume on another world
size from a universal checkpoint (2 ranks -> 1 and -> 3). Slow: several real launches.

The trainer cannot continue the data stream sample-exactly on another world size (it
starts the next epoch), so here the resumed losses are compared loosely; the exact
first-resumed-loss match on a new world size is shown with a fixed global batch in
tests/test_consolidate.py::test_resume_universal_on_other_world_size.

Known at the time of writing (07:45 UTC): `gigamim pretrain` saves its final checkpoint
and then rank 0 does not exit (the launcher waits until killed), so these tests time
out until the trainer's shutdown is fixed; the resume itself was checked by hand (1 rank:
"resumed from .../step_00000004_universal at step 4", lr of steps 5-6 identical).
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

# Global batch 12 = micro 2 x {1, 2, 3} ranks x {6, 3, 2} accumulation steps.
BATCH = ("train.micro_batch_size=2", "train.global_batch_size=12")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    return str(write_synthetic_shards(out, 96, image_size=112, samples_per_shard=48))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards):
    """6 steps on 2 ranks, checkpoints at 4 and 6: the reference run."""
    wd = tmp_path_factory.mktemp("ref")
    r = run(deepspeed_cmd(2, *pretrain_args(wd, shards, 6, "checkpoint.every_steps=4", *BATCH)), timeout=600)
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
    r = run(deepspeed_cmd(new_world, *pretrain_args(tmp_path, shards, 6, "checkpoint.every_steps=100", *BATCH),
                          "--resume", str(uni)), timeout=600)
    assert r.returncode == 0, tail(r.stdout + r.stderr)
    assert "resumed from" in r.stdout + r.stderr
    ref, got = by_step(trained), by_step(tmp_path)
    assert min(got) == 5, "the step counter must continue from the checkpoint"
    for step in (5, 6):
        # the LR schedule (scheduler state) continues exactly
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)
        # other samples (new world size -> next epoch), same weights: a close loss
        assert math.isfinite(got[step]["loss"])
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=0.15), (step, got[step], ref[step])
