"""`gigamim pretrain` for real: DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), real tar shards,
real checkpoints on disk. References are independent of the trainer: a meta-device
parameter count, the uninterrupted run's losses and data digests, files on disk."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import dataclasses

import torch

from gigamim.checkpoint.layout import META_FILE, complete_tags
from gigamim.train.metrics import read_metrics
from tests.helpers.faults import logged_steps, wait_for
from tests.launch import deepspeed_cmd, run, start, tail, torchrun_cmd

pytestmark = pytest.mark.timeout(600)

REQUIRED_METRICS = {"step", "loss", "lr", "grad_norm", "images_per_sec", "data_skipped"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    return str(write_synthetic_shards(out, 192, image_size=112, samples_per_shard=48))


def pretrain_args(workdir: Path, shards: str, steps: int, *extra: str) -> list[str]:
    sets = [
        f"data.shards={shards}", "model.img_size=96", "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.max_steps={steps}", "data.num_workers=1", "data.shuffle_buffer=32", "optim.warmup_steps=2",
        f"checkpoint.dir={workdir}/ck", f"log.dir={workdir}/log", "log.every_steps=1", "log.tensorboard=false",
        "log.progress_bar=false", "log.num_images=2", *extra,
    ]
    args = ["pretrain", "--config", "demo"]
    for s in sets:
        args += ["--set", s]
    return args


def by_step(workdir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(workdir / "log" / "metrics.jsonl")}


def _ok(result):
    assert result.returncode == 0, tail(result.stdout + result.stderr)
    return result


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shards):
    """20 steps in one go on 2 ranks: the reference for the tests below."""
    wd = tmp_path_factory.mktemp("straight")
    _ok(run(deepspeed_cmd(2, *pretrain_args(wd, shards, 20, "checkpoint.every_steps=10"))))
    return wd


def test_loss_falls_and_metrics_logged(straight_run):
    metrics = by_step(straight_run)
    assert sorted(metrics) == list(range(1, 21))
    for m in metrics.values():
        assert REQUIRED_METRICS <= m.keys()
        assert m["data_skipped"] == 0 and m["images_per_sec"] > 0
    first = sum(metrics[s]["loss"] for s in range(1, 4)) / 3
    last = sum(metrics[s]["loss"] for s in range(18, 21)) / 3
    assert last < 0.9 * first, (first, last)
    assert (straight_run / "log" / "reconstructions" / "step_00000020.png").stat().st_size > 1000


def test_zero3_really_partitions(straight_run):
    """Each rank's fp32 optimizer partition holds about half of the model's parameters,
    counted independently on a meta-device copy of the model."""
    from gigamim.config import load_config
    from gigamim.models.build import build_simmim

    cfg = load_config("demo", ["model.img_size=96"])
    with torch.device("meta"):
        total = sum(p.numel() for p in build_simmim(dataclasses.asdict(cfg.model)).parameters())
    tag_dir = straight_run / "ck" / "step_00000020"
    meta = json.loads((tag_dir / META_FILE).read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3 and meta["step"] == 20
    for rank in range(2):
        sd = torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]
        held = sum(t.numel() for t in sd["fp32_flat_groups"])
        assert 0.45 * total < held < 0.56 * total, (rank, held, total)


def test_resume_equals_uninterrupted(straight_run, tmp_path, shards):
    """10 steps, stop (checkpointed), resume, 10 more == 20 straight: same losses, same data."""
    _ok(run(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, 20, "train.stop_at_step=10"))))
    assert complete_tags(tmp_path / "ck") == ["step_00000010"]
    resumed = _ok(run(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, 20), "--resume", "auto")))
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = by_step(straight_run), by_step(tmp_path)
    for step in range(11, 21):
        assert got[step]["data_digest"] == ref[step]["data_digest"], f"different samples at step {step}"
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-7), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-9)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_saves_and_resumes(tmp_path, shards):
    log = tmp_path / "job.log"
    job = start(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, 500, "checkpoint.every_steps=0")), log)
    try:
        wait_for(lambda: logged_steps(tmp_path) >= 3, 240, job, "step 3")
        # A preemption signals every process of the job (SLURM does; the single-node
        # `deepspeed` runner would not forward a SIGTERM sent to it alone).
        os.killpg(job.pid, signal.SIGTERM)
        # poll() reaps the runner, which exits at once; a zombie would keep the group "alive".
        wait_for(lambda: job.poll() is not None and not _group_alive(job.pid), 120,
                  what="the ranks to save and exit")
    finally:
        if _group_alive(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
    tags = complete_tags(tmp_path / "ck")
    assert tags, log.read_text()[-3000:]
    saved = int(tags[-1].split("_")[1])
    assert saved >= 3 and (tmp_path / "ck" / "latest").read_text() == tags[-1]
    assert "checkpoint saved" in log.read_text()
    # Resume with a different LR: the config, not the checkpoint's schedule, decides it.
    new = ("optim.lr=5e-4", "optim.warmup_steps=0")
    resumed = _ok(run(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, saved + 2, *new), "--resume", "auto")))
    assert f"at step {saved}" in resumed.stdout + resumed.stderr
    metrics = by_step(tmp_path)
    assert max(metrics) == saved + 2 and sorted(metrics) == list(range(1, saved + 3))  # no step logged twice
    from gigamim.config import load_config
    from gigamim.train.optim import lr_at

    cfg = load_config("demo", [f"train.max_steps={saved + 2}", *new])
    assert metrics[saved + 1]["lr"] == pytest.approx(lr_at(saved, cfg), rel=1e-9)
    assert metrics[saved + 2]["lr"] == pytest.approx(lr_at(saved + 1, cfg), rel=1e-9)


def test_resume_on_another_world_size_says_convert(straight_run, tmp_path, shards):
    ck = straight_run / "ck"
    result = run(["python", "-m", "gigamim", *pretrain_args(tmp_path, shards, 25, f"checkpoint.dir={ck}"),
                  "--resume", "auto"])
    assert result.returncode == 2, tail(result.stdout + result.stderr)
    assert "saved by 2 ranks" in result.stderr and "--universal" in result.stderr


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, shards):
    """SIGKILL the whole job the moment a checkpoint folder appears (mid-save); `latest`
    must still name a complete checkpoint and `--resume auto` must load it."""
    log = tmp_path / "job.log"
    job = start(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, 500, "checkpoint.every_steps=2")), log)
    try:
        wait_for(lambda: (tmp_path / "ck" / "step_00000004").exists(), 240, job, "the save at step 4")
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    ck = tmp_path / "ck"
    latest = (ck / "latest").read_text().strip()
    assert (ck / latest / META_FILE).is_file(), f"latest names incomplete {latest}"
    # Whatever the kill interrupted, a later half-written folder must be skipped too.
    junk = ck / "step_00000099"
    junk.mkdir()
    (junk / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\x00" * 10)
    saved = int(latest.split("_")[1])
    resumed = _ok(run(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, saved + 1), "--resume", "auto")))
    assert f"at step {saved}" in resumed.stdout + resumed.stderr


def test_nonfinite_loss_stops_without_checkpoint(tmp_path, shards):
    # lr 1e30: one Adam step moves every weight by ~1e30, and the next forward overflows.
    result = run(deepspeed_cmd(2, *pretrain_args(tmp_path, shards, 50, "optim.lr=1e30", "optim.lr_scaling=none",
                                                 "optim.warmup_steps=0", "train.max_nonfinite_steps=3",
                                                 "checkpoint.every_steps=0")))
    out = result.stdout + result.stderr
    assert result.returncode != 0, tail(out)
    assert "3 non-finite losses in a row" in out, tail(out)
    assert not complete_tags(tmp_path / "ck")


@pytest.mark.parametrize("launcher", ["single", "torchrun"])
def test_other_launchers(launcher, tmp_path, shards):
    """The same command without a launcher (1 process) and under torchrun (2 ranks)."""
    args = pretrain_args(tmp_path, shards, 2, "train.global_batch_size=4" if launcher == "single" else "log.every_steps=1")
    cmd = ["python", "-m", "gigamim", *args] if launcher == "single" else torchrun_cmd(2, *args)
    _ok(run(cmd))
    metrics = by_step(tmp_path)
    assert max(metrics) == 2
    meta = json.loads((tmp_path / "ck" / "step_00000002" / META_FILE).read_text())
    assert meta["world_size"] == (1 if launcher == "single" else 2)
