"""Issue 21.8: a start that JIT-builds (or waits for) DeepSpeed's CPU comm op says so in one
line, and the launcher's stop message names a build in progress. References: torch's own
`cpp_extension._get_build_directory` and its `FileLock`, and a real DeepSpeed build on 2
ranks under `gigamim launch`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gigamim.runtime.jit_builds import build_state, builds_in_progress, extensions_root, lock_held
from tests.helpers.faults import launch_cmd, no_traceback, pretrain_args, sigterm_job, signal_job

pytestmark = pytest.mark.timeout(300)

HOLD_LOCK = """
import sys, time
from torch.utils._filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_build_folder_is_torchs(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    name = f"gigamim_test_{os.getpid()}"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    torch_dir = _get_build_directory(name, verbose=False)  # creates it: removed below
    try:
        assert extensions_root() / name == type(extensions_root())(torch_dir)
    finally:
        os.rmdir(torch_dir)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert str(extensions_root() / name) == _get_build_directory(name, verbose=False)


def test_lock_held_only_while_torchs_lock_is(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "some_op"
    folder.mkdir()
    assert not lock_held(folder / "lock") and builds_in_progress() == []
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock_held(folder / "lock")
        assert builds_in_progress() == [folder]
        state = build_state("some_op")
        assert state.locked and not state.built and state.start_line("X").startswith("building X into ")
        (folder / "some_op.so").write_bytes(b"")  # what torch's build leaves: <name>.so
        assert build_state("some_op").start_line("X").startswith(f"waiting for {folder}/lock")
        (folder / "some_op.so").unlink()
    finally:
        holder.kill()
        holder.wait()
    # the file stays; a dead holder's lock is released by the kernel (torch >= 2.13)
    assert (folder / "lock").exists() and not lock_held(folder / "lock") and builds_in_progress() == []
    assert build_state("some_op").start_line("X").startswith("building X into ")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 16, image_size=112, samples_per_shard=16))


def test_a_start_that_builds_the_comm_op_says_so_and_a_sigterm_during_the_build_stops_cleanly(tmp_path, shards):
    """An empty extensions folder: rank 0 says it builds DeepSpeed's CPU comm op before the
    build starts. A job-wide SIGTERM while DeepSpeed's real build holds torch's lock: the
    launcher names the build; the signal reaches the compiler (each rank's session), the build
    stops, and every rank stops with rank 0's one line, exit 0, no traceback, nothing saved."""
    from filelock import Timeout
    from torch.utils._filelock import FileLock

    ext = tmp_path / "ext"
    ext.mkdir()
    log = tmp_path / "job.log"

    def building(job):  # the start line, then the build holding torch's own lock (as a second start tries it)
        lock = ext / "deepspeed_shm_comm" / "lock"
        if "building DeepSpeed's CPU comm op into" not in log.read_text() or not lock.exists():
            return False
        probe = FileLock(str(lock), timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        probe.release()
        return False

    rc, _ = signal_job(launch_cmd(2, *pretrain_args(tmp_path, shards, 2)), log, building,
                       "the build line and the build's lock", sigterm_job, ready_s=240, TORCH_EXTENSIONS_DIR=ext)
    out = log.read_text()
    no_traceback(out)
    assert rc == 0, out[-3000:]
    lines = out.splitlines()
    build = [x for x in lines if "building DeepSpeed's CPU comm op" in x]
    assert len(build) == 1 and f"{ext}/deepspeed_shm_comm" in build[0] and "later starts reuse it" in build[0], out
    assert any("a JIT build of deepspeed_shm_comm is running" in x for x in lines), out
    assert [x for x in lines if "stopped the JIT build" in x] == [
        "gigamim: SIGTERM stopped the JIT build of DeepSpeed's CPU comm op: stopped before step 1, nothing to save "
        "(the next start builds it)"], out
    assert "all 2 ranks exited 0 after SIGTERM" in out, out
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").glob("step_*")), out
