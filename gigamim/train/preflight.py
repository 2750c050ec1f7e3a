"""Everything a training verb can refuse before any rank joins a process group.

One function, `preflight`, run by every rank right after the config is read: what the config
and the files can tell is told here, as one line and exit 2, in seconds — instead of after
the process group, DeepSpeed and the model are built (15-100 s under load), and instead of a
traceback per rank. In order:

1. the config's own rules (`config.validate`: ranges, loader settings, shard files exist),
   the engine's (`Engine.check_config`);
2. the model: the task builds it on the meta device (no memory, no process group), so the
   model code itself says what is wrong (a window that does not tile a stage, an unknown
   name or argument) — nothing here knows a family's rules;
3. the data: at least one local shard is a readable tar archive (`data.readable`);
4. the folders: `checkpoint.dir` and `log.dir` can be created and written;
5. the run lock: a live run holding `checkpoint.dir` is named (read-only peek; the lock is
   taken for real after the process group, `Trainer`);
6. another run's work: a fresh start (no `--resume`) into a `checkpoint.dir` that holds
   complete tags, or a `log.dir` that holds another run's metrics, is refused unless
   `--overwrite` (which moves them aside under the lock, `replace_previous_run`);
7. a `--resume` point, resolved without a word and checked against this run (model, task,
   engine, world size). The point that is loaded is resolved again under the run lock
   (`Trainer`): the files may change between here and there (a run that ended and pruned).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from gigamim.checkpoint.layout import (LATEST_FILE, LATEST_UNIVERSAL_FILE, CheckpointError, complete_tags,
                                       read_latest, read_meta)
from gigamim.config import Config, ConfigError

# What a run writes into log.dir (moved aside together by --overwrite).
LOG_OUTPUTS = ("metrics.jsonl", "config.yaml", "tensorboard", "reconstructions", "sample_keys")
REPLACED_DIR = "replaced"  # <checkpoint.dir>/replaced/<stamp>/ and <log.dir>/replaced/<stamp>/


def preflight(cfg: Config, task, *, world_size: int, resume: str | None, overwrite: bool, force_unlock: bool,
              check_files: bool = True) -> None:
    """Raise ConfigError / CheckpointError (one line) for anything this run cannot do."""
    from gigamim.config import validate
    from gigamim.train.engines import check_engine_config


    validate(cfg, world_size=world_size, check_files=check_files)
    try:
        record_window_size(cfg)
    except ValueError as e:  # an unknown model.name: the registry lists the known ones
        raise ConfigError(f"model.name: {e}") from None
    check_engine_config(cfg)
    task.check()  # the model (built on the meta device), the task's data and weights
    task.check_data_readable()  # the task's own data (data.shards, finetune.*_shards)
    for key in ("checkpoint.dir", "log.dir"):
        check_writable(key, getattr(getattr(cfg, key.split(".")[0]), "dir"))
    if not force_unlock:
        from gigamim.checkpoint.lock import RunLock

        RunLock(cfg.checkpoint.dir).check_free()
    if resume:
        from gigamim.train.resume import check_compatible, resolve_resume

        point = resolve_resume(resume, cfg.checkpoint.dir, world_size, say=lambda msg: None)
        if point is not None:
            check_compatible(point.meta, cfg, point.tag_dir, say=lambda msg: None, task=task.name)
    elif not overwrite:
        refuse_previous_run(cfg)


# --------------------------------------------------------------------------- folders


def check_writable(key: str, path: str) -> None:
    """A file can be written in `path`, or (when it does not exist yet) in its nearest existing
    parent, where the run will create it; else one line. Creates nothing that stays: a refused
    run leaves no folders behind."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        if not p.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        fd, tmp = tempfile.mkstemp(prefix=".gigamim-write-test.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ConfigError(f"{key}={path} is not writable ({why}): give a writable {key}") from None


# --------------------------------------------------------------------------- another run's work


def previous_run(cfg: Config) -> str | None:
    """What another run left in checkpoint.dir / log.dir, in words; None when nothing."""
    root = Path(cfg.checkpoint.dir)
    tags = complete_tags(root)
    latest = read_latest(root)
    parts = []
    if tags:
        steps = [read_meta(root / t).get("step") for t in tags]
        model = read_meta(root / tags[-1]).get("model")
        shown = ", ".join(tags[-3:]) if len(tags) <= 3 else f"{tags[0]} .. {tags[-1]}"
        parts.append(f"{cfg.checkpoint.dir} holds another run's {len(tags)} complete checkpoint(s) ({shown}"
                     f"{f', latest {latest}' if latest else ''}{f', model {model}' if model else ''}"
                     f"{f', up to step {max(s for s in steps if s is not None)}' if any(s is not None for s in steps) else ''})")
    metrics = Path(cfg.log.dir) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        parts.append(f"{metrics} holds another run's metrics")
    return "; ".join(parts) or None


def refuse_previous_run(cfg: Config) -> None:
    found = previous_run(cfg)
    if found:
        raise CheckpointError(f"{found}, and this run starts fresh (no --resume): continue that run with --resume "
                              "auto, start this one in another checkpoint.dir / log.dir, or pass --overwrite to move "
                              f"the old run aside (into {REPLACED_DIR}/<time>/ there; nothing is deleted)")


def replace_previous_run(cfg: Config, say=print) -> None:
    """--overwrite, under the run lock: another run's tags, `latest` and log outputs are moved
    into `replaced/<UTC time>/` beside them (a rename on the same file system; never deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    root = Path(cfg.checkpoint.dir)
    moved = _move_aside(root, [*complete_tags(root), *_incomplete_tags(root), LATEST_FILE, LATEST_UNIVERSAL_FILE], stamp)
    logs = _move_aside(Path(cfg.log.dir), list(LOG_OUTPUTS), stamp)
    if moved or logs:
        where = ", ".join(str(p) for p in sorted({m.parent for m in moved + logs}))
        say(f"gigamim: --overwrite: moved the previous run's {len(moved)} checkpoint entries and {len(logs)} log "
            f"entries into {where} (delete them yourself when no longer needed)")


def _incomplete_tags(root: Path) -> list[str]:
    from gigamim.checkpoint.layout import is_tag_dir, tag_step

    if not root.is_dir():
        return []
    done = set(complete_tags(root))
    return [p.name for p in root.iterdir() if p.name not in done and tag_step(p.name) is not None and is_tag_dir(p)]


def _move_aside(folder: Path, names: list[str], stamp: str) -> list[Path]:
    present = [n for n in dict.fromkeys(names) if os.path.lexists(folder / n)]
    if not present:
        return []
    dest = folder / REPLACED_DIR / stamp
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in present:
        os.rename(folder / name, dest / name)
        out.append(dest / name)
    return out


def record_window_size(cfg: Config) -> None:
    """Write the variant's default window into the resolved config when it has none, so that
    resume checks, exports and fine-tune builds never have to guess the geometry."""
    if cfg.model.window_size is None:
        from gigamim.models.registry import model_defaults

        cfg.model.window_size = model_defaults(cfg.model.name).get("window_size")
