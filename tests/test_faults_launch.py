"""`gigamim launch` under the faults a scheduler deals out, on real CPU ranks (DeepSpeed
ZeRO-3, and FSDP2 for the SIGTERM case; gloo, real shards and checkpoints):

- a job-wide SIGTERM (`kill -TERM -- -<pgid>`, what a batch system or `docker stop` of a
  process group does) is forwarded once; the launch command exits 0 only after the ranks'
  checkpoint is complete, and the resumed run's losses equal an uninterrupted run's;
- kill -9 of one rank mid-step: the others are stopped promptly, one line names the rank;
- SIGKILL of the launcher itself takes the ranks with it;
- bad launch arguments and a config error give one line each, exit 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from gigamim.checkpoint.check import check_checkpoint
from gigamim.checkpoint.layout import complete_tags, read_latest
from tests.helpers.faults import (launch_cmd, logged_steps, losses, no_traceback, pid_alive, pretrain_args, rank_pids,
                                  wait_for)
from tests.launch import REPO, cpu_env, run, start

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 96, image_size=112, samples_per_shard=48))


def _start_and_wait(tmp_path, cmd, steps_before: int):
    tmp_path.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "job.log"
    job = start(cmd, log, PYTHONWARNINGS="ignore")
    wait_for(lambda: logged_steps(tmp_path) >= steps_before, 240, job, f"step {steps_before}")
    ranks = rank_pids(job.pid)
    assert sorted(ranks) == [0, 1], ranks
    return job, log, ranks


# The engines under test: DeepSpeed ZeRO-3 (the default) and FSDP2 (DCP tags), whose resumed
# losses are the uninterrupted run's bit for bit.
ENGINES = [pytest.param("deepspeed", id="deepspeed"), pytest.param("fsdp2", id="fsdp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_job_wide_sigterm_waits_for_the_save_and_resume_is_identical(tmp_path, shards, engine):
    steps = 8
    engine_set = f"train.engine={engine}"
    straight = tmp_path / "straight"
    done = run(launch_cmd(2, *pretrain_args(straight, shards, steps, engine_set)))
    assert done.returncode == 0, done.stderr[-3000:]

    work = tmp_path / "cut"
    job, log, ranks = _start_and_wait(work, launch_cmd(2, *pretrain_args(work, shards, steps, engine_set)), 3)
    try:
        os.killpg(job.pid, signal.SIGTERM)  # the launcher's whole process group, as a batch system does
        rc = job.wait(timeout=240)
        # The moment the launch command is gone: a complete checkpoint, no rank left running.
        latest = read_latest(work / "ck")
        alive = [r for r, pid in ranks.items() if pid_alive(pid)]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert not alive, f"ranks {alive} outlived the launch command"
    assert latest is not None and latest in complete_tags(work / "ck"), out[-3000:]
    info = check_checkpoint(work / "ck")  # every partition present and whole
    assert info.tag == latest and info.world_size == 2
    saved = int(latest.split("_")[1])
    assert 3 <= saved < steps
    assert out.count("forwarded once") == 1 and "all 2 ranks exited 0" in out
    no_traceback(out)

    resumed = run(launch_cmd(2, *pretrain_args(work, shards, steps, engine_set), "--resume", "auto"),
                  PYTHONWARNINGS="ignore")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}" in resumed.stdout
    ref, got = losses(straight), losses(work)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(saved + 1, steps + 1):
        if engine == "fsdp2":
            assert got[step] == ref[step], step  # bit for bit
        else:
            assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-7), step


@pytest.mark.slow
def test_kill9_of_a_rank_stops_the_others_with_one_line(tmp_path, shards):
    job, log, ranks = _start_and_wait(tmp_path, launch_cmd(2, *pretrain_args(tmp_path, shards, 500,
                                                                            "checkpoint.every_steps=2")), 5)
    try:
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        rc = job.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 1, out[-3000:]
    assert "rank 1 exited (SIGKILL); stopped the other ranks. Resume with --resume auto" in out
    assert not pid_alive(ranks[0])
    assert took < 60, took  # not gloo's 30-minute timeout
    no_traceback(out)
    latest = read_latest(tmp_path / "ck")
    assert latest in complete_tags(tmp_path / "ck")
    saved = int(latest.split("_")[1])
    resumed = run(launch_cmd(2, *pretrain_args(tmp_path, shards, saved + 1), "--resume", "auto"))
    assert resumed.returncode == 0 and f"at step {saved}" in resumed.stdout, resumed.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_of_the_launcher_takes_the_ranks_with_it(tmp_path, shards):
    job, log, ranks = _start_and_wait(tmp_path, launch_cmd(2, *pretrain_args(tmp_path, shards, 500)), 2)
    os.kill(job.pid, signal.SIGKILL)  # the launcher only (not its group)
    job.wait(timeout=30)
    wait_for(lambda: not any(pid_alive(p) for p in ranks.values()), 30, what="the ranks to die with the launcher")


def test_bad_launch_arguments_one_line():
    for args, message in ((["--nproc-per-node", "0", "pretrain"], "--nproc-per-node must be >= 1"),
                          (["--nproc-per-node", "2", "pretrian"], "unknown verb 'pretrian'"),
                          (["--nproc-per-node", "2", "--nnodes", "2", "pretrain"], "--master-addr"),
                          (["pretrain"], "--nproc-per-node")):
        done = subprocess.run(launch_cmd(0, "x")[:4] + args, capture_output=True, text=True, cwd=REPO,
                              env=cpu_env(), timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)


@pytest.mark.slow
def test_config_error_through_launch_printed_once(tmp_path, shards):
    done = run(launch_cmd(2, *pretrain_args(tmp_path, shards, 5, "train.global_batch_size=7")))
    assert done.returncode == 2
    err = done.stderr
    assert err.count("config error") == 1, err
    assert "exited" not in err
    no_traceback(done.stdout + err)
