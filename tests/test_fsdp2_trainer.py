"""`gigamim pretrain --set train.engine=fsdp2` for real: FSDP2 on 2 CPU ranks (gloo) under
`gigamim launch`, real tar shards, real DCP checkpoints on disk.

References are independent of the engine: the uninterrupted run's per-step losses (a resume
must give them bit for bit), the keys in the shards as webdataset reads them (every sample of
the epoch once across a change of world size), torch's own DCP converter (`dcp_to_torch_save`)
for the consolidated weights, a plain build's state-dict keys, and timm (strict load, equal
features). The job-wide SIGTERM + resume case is test_faults_launch.py's, parametrised over
the engine.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from gigamim.checkpoint.layout import META_FILE, complete_tags, read_latest
from tests.helpers.faults import launch_cmd, logged_steps, no_traceback, pretrain_args, rank_pids, wait_for
from tests.launch import run, start, tail

pytestmark = pytest.mark.timeout(900)

FSDP2 = "train.engine=fsdp2"
STEPS = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 96, image_size=112, samples_per_shard=48))


def _metrics(workdir):
    from gigamim.train.metrics import read_metrics

    return {m["step"]: m for m in read_metrics(workdir / "log" / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """10 steps in one go on 2 ranks, tags at 5 and 10: the reference run."""
    wd = tmp_path_factory.mktemp("straight")
    done = run(launch_cmd(2, *pretrain_args(wd, shards, STEPS, FSDP2, "checkpoint.every_steps=5")), timeout=600)
    assert done.returncode == 0, tail(done.stdout + done.stderr)
    no_traceback(done.stdout + done.stderr)
    return wd


def test_loss_falls_and_tags_are_resharded_dcp(straight):
    from gigamim.checkpoint.check import check_checkpoint

    metrics = _metrics(straight)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    first = sum(metrics[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(metrics[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < 0.92 * first, (first, last)
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics.values())
    ck = straight / "ck"
    assert complete_tags(ck) == ["step_00000005", "step_00000010"] and read_latest(ck) == "step_00000010"
    meta = json.loads((ck / "step_00000010" / META_FILE).read_text())
    assert meta["engine"] == "fsdp2" and meta["reshardable"] is True and meta["world_size"] == 2
    info = check_checkpoint(ck)
    assert info.format == "dcp" and info.world_size == 2 and len(info.model_files) == 2  # one data file per rank


def test_consolidate_and_export_timm_strict_with_equal_features(straight, tmp_path):
    from safetensors import safe_open
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from gigamim.checkpoint import consolidate, export
    from gigamim.models import create_model
    from gigamim.models.build import build_simmim

    out = tmp_path / "full.safetensors"
    assert consolidate.main([str(straight / "ck"), str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    # the keys of the model's own state dict, and the metadata every consolidation writes
    with torch.device("meta"):
        keys = set(build_simmim({"name": "swinv2_nano", "img_size": 96}).state_dict())
    assert set(got) == keys
    assert {"format", "gigamim_version", "exported_by", "step", "model", "img_size", "source_tag", "source_world_size",
            "zero_stage", "dtype", "gigamim_config"} == set(md)
    assert md["step"] == "10" and md["source_world_size"] == "2" and md["dtype"] == "float32"
    # the weights: what torch's own converter reads out of the DCP files, bit for bit
    dcp_to_torch_save(str(straight / "ck" / "step_00000010"), str(tmp_path / "ref.pt"))
    ref = torch.load(tmp_path / "ref.pt")["model"]
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], ref[k]) for k in keys)

    timm_out = tmp_path / "timm.safetensors"
    assert export.main([str(straight / "ck"), str(timm_out), "--format", "timm"]) == 0
    enc, md = export.load_export(str(timm_out))
    tm = SwinTransformerV2(**json.loads(md["timm_kwargs"])).eval()
    tm.load_state_dict(enc, strict=True)
    ours = create_model("swinv2_nano", img_size=96).eval()
    ours.load_state_dict(enc, strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), tm.forward_features(x), rtol=1e-4, atol=1e-4)


def _kill_job(job):
    """kill -9 of the whole job: every rank, then the launcher."""
    for pid in rank_pids(job.pid).values():
        os.kill(pid, signal.SIGKILL)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)


@pytest.mark.slow
def test_kill9_mid_run_then_resume_auto_is_bit_for_bit(straight, tmp_path, shards):
    args = pretrain_args(tmp_path, shards, STEPS, FSDP2, "checkpoint.every_steps=5")
    job = start(launch_cmd(2, *args), tmp_path / "job.log")
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 7, 300, job, "step 7")  # past the tag at step 5
        _kill_job(job)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert read_latest(tmp_path / "ck") == "step_00000005"
    resumed = run(launch_cmd(2, *args, "--resume", "auto"), timeout=600)
    assert resumed.returncode == 0, tail(resumed.stdout + resumed.stderr)
    assert "at step 5" in resumed.stdout
    ref, got = _metrics(straight), _metrics(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))  # the killed run's steps 6-7 were dropped from the log
    for step in range(6, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "data_digest"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


# Global batch 12 = micro 2 x {1, 2} ranks x {6, 3} accumulation steps; 96 samples: one epoch is
# 8 steps (as test_consolidate_trainer.py's universal-checkpoint case).
ELASTIC = ("train.micro_batch_size=2", "train.global_batch_size=12", "log.sample_keys=true")
EPOCH_STEPS = 8


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_every_sample_once(tmp_path, shards, new_world):
    """A 2-rank tag resumes directly on 1 / 3 ranks (DCP reshards; no conversion): the step, LR
    schedule and data position continue, and over the epoch every sample is trained on once."""
    from tests.test_consolidate_trainer import _dataset_keys, _trained_keys

    ref = tmp_path / "ref"
    done = run(launch_cmd(2, *pretrain_args(ref, shards, EPOCH_STEPS, FSDP2, "checkpoint.every_steps=4",
                                            "train.stop_at_step=6", *ELASTIC)), timeout=600)
    assert done.returncode == 0, tail(done.stdout + done.stderr)
    new = tmp_path / "new"
    args = pretrain_args(new, shards, EPOCH_STEPS, FSDP2, *ELASTIC)
    cmd = launch_cmd(new_world, *args, "--resume", str(ref / "ck" / "step_00000004"))
    done = run(cmd, timeout=600)
    assert done.returncode == 0, tail(done.stdout + done.stderr)
    assert "resumed from" in done.stdout and "at step 4" in done.stdout
    a, b = _metrics(ref), _metrics(new)
    assert min(b) == 5 and max(b) == EPOCH_STEPS
    for step in (5, 6):
        assert b[step]["lr"] == a[step]["lr"]  # the LR schedule continues exactly
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=0.15)  # same weights, other batches
    seen = _trained_keys(ref, 1, 4) + _trained_keys(new, 5, EPOCH_STEPS)
    dataset = _dataset_keys(shards)
    assert len(dataset) == 96 and sorted(seen) == sorted(dataset), (len(seen), len(set(seen)))


def test_damaged_dcp_tag_falls_back_and_names_the_file(straight, tmp_path):
    """The completeness check reads DCP's index: a truncated data file or a missing index makes
    the tag damaged (one line naming the file), and `--resume auto` falls back to the previous
    complete tag, as for DeepSpeed tags."""
    import shutil

    from gigamim.checkpoint.check import check_checkpoint, resolve_checked
    from gigamim.checkpoint.layout import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(straight / "ck", ck)
    victim = ck / "step_00000010" / "__1_0.distcp"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"data file .*__1_0.distcp is damaged .* bytes, its chunks end at"):
        check_checkpoint(ck, "step_00000010")
    resolved, info = resolve_checked(ck, missing_ok=True)
    assert resolved.tag == "step_00000005" and "__1_0.distcp" in resolved.note and info.format == "dcp"
    (ck / "step_00000005" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000005 is incomplete: \.metadata .* is missing"):
        check_checkpoint(ck, "step_00000005")
    with pytest.raises(CheckpointError, match="no undamaged checkpoint"):
        resolve_checked(ck, missing_ok=True)


def test_a_tag_of_the_other_engine_is_refused_in_one_line(straight, tmp_path, shards):
    done = run(launch_cmd(1, *pretrain_args(tmp_path, shards, STEPS + 1, f"checkpoint.dir={straight / 'ck'}",
                                            "train.global_batch_size=4"), "--resume", "auto"), timeout=300)
    assert done.returncode == 2, tail(done.stdout + done.stderr)
    lines = [line for line in done.stderr.splitlines() if "train.engine=fsdp2" in line]
    assert len(lines) == 1 and "train.engine=deepspeed" in lines[0], done.stderr[-3000:]
    no_traceback(done.stdout + done.stderr)
