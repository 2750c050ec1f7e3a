"""One run per checkpoint folder: `<checkpoint.dir>/.lock`.

Two runs writing the same `checkpoint.dir` (a resubmitted job while the old one still runs,
a copy-pasted config) overwrite each other's tags and a later resume loads the wrong
weights without a word. Rank 0 takes this lock before anything is written:

    with RunLock(cfg.checkpoint.dir, force=args.force_unlock):
        ...train...

- Atomic create: the holder's record is written to a private temp file and hard-linked to
  `.lock`; link() fails if the name exists, on local file systems and NFS alike, and a
  reader never sees a half-written record.
- The record names the holder: host, pid, the process's start time (so a recycled pid is
  not mistaken for the holder), the scheduler's job id, when it started, its command.
- Stale locks are taken over when the holder provably is gone: same host and that process
  no longer runs, or the same scheduler job id (a requeued SLURM job keeps its id, and
  SLURM never runs two incarnations of one job at once). A holder on another host cannot
  be checked from here: the run fails with one line naming it, and `--force-unlock`
  takes the lock anyway.
- Release removes the file only while it still holds our record (after somebody forced the
  lock away from us, it is theirs).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from gigamim.checkpoint.layout import CheckpointError

LOCK_FILE = ".lock"
# Scheduler job ids, first match wins (SLURM, PBS/Torque, LSF, SGE, Kubernetes' pod name).
JOB_ID_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


class RunLockError(CheckpointError):
    """Another run holds the checkpoint folder; the message names it and what to do."""


def current_job_id(env=None) -> str | None:
    env = os.environ if env is None else env
    for key in JOB_ID_VARS:
        if env.get(key):
            return f"{key}={env[key]}"
    return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None where /proc is absent
    or the process does not exist. Together with the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(holder: dict) -> str:
    parts = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("job_id"):
        parts.append(f"job {holder['job_id']}")
    if holder.get("started"):
        parts.append(f"since {holder['started']}")
    return ", ".join(parts)


class RunLock:
    """Exclusive lock on a checkpoint folder for the lifetime of a run (see the module doc)."""

    def __init__(self, ckpt_dir: str | os.PathLike, force: bool = False, log=None):
        self.dir = Path(ckpt_dir)
        self.path = self.dir / LOCK_FILE
        self.force = force
        self.log = log or (lambda msg: print(f"gigamim: {msg}", file=sys.stderr, flush=True))
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()),
            "job_id": current_job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500],
            "token": uuid.uuid4().hex,
        }
        self.held = False

    # ---- reading the holder
    def holder(self) -> dict | None:
        """The current holder's record; {} for an unreadable lock file; None when unlocked."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            record = json.loads(data.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included: random bytes are no record
            return {}
        return record if isinstance(record, dict) else {}

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` provably no longer runs, or None if it may still run."""
        me = self.record
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and isinstance(pid, int):
            if pid == me["pid"]:
                return None
            if not pid_alive(pid):
                return f"pid {pid} is not running on this host"
            if holder.get("pid_start") and process_start_time(pid) not in (None, holder["pid_start"]):
                return f"pid {pid} now belongs to another process"
            return None  # it runs, here
        # Another host: its processes cannot be seen from here, but SLURM never runs two
        # starts of one job at once, so a lock left by this job id is an earlier start's.
        if holder.get("job_id") and holder["job_id"] == me["job_id"]:
            return f"an earlier start of this job ({holder['job_id']})"
        return None

    # ---- taking and releasing
    def _try_link(self) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".lock.{self.record['token']}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def check_free(self) -> None:
        """Read-only peek, before a run builds anything: raise the refusal `acquire` would
        give when a live run holds the lock (a stale or absent lock passes; nothing is taken)."""
        holder = self.holder()
        if holder is None or (holder and self.stale_reason(holder)):
            return
        raise self._refusal(holder)

    def _refusal(self, holder: dict) -> "RunLockError":
        who = describe(holder) if holder else f"an unreadable {self.path}"
        return RunLockError(f"{self.dir} is in use by another run ({who}); wait for it to end, use another "
                            f"checkpoint.dir, or pass --force-unlock if that run is gone")

    def acquire(self) -> "RunLock":
        for _ in range(3):  # a takeover can race another takeover; the loser looks again
            if self._try_link():
                self.held = True
                return self
            holder = self.holder()
            if holder is None:
                continue  # released between our link and our read
            reason = self.stale_reason(holder) if holder else None
            if reason or self.force:
                why = reason or "--force-unlock"
                self.log(f"taking over the lock of {self.dir} from {describe(holder) if holder else 'an unreadable .lock'} ({why})")
                self._remove_if(holder)
                continue
            raise self._refusal(holder)
        raise RunLockError(f"could not take the lock {self.path}: other runs keep taking it")

    def _remove_if(self, holder: dict) -> None:
        """Remove the lock file only if it still holds `holder`'s record."""
        current = self.holder()
        if current is not None and current.get("token") == holder.get("token"):
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self._remove_if(self.record)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
