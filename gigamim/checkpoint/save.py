"""Crash-safe save of a ZeRO checkpoint, and pruning to the last K.

DeepSpeed's own `save_checkpoint` writes `latest` on rank 0 without waiting for the other
ranks, so a crash mid-save could leave `latest` naming a half-written tag. We save with
`save_latest=False`, wait for every rank, then write the meta file and `latest` with
write-to-temp + rename. A half-written tag is never named by `latest`, is skipped by the
resolver (`layout.resolve`), and is removed by a later prune.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gigamim.checkpoint.layout import (CONFIG_FILE, LATEST_FILE, META_FILE, UNIVERSAL_SUFFIX, atomic_write,
                                       complete_tags, is_complete, tag_for, tag_step)


def save(engine, ckpt_dir: str | os.PathLike, step: int, client_state: dict, meta: dict, config_yaml: str,
         keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the tag folder."""
    import torch.distributed as dist

    root = Path(ckpt_dir)
    tag = tag_for(step)
    tag_dir = root / tag
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # remnants of a save that crashed at this step
            shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    # save_checkpoint ends with a barrier: every rank's files are on disk from here on.
    if rank0:
        atomic_write(tag_dir / CONFIG_FILE, config_yaml)
        atomic_write(tag_dir / META_FILE, json.dumps(meta, indent=1))
        atomic_write(root / LATEST_FILE, tag)
        prune(root, keep_last, current=tag)
    dist.barrier()
    return tag_dir


def prune(root: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` complete tags; drop older ones and older crash remnants."""
    if keep_last <= 0:
        return
    current_step = tag_step(current)
    # Only this run's history counts: tags past the current step (left by an earlier run
    # that went further before this one resumed from an older tag) are kept, not counted.
    complete = [t for t in complete_tags(root)
                if not t.endswith(UNIVERSAL_SUFFIX) and tag_step(t) is not None and tag_step(t) <= current_step]
    doomed = complete[:-keep_last]
    for p in root.iterdir():
        step = tag_step(p.name)
        if (p.is_dir() and step is not None and not p.name.endswith(UNIVERSAL_SUFFIX) and not is_complete(p)
                and step < current_step):
            doomed.append(p.name)
    for tag in doomed:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)
