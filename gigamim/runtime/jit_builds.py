"""What torch's JIT extension builds are doing on this machine: built, being built, or waited for.

A library op built with `torch.utils.cpp_extension.load` (DeepSpeed's CPU comm op on CPU
ranks, FusedAdam on a GPU) is compiled into `<root>/<py>_<accelerator>/<name>/` on the first
start that needs it: seconds on an idle machine, 2-3 minutes under load, silent; a job-wide
SIGTERM in that window reaches the compiler too (each rank is a session of its own) and stops
the build. Later starts reuse `<name>.so`, but take the folder's `lock` first, so a start also
waits silently for any other process building the same op. This module answers, without
building or locking anything, whether a start is about to build or wait (for its one line)
and which builds are running now (for the launcher's stop message).

torch >= 2.13 holds the lock as an OS advisory lock on `lock` (released when the holder dies;
its `_jit_compile` says why); older torch's `FileBaton` blocks while the file merely exists.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from dataclasses import dataclass
from pathlib import Path


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time CUDA_HOME notice (this
    module only reads folders; the process that builds gets torch's messages)."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def extensions_root() -> Path:
    """The folder that holds one build folder per extension, as torch's
    `cpp_extension._get_build_directory` computes it (without creating anything)."""
    import torch

    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit is not None:
        return Path(explicit)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(_cpp_extension().get_default_build_root()) / f"{python}_{accelerator}"


def _lock_is_advisory() -> bool:
    return hasattr(_cpp_extension(), "FileLock")


def lock_held(lock: Path) -> bool:
    """Whether another process holds a build folder's `lock` now."""
    if not _lock_is_advisory():
        return lock.exists()  # FileBaton: the file's existence is the lock
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody ever built here, or it was cleaned
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)  # only looked: released at once
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BuildState:
    name: str
    folder: Path
    built: bool  # a compiled module is there (a start only checks and loads it)
    locked: bool  # another process is building it now (a start waits for that)

    def start_line(self, what: str) -> str | None:
        """The one line a start prints before it builds or waits; None when it only loads."""
        if not self.built:  # this job's ranks build it (one of them, the others wait for its lock)
            return (f"building {what} into {self.folder} (the first start on this machine: up to a "
                    f"few minutes under load; later starts reuse it)")
        if self.locked:
            return (f"waiting for {self.folder}/lock: another process is checking or rebuilding {what} "
                    f"(seconds, or minutes if its sources changed)")
        return None


def build_state(name: str) -> BuildState:
    folder = extensions_root() / name
    built = folder.is_dir() and any(folder.glob(f"{name}*.so"))
    return BuildState(name=name, folder=folder, built=built, locked=lock_held(folder / "lock"))


def builds_in_progress() -> list[Path]:
    """The build folders whose lock another process holds now: a build in progress (the
    processes waiting for it hold nothing)."""
    root = extensions_root()
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    return [p for p in folders if lock_held(p / "lock")]
