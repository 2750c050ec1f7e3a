"""Fault-injection helpers for the tests/test_faults_*.py suite: a small tmpfs (a disk that
really fills up), and process lookups for killing one rank of a real launch."""

from __future__ import annotations

import contextlib
import os
import shutil
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
