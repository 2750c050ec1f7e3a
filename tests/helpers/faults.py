"""Fault-injection helpers for the tests/test_faults_*.py suite: a small tmpfs (a disk that
really fills up), and process lookups for killing one rank of a real launch."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int):
    """Mount a tmpfs of `size_bytes` at `path` for the block; skip the test where mounting is not
    allowed (not root, no CAP_SYS_ADMIN in the container)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small tmpfs needs root (mount -t tmpfs)")
    path.mkdir(parents=True, exist_ok=True)
    kib = max(64, size_bytes // 1024)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc), oldest first."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append((int(fields[19]), int(entry.name)))
    return [p for _, p in sorted(out)]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """Global rank -> pid of the ranks a `gigamim launch` started (its direct children whose
    environment says RANK=...)."""
    ranks = {}
    for pid in children(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- real runs

import sys  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def pretrain_args(workdir: Path, shards: str, steps: int, *extra: str) -> list[str]:
    """`gigamim pretrain` arguments of a tiny swinv2_nano run (96 px, batch 8 on 2 ranks)."""
    sets = [
        f"data.shards={shards}", "model.img_size=96", "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.max_steps={steps}", "data.num_workers=1", "data.shuffle_buffer=32", "optim.warmup_steps=2",
        f"checkpoint.dir={workdir}/ck", f"log.dir={workdir}/log", "log.every_steps=1", "log.tensorboard=false",
        "log.progress_bar=false", "log.num_images=2", "checkpoint.every_steps=0", *extra,
    ]
    args = ["pretrain", "--config", "demo"]
    for s in sets:
        args += ["--set", s]
    return args


def launch_cmd(nproc: int, *verb_args: str, launch_args: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "gigamim", "launch", "--nproc-per-node", str(nproc), *launch_args, *verb_args]


def logged_steps(workdir: Path) -> int:
    f = workdir / "log" / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def wait_for(predicate, timeout: float, proc=None, what: str = ""):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def signal_job(cmd: list[str], log: Path, ready, what: str, act, *, ready_s: float = 300, wait_s: float = 240,
               **env) -> tuple[int, str]:
    """A real job under a fault: start `cmd` in its own session (output to `log`), wait until
    `ready(job)` (failing if the job ends first), call `act(job)` (a kill, a signal, and any
    check of the moment), wait for the job to end. Whatever happens, nothing of it outlives the call
    (SIGKILL to its process group). Returns (exit code, the log's text)."""
    from tests.launch import start

    job = start(cmd, log, **env)
    try:
        wait_for(lambda: ready(job), ready_s, job, what)
        act(job)
        rc = job.wait(timeout=wait_s)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return rc, log.read_text()


def kill_rank(rank: int):
    """`act` for signal_job: kill -9 of one rank of a `gigamim launch` job."""
    return lambda job: os.kill(rank_pids(job.pid)[rank], signal.SIGKILL)


def sigterm_job(job) -> None:
    """`act` for signal_job: a job-wide SIGTERM, as a batch system sends it (the launcher's group)."""
    os.killpg(job.pid, signal.SIGTERM)


def losses(workdir: Path) -> dict[int, float]:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "log" / "metrics.jsonl").read_text().splitlines())}


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-4000:]


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (SigCgt in /proc/<pid>/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False
