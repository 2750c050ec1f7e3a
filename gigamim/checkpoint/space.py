"""Disk space for checkpoints: check before a save, and name a full disk when a save fails.

A full disk during `torch.save` surfaces as `RuntimeError: basic_ios::clear: iostream
error`, `unexpected pos ...` or `PytorchStreamWriter failed writing file ...`: the words
"no space left" appear nowhere. Two defences:

- `check_free_space(ckpt_dir)` before a save: a new tag needs about the size of the previous
  one (same model, same world size), and the old tags are pruned only after the new one is
  complete, so the free space must hold a whole tag. Raises `NoSpaceError`.
- `space_error(exc, ckpt_dir, need)` after a failed save: ENOSPC / EDQUOT, or one of torch's
  stream errors while the disk is (nearly) full, becomes a `NoSpaceError` with the message
  "no space left on <dir>: need ~X GB, have Y GB"; anything else is left alone (None).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from gigamim.checkpoint.layout import CheckpointError, complete_tags

# Torch's C++ stream writer turns a failed write into these messages.
TORCH_WRITE_ERRORS = ("basic_ios::clear", "unexpected pos", "PytorchStreamWriter failed", "file write failed",
                      "No space left on device", "Disk quota exceeded")
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
MARGIN = 1.05  # metadata, the config copy, file-system slack
# A stream error with less than this free (after the failed write) is a full disk.
NEARLY_FULL_BYTES = 64 * 2**20


class NoSpaceError(CheckpointError):
    """The checkpoint folder's file system cannot hold the next tag."""


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def tree_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we walked
    return total


def existing_dir(path: str | os.PathLike) -> Path:
    """The folder itself, or its nearest existing parent (before the first save it may not exist)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    return shutil.disk_usage(existing_dir(path)).free


def previous_tag_bytes(ckpt_dir: str | os.PathLike) -> int | None:
    """Size of the newest complete (non-universal) tag in ckpt_dir, or None if there is none."""
    tags = [t for t in complete_tags(Path(ckpt_dir)) if not t.endswith("_universal")]
    return tree_bytes(Path(ckpt_dir) / tags[-1]) if tags else None


def estimate_tag_bytes(num_params: int, bytes_per_param: int = 16) -> int:
    """Before the first save: fp32 master weights + Adam's two moments (12 B/param) plus the
    model states (bf16 or fp32 weights, 2-4 B/param) -> ~16 B per parameter."""
    return int(num_params * bytes_per_param)


def older_tags_bytes(ckpt_dir: str | os.PathLike) -> int:
    """Bytes of the complete tags older than the newest one (what a lower keep_last frees)."""
    tags = [t for t in complete_tags(Path(ckpt_dir)) if not t.endswith("_universal")]
    return sum(tree_bytes(Path(ckpt_dir) / t) for t in tags[:-1])


def no_space_message(ckpt_dir, need: float | None, have: float) -> str:
    need_part = f"need ~{gb(need)}, " if need else ""
    older = older_tags_bytes(ckpt_dir) if Path(ckpt_dir).is_dir() else 0
    if need and need > have + older:
        # Not even deleting every older tag would make room: keep_last is not the answer.
        advice = (f"one tag does not fit even without the older tags ({gb(older)}): free space on this file "
                  "system or use a checkpoint.dir on a larger one")
    elif older:
        advice = f"free space, or delete older tags ({gb(older)}) and lower checkpoint.keep_last"
    else:
        advice = "free space"
    return (f"no space left on {existing_dir(ckpt_dir)}: {need_part}have {gb(have)}; {advice}, then resume with "
            f"--resume auto (earlier checkpoints are kept)")


def check_free_space(ckpt_dir: str | os.PathLike, need: int | None = None) -> int | None:
    """Raise NoSpaceError if the next tag (~`need` bytes, default: the previous tag's size) does
    not fit. Returns the estimate used (None: nothing to compare against yet)."""
    need = previous_tag_bytes(ckpt_dir) if need is None else need
    if not need:
        return None
    need = int(need * MARGIN)
    have = free_bytes(ckpt_dir)
    if have < need:
        raise NoSpaceError(no_space_message(ckpt_dir, need, have))
    return need


def is_space_error(exc: BaseException, ckpt_dir: str | os.PathLike | None = None) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
    text = " ".join(str(e) for e in _chain(exc))
    if any(s in text for s in TORCH_WRITE_ERRORS):
        # These also mean other write failures (EIO, a vanished NFS mount): only call them a
        # full disk when the disk is in fact (nearly) full.
        return ckpt_dir is None or free_bytes(ckpt_dir) < NEARLY_FULL_BYTES
    return False


def space_error(exc: BaseException, ckpt_dir: str | os.PathLike, need: int | None = None,
                have: int | None = None) -> NoSpaceError | None:
    """`exc` from a save, as a one-line NoSpaceError if it was a full disk; None otherwise.
    Decide before removing the half-written tag (the disk is full then); pass `have`, the
    free space measured after removing it, for the message."""
    if isinstance(exc, NoSpaceError):
        return exc
    if not is_space_error(exc, ckpt_dir):
        return None
    return NoSpaceError(no_space_message(ckpt_dir, need, free_bytes(ckpt_dir) if have is None else have))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
