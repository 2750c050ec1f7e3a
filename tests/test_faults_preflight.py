"""Mistakes refused before any process group (issue 21): one line, exit 2, no traceback, no
"Resume with --resume auto" — model shapes, loader settings, unreadable shard sets, a
read-only checkpoint folder, a folder locked by a live run.

"Before any process group" is checked independently of gigamim's own words: the command runs
as rank 0 of a 2-rank world whose rank 1 never comes. A process that joined the process group
would wait there for its peer (30 min); only one that refused before it returns at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.faults import no_traceback
from tests.launch import REPO, cpu_env, free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from gigamim.data.synthetic import write_synthetic_shards

    return str(write_synthetic_shards(tmp_path_factory.mktemp("shards"), 16, image_size=112, samples_per_shard=8))


def _alone_rank0(tmp_path: Path, shards: str, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`gigamim pretrain` as rank 0 of 2 whose peer never starts (see the module doc)."""
    sets = [f"data.shards={shards}", "model.img_size=96", "train.micro_batch_size=4", "train.global_batch_size=8",
            f"checkpoint.dir={tmp_path}/ck", f"log.dir={tmp_path}/log"]
    args = ["pretrain", "--config", "demo"]
    for s in sets:
        args += ["--set", s]
    args += list(extra)
    env = cpu_env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    try:
        return subprocess.run([sys.executable, "-m", "gigamim", *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still running after {timeout} s: it joined the process group "
                             f"(output: {(e.stdout or b'')[-2000:]!r} {(e.stderr or b'')[-2000:]!r})") from None


def _one_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    out = (done.stdout + done.stderr).strip()
    no_traceback(out)
    assert done.returncode == 2, out[-3000:]
    lines = out.splitlines()
    assert len(lines) == 1, out[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert "--resume auto" not in lines[0] or "continue that run" in lines[0]
    return lines[0]


@pytest.mark.parametrize("setting, needles", [
    # demo config: window 6; 64 px -> a 16x16 first stage that 6 does not tile
    ("model.img_size=64", ("model", "window", "16")),
    ("model.name=swinv2_nope", ("model.name", "swinv2_nope", "swinv2_nano")),
    ("data.num_workers=-1", ("data.num_workers", "-1")),
    ("checkpoint.async_save=sometimes", ("checkpoint.async_save", "sometimes", "auto")),
])
def test_config_mistakes_one_line_before_the_process_group(tmp_path, shards, setting, needles):
    done = _alone_rank0(tmp_path, shards, "--set", setting)
    _one_line(done, *needles)


def test_all_garbage_shards_one_line_before_the_process_group(tmp_path):
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(os.urandom(4096))
    done = _alone_rank0(tmp_path, f"{tmp_path}/junk-{{0..1}}.tar")
    line = _one_line(done, "data.shards", "junk-0.tar", "readable tar")
    assert "tarfile" not in done.stdout + done.stderr.replace(line, "")


def test_one_good_shard_among_garbage_passes_the_check(tmp_path, shards):
    """Only an all-bad set is refused: a readable shard anywhere in the list lets the run on
    (the loader skips the bad ones, counted in data_skipped)."""
    from gigamim.data import shardspec
    from gigamim.data.readable import first_readable_shard

    good = shardspec.resolve(shards).urls[0]
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    assert first_readable_shard([str(tmp_path / "junk.tar"), good]) == good
    with pytest.raises(ValueError, match="junk.tar"):
        first_readable_shard([str(tmp_path / "junk.tar")])


@pytest.fixture
def read_only(tmp_path):
    """A read-only bind mount (chmod does not stop root): skipped where mounting is not allowed."""
    src, ro = tmp_path / "ro_src", tmp_path / "ro"
    (src / "ck").mkdir(parents=True)
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    done = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True, capture_output=True)
        yield src, ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_read_only_checkpoint_dir_one_line_no_resume_advice(tmp_path, shards, read_only):
    _, ro = read_only
    done = _alone_rank0(tmp_path, shards, "--set", f"checkpoint.dir={ro}/ck")
    _one_line(done, f"checkpoint.dir={ro}/ck", "not writable", "Read-only file system")
    assert "Resume" not in done.stdout + done.stderr


HOLD = """
import sys, time
from gigamim.checkpoint.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_locked_folder_prints_only_the_refusal(tmp_path, shards):
    """A second start on a folder a live run holds: the refusal and nothing else (not first
    "no checkpoint in ...; starting from step 0"), before any process group."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ck")], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=cpu_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        done = _alone_rank0(tmp_path, shards, "--resume", "auto")
        _one_line(done, "in use by another run", f"pid {holder.pid}", "--force-unlock")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_launch_refuses_before_starting_any_rank(tmp_path, shards):
    """`gigamim launch` runs the verb's pre-flight itself: with the rendezvous port taken by
    another process, a launcher that started its agent and ranks would fail on that port; one
    that refused first says only the one line."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        args = ["pretrain", "--config", "demo", "--set", f"data.shards={shards}", "--set", "model.img_size=64",
                "--set", f"checkpoint.dir={tmp_path}/ck", "--set", f"log.dir={tmp_path}/log"]
        done = subprocess.run([sys.executable, "-m", "gigamim", "launch", "--nproc-per-node", "2", "--master-port",
                               str(port), *args], env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    _one_line(done, "model", "window")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "log").exists()
