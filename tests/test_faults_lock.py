"""The run lock on a checkpoint folder, with real processes as holders: a second run is
refused with one line naming the holder; a holder that is gone (kill -9, a recycled pid,
an earlier start of the same SLURM job) is taken over; another host's lock needs
--force-unlock; many processes racing for it get exactly one winner."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigamim.checkpoint.lock import LOCK_FILE, RunLock, RunLockError

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from gigamim.checkpoint.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(ckpt: Path, **env) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ckpt)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _record(ckpt: Path) -> dict:
    return json.loads((ckpt / LOCK_FILE).read_text())


def test_second_run_refused_naming_the_holder_then_stale_after_kill9(tmp_path):
    ckpt = tmp_path / "ck"
    holder = _holder(ckpt, SLURM_JOB_ID="777")
    try:
        with pytest.raises(RunLockError) as err:
            RunLock(ckpt).acquire()
        msg = str(err.value)
        assert "\n" not in msg
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "SLURM_JOB_ID=777" in msg
        assert "--force-unlock" in msg
        assert _record(ckpt)["pid"] == holder.pid  # the refused run left the holder's lock alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the file behind; its pid no longer runs on this host -> taken over.
    assert (ckpt / LOCK_FILE).exists()
    notes = []
    with RunLock(ckpt, log=notes.append):
        assert _record(ckpt)["pid"] == os.getpid()
        assert len(notes) == 1 and f"pid {holder.pid} is not running" in notes[0]
    assert not (ckpt / LOCK_FILE).exists()  # released on exit


def _plant(ckpt: Path, **record) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / LOCK_FILE).write_text(json.dumps({"token": "theirs", **record}))


def test_other_host_needs_force_unlock(tmp_path):
    ckpt = tmp_path / "ck"
    _plant(ckpt, host="gpu-node-17", pid=4242, job_id="SLURM_JOB_ID=1", started="2026-12-01 20:00:00 UTC")
    with pytest.raises(RunLockError, match="gpu-node-17.*pid 4242.*SLURM_JOB_ID=1.*--force-unlock"):
        RunLock(ckpt).acquire()
    notes = []
    with RunLock(ckpt, force=True, log=notes.append):
        assert _record(ckpt)["pid"] == os.getpid()
    assert "gpu-node-17" in notes[0] and "--force-unlock" in notes[0]


def test_requeued_job_takes_over_its_own_lock_from_another_host(tmp_path, monkeypatch):
    ckpt = tmp_path / "ck"
    _plant(ckpt, host="gpu-node-17", pid=4242, job_id="SLURM_JOB_ID=555")
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    notes = []
    with RunLock(ckpt, log=notes.append):
        assert _record(ckpt)["job_id"] == "SLURM_JOB_ID=555"
    assert "earlier start of this job" in notes[0]
    # A different job id on the other host is not taken over.
    _plant(ckpt, host="gpu-node-17", pid=4242, job_id="SLURM_JOB_ID=556")
    with pytest.raises(RunLockError):
        RunLock(ckpt).acquire()


def test_recycled_pid_is_stale_but_a_live_holder_is_not(tmp_path):
    ckpt = tmp_path / "ck"
    here = socket.gethostname()
    parent = os.getppid()  # alive, but not the process that wrote this record
    _plant(ckpt, host=here, pid=parent, pid_start="1")
    with RunLock(ckpt):
        pass
    _plant(ckpt, host=here, pid=parent)  # no start time recorded: a live pid is taken at its word
    with pytest.raises(RunLockError, match=f"pid {parent}"):
        RunLock(ckpt).acquire()


def test_unreadable_lock_is_named_and_release_keeps_someone_elses(tmp_path):
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / LOCK_FILE).write_bytes(os.urandom(64))
    with pytest.raises(RunLockError, match="unreadable"):
        RunLock(ckpt).acquire()
    lock = RunLock(ckpt, force=True, log=lambda m: None).acquire()
    # Somebody forces it away from us; our release must not delete their lock.
    _plant(ckpt, host="elsewhere", pid=1)
    lock.release()
    assert _record(ckpt)["host"] == "elsewhere"


def _race(ckpt: str, start, wins):
    start.wait()
    try:
        RunLock(ckpt).acquire()  # never released: the winner keeps it until the race is over
        wins.put(os.getpid())
    except RunLockError:
        wins.put(None)
    time.sleep(1.0)


def test_racing_processes_get_exactly_one_winner(tmp_path):
    ctx = mp.get_context("fork")
    n = 6
    start, wins = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "ck"), start, wins)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [wins.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    winners = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert _record(tmp_path / "ck")["pid"] == winners[0]
