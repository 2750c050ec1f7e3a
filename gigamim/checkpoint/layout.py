"""Crash-safe ZeRO checkpoints: save, find the newest complete one, keep the last K.

Layout under `checkpoint.dir`:

    latest                       names the newest COMPLETE tag (written atomically, last)
    step_00000100/               DeepSpeed's files for every rank (model, optimizer, ...)
        gigamim_config.yaml      the resolved gigamim config
        gigamim_meta.json        step, model, world size, version; written after every rank
                                 finished, so its presence marks the tag complete

DeepSpeed's own `save_checkpoint` writes `latest` on rank 0 without waiting for the other
ranks, so a crash mid-save could leave `latest` naming a half-written tag. We save with
`save_latest=False`, wait for every rank, then write the meta file and `latest` with
write-to-temp + rename. A half-written tag is never named by `latest` and is skipped by
`--resume auto`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

META_FILE = "gigamim_meta.json"
CONFIG_FILE = "gigamim_config.yaml"
LATEST_FILE = "latest"
UNIVERSAL_SUFFIX = "_universal"  # `gigamim consolidate --universal` writes <tag>_universal
_TAG_RE = re.compile(r"^step_(\d{8})(_universal)?$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write-to-temp + fsync + rename: readers see the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META_FILE).is_file()


def is_universal(tag_dir: str | os.PathLike) -> bool:
    """DeepSpeed's universal format (ds_to_universal) keeps per-parameter folders in zero/
    beside the model-states file."""
    tag_dir = Path(tag_dir)
    return (tag_dir / "zero").is_dir() and any(tag_dir.glob("*_model_states.pt"))


def read_meta(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / META_FILE).read_text())


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, oldest first (by step; a universal copy sorts after its source)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda t: (int(_TAG_RE.match(t).group(1)), t))


def find_resume(spec: str, ckpt_dir: str | os.PathLike) -> tuple[Path, str] | None:
    """Resolve `--resume`: "auto" (newest complete in ckpt_dir, or None to start fresh),
    a checkpoint directory (its `latest`), or one tag folder. Returns (load_dir, tag)."""
    if spec == "auto":
        root = Path(ckpt_dir)
        latest = root / LATEST_FILE
        if latest.is_file():
            tag = latest.read_text().strip()
            if is_complete(root / tag):
                return root, tag
        tags = complete_tags(root)
        return (root, tags[-1]) if tags else None
    path = Path(spec)
    if is_complete(path):
        return path.parent, path.name
    if (path / LATEST_FILE).is_file():
        tag = (path / LATEST_FILE).read_text().strip()
        if is_complete(path / tag):
            return path, tag
        raise CheckpointError(f"--resume {spec}: 'latest' names '{tag}', which is incomplete (no {META_FILE})")
    if path.is_dir():
        tags = complete_tags(path)
        if tags:
            return path, tags[-1]
        raise CheckpointError(f"--resume {spec}: no complete checkpoint in this folder")
    raise CheckpointError(f"--resume {spec}: no such checkpoint folder")


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
    current_step = int(_TAG_RE.match(current).group(1))
    # Only this run's history counts: tags past the current step (left by an earlier run
    # that went further before this one resumed from an older tag) are kept, not counted.
    complete = [t for t in complete_tags(root)
                if not t.endswith(UNIVERSAL_SUFFIX) and int(_TAG_RE.match(t).group(1)) <= current_step]
    doomed = complete[:-keep_last]
    for p in root.iterdir():
        m = _TAG_RE.match(p.name)
        if p.is_dir() and m and not m.group(2) and not is_complete(p) and int(m.group(1)) < current_step:
            doomed.append(p.name)
    for tag in doomed:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)
