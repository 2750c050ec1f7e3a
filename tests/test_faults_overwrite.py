"""A run never overwrites another run's work, the resume point is chosen under the run lock,
and background saves never leave `latest` on a half-written tag (issue 21), on real CPU ranks
(DeepSpeed ZeRO-3 / FSDP2, gloo, real tar shards, real checkpoints on disk)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigamim.checkpoint.layout import META_FILE, complete_tags, read_latest
from tests.helpers.faults import (kill_rank, launch_cmd, losses, no_traceback, pretrain_args, sigterm_job,
                                  signal_job)
from tests.launch import REPO, cpu_env, free_port, run

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 96, image_size=112, samples_per_shard=48))


def _digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (the run lock aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".lock":
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _read_only_bind(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        return False
    subprocess.run(["mount", "-o", "remount,ro,bind", str(dst)], check=True, capture_output=True)
    return True


def test_fresh_start_never_overwrites_a_run(tmp_path, shards):
    first = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 4, "checkpoint.every_steps=2")))
    assert first.returncode == 0, first.stderr[-3000:]
    assert complete_tags(tmp_path / "ck") == ["step_00000002", "step_00000004"]
    # A quiet console (item 5): gigamim's lines, no FutureWarning raised inside DeepSpeed, no
    # per-rank start-up warnings (this run has no progress bar).
    console = [line for line in (first.stdout + first.stderr).splitlines() if line.strip()]
    assert len(console) <= 10 and not any("FutureWarning" in line for line in console), "\n".join(console)
    ck_before, log_before = _digest(tmp_path / "ck"), _digest(tmp_path / "log")
    assert "metrics.jsonl" in log_before

    # The resubmitted job: same folders, another seed and length, no --resume.
    t0 = time.monotonic()
    second = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 2, "train.seed=1")))
    took = time.monotonic() - t0
    out = (second.stdout + second.stderr).strip()
    assert second.returncode == 2, out[-3000:]
    no_traceback(out)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    for needle in (str(tmp_path / "ck"), "step_00000004", "--resume auto", "--overwrite", "metrics"):
        assert needle in lines[0], lines[0]
    assert _digest(tmp_path / "ck") == ck_before and _digest(tmp_path / "log") == log_before
    print(f"refused in {took:.1f} s")

    # consolidate --universal into a read-only copy of the folder: one line, exit 2.
    ro = tmp_path / "ro"
    if _read_only_bind(tmp_path / "ck", ro):
        try:
            done = subprocess.run([sys.executable, "-m", "gigamim", "consolidate", str(ro), "--universal"],
                                  capture_output=True, text=True, cwd=REPO, env=cpu_env(), timeout=300)
            err = (done.stdout + done.stderr).strip()
            assert done.returncode == 2, err[-3000:]
            no_traceback(err)
            assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]]
            assert "Read-only file system" in err and "writable" in err and "Resume" not in err
        finally:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)

    # --overwrite: the old run is moved aside, byte for byte, and the new one starts at step 0.
    third = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 2, "train.seed=1"), "--overwrite"))
    assert third.returncode == 0, third.stderr[-3000:]
    (moved,) = list((tmp_path / "ck" / "replaced").iterdir())
    # every tag and `latest` (DeepSpeed's zero_to_fp32.py helpers beside them are rewritten by each run)
    assert _digest(moved) == {k: v for k, v in ck_before.items() if not k.startswith("zero_to_")}
    (moved_log,) = list((tmp_path / "log" / "replaced").iterdir())
    assert _digest(moved_log) == log_before
    assert complete_tags(tmp_path / "ck") == ["step_00000002"] and read_latest(tmp_path / "ck") == "step_00000002"
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"rank 0 exited ({proc.returncode}) before it listened on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"rank 0 never listened on {port}")


def test_resume_point_is_chosen_under_the_lock(tmp_path, shards):
    """Rank 0 starts alone (`--resume auto`) and waits in the process group for rank 1; meanwhile
    the folder changes as a run ending in between would change it (its newest tag pruned,
    `latest` moved). The rank must load what the folder holds when it holds the lock: not the
    tag it saw at start-up (which no longer exists)."""
    first = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 4, "checkpoint.every_steps=2")))
    assert first.returncode == 0, first.stderr[-3000:]
    port = free_port()
    args = pretrain_args(tmp_path, shards, 5)[1:] + ["--resume", "auto"]
    env = dict(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    rank0 = subprocess.Popen([sys.executable, "-m", "gigamim", "pretrain", *args], cwd=REPO, text=True,
                             env=cpu_env(RANK=0, LOCAL_RANK=0, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rank1 = None
    try:
        _wait_listening(port, rank0, 240)  # past start-up: in init_process_group, waiting for rank 1
        import shutil

        shutil.rmtree(tmp_path / "ck" / "step_00000004")
        (tmp_path / "ck" / "latest").write_text("step_00000002")
        rank1 = subprocess.Popen([sys.executable, "-m", "gigamim", "pretrain", *args], cwd=REPO, text=True,
                                 env=cpu_env(RANK=1, LOCAL_RANK=1, **env), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        out0, err0 = rank0.communicate(timeout=600)
        out1, err1 = rank1.communicate(timeout=120)
    finally:
        for p in (rank0, rank1):
            if p is not None and p.poll() is None:
                p.kill()
    assert rank0.returncode == 0 and rank1.returncode == 0, (err0 + err1)[-4000:]
    no_traceback(out0 + err0 + out1 + err1)
    assert f"resumed from {tmp_path / 'ck' / 'step_00000002'} at step 2" in out0
    assert read_latest(tmp_path / "ck") == "step_00000005"

    # Resuming past train.stop_at_step: nothing to train, said in one line (it used to exit 0 silently).
    again = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 5, "train.stop_at_step=3"), "--resume", "auto"))
    assert again.returncode == 0, again.stderr[-3000:]
    said = [line for line in again.stderr.splitlines() if "nothing to train" in line]
    assert len(said) == 1 and "step 5" in said[0] and "train.stop_at_step=3" in said[0], again.stderr[-3000:]


def _background_saves_run(ref: Path, shards: str, sets: tuple) -> Path:
    """The uninterrupted 6-step reference: saves at steps 2 and 4 written in the background (each
    logs its blocking and write times), tags 4 and 6 kept (keep_last=2 of the demo config)."""
    done = run(launch_cmd(2, *pretrain_args(ref, shards, 6, *sets)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written in the background" in done.stdout
    records = [json.loads(line) for line in (ref / "log" / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if "ckpt_blocking_s" in r]
    assert [r["ckpt_step"] for r in saves] == [2, 4] and all(r["ckpt_write_s"] > 0 for r in saves), saves
    assert complete_tags(ref / "ck") == ["step_00000004", "step_00000006"]
    return ref


def _resume_gives_the_reference_losses(wd: Path, ref: Path, shards: str, sets: tuple) -> None:
    """`--resume auto` from step 2 gives the reference run's losses of steps 3-6 bit for bit."""
    resumed = run(launch_cmd(2, *pretrain_args(wd, shards, 6, *sets), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    want, got = losses(ref), losses(wd)
    assert {s: got[s] for s in range(3, 7)} == {s: want[s] for s in range(3, 7)}


def test_kill9_during_background_write_keeps_latest_and_resumes_exactly(tmp_path, shards):
    """FSDP2 + DCP async_save: the tag is marked complete only after every rank's write ended;
    kill -9 of a rank while step 4's tag is in flight leaves `latest` on step 2, and
    `--resume auto` gives the uninterrupted run's losses."""
    fsdp = ("train.engine=fsdp2", "checkpoint.every_steps=2", "checkpoint.async_save=true")
    ref = _background_saves_run(tmp_path / "ref", shards, fsdp)

    wd = tmp_path / "killed"
    wd.mkdir()
    _, log = signal_job(launch_cmd(2, *pretrain_args(wd, shards, 6, *fsdp)), wd / "job.log",
                        lambda job: (wd / "ck" / "step_00000004").is_dir(), "step 4's background save", kill_rank(1))
    assert not (wd / "ck" / "step_00000004" / META_FILE).exists(), log[-3000:]
    assert read_latest(wd / "ck") == "step_00000002" and complete_tags(wd / "ck") == ["step_00000002"]
    _resume_gives_the_reference_losses(wd, ref, shards, fsdp)


def test_zero3_kill9_during_background_write_keeps_latest_and_resumes_exactly(tmp_path, shards):
    """DeepSpeed ZeRO-3 (the default engine) with gigamim's background writer: rank 1's writer
    is held back by the debug knob GIGAMIM_CKPT_WRITE_DELAY_S=8@1 (it sleeps 8 s before each of
    its files; the training goes on), so step 4's tag is observably half-written: rank 0's files
    complete on disk, rank 1's not. kill -9 of rank 1 then leaves `latest` on step 2 (a tag is
    marked only after EVERY rank's write ended and was checked), and `--resume auto` gives the
    uninterrupted run's losses bit for bit (the step-2 snapshot was taken at step 2, although
    rank 1 wrote it while steps 3-4 ran)."""
    zero3 = ("checkpoint.every_steps=2", "checkpoint.async_save=true")
    ref = _background_saves_run(tmp_path / "ref", shards, zero3)

    wd = tmp_path / "killed"
    wd.mkdir()
    tag4 = wd / "ck" / "step_00000004"

    def kill_rank1_mid_write(job):
        assert not (tag4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()  # rank 1's write in flight
        kill_rank(1)(job)

    # ready: rank 0's last file of step 4 (renamed into place only when whole): its write is done
    _, log = signal_job(launch_cmd(2, *pretrain_args(wd, shards, 6, *zero3)), wd / "job.log",
                        lambda job: (tag4 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists(),
                        "rank 0's files of step 4", kill_rank1_mid_write, GIGAMIM_CKPT_WRITE_DELAY_S="8@1")
    assert not (tag4 / META_FILE).exists(), log[-3000:]
    assert read_latest(wd / "ck") == "step_00000002" and complete_tags(wd / "ck") == ["step_00000002"], log[-3000:]
    _resume_gives_the_reference_losses(wd, ref, shards, zero3)


def test_zero3_sigterm_during_background_write_waits_for_it(tmp_path, shards):
    """A job-wide SIGTERM while rank 1's background write of step 2 is held back (8 s before each
    of its files, GIGAMIM_CKPT_WRITE_DELAY_S=8@1): the stop save first waits for that write, so
    the launch command exits 0 with step 2 complete (both ranks' files whole) and `latest` on
    the stop's own tag after it."""
    wd = tmp_path / "cut"
    wd.mkdir()
    tag2 = wd / "ck" / "step_00000002"

    def sigterm_mid_write(job):
        assert not (tag2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()  # rank 1's write in flight
        sigterm_job(job)

    rc, log = signal_job(launch_cmd(2, *pretrain_args(wd, shards, 50, "checkpoint.every_steps=2",
                                                      "checkpoint.async_save=true")), wd / "job.log",
                         lambda job: (tag2 / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists(),
                         "rank 0's files of step 2", sigterm_mid_write, GIGAMIM_CKPT_WRITE_DELAY_S="8@1")
    assert rc == 0, log[-3000:]
    no_traceback(log)
    from gigamim.checkpoint.check import check_checkpoint

    latest = read_latest(wd / "ck")
    assert complete_tags(wd / "ck") == ["step_00000002", latest] and latest > "step_00000002", log[-3000:]
    assert check_checkpoint(wd / "ck", "step_00000002").world_size == 2  # every partition present and whole
    assert check_checkpoint(wd / "ck").tag == latest
    assert f"saved checkpoint {tag2} (blocked" in log and f"checkpoint saved at step {int(latest[5:])}" in log
