"""The on-disk layout of gigamim checkpoints, and THE resolver that picks a tag.

Layout under `checkpoint.dir`:

    latest                       names the newest COMPLETE tag (written atomically, last)
    step_00000100/               the engine's files for every rank: DeepSpeed's (model, optimizer,
                                 ...) or torch.distributed.checkpoint's (.metadata, *.distcp,
                                 + engine_state.pt)
        gigamim_config.yaml      the resolved gigamim config
        gigamim_meta.json        step, model, world size, version; written after every rank
                                 finished, so its presence marks the tag complete
    step_00000100_universal/     `gigamim consolidate --universal` (any world size)
    latest_universal             DeepSpeed's pointer to the newest universal folder

`resolve()` is the only place that turns "a folder (+ maybe a tag)" into one tag folder:
`--resume`, `gigamim consolidate` and `gigamim export` all call it, so they pick the same
tag for the same folder. Its rule: an explicit tag wins; a tag folder given directly is
itself; otherwise the tag `latest` names if that tag is complete, else the newest complete
tag (a `latest` that is unreadable or names a damaged tag is reported, never trusted).

"Complete" means gigamim's meta file is present (written after every rank's files). A plain
DeepSpeed save of another tool (DeepSpeed files, no gigamim file, a tag name that is not
gigamim's `step_N`) is usable when `latest` names it or it is asked for by name, as DeepSpeed
itself would load it; it never counts as a fallback candidate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

META_FILE = "gigamim_meta.json"
CONFIG_FILE = "gigamim_config.yaml"
LATEST_FILE = "latest"
LATEST_UNIVERSAL_FILE = "latest_universal"
UNIVERSAL_SUFFIX = "_universal"  # `gigamim consolidate --universal` writes <tag>_universal
_TAG_RE = re.compile(r"^step_(\d{8})(_universal)?$")
# A tag name as `latest` may hold it: printable, no path separators (DeepSpeed's own tags
# are e.g. global_step100). Anything else in `latest` (binary junk) is treated as absent.
_SAFE_TAG_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a gigamim tag name (`step_00000100[_universal]`), None for other names."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- atomic file ops


def atomic_file(path: str | os.PathLike, write) -> None:
    """`write(f)` into a temp file beside `path` (binary), fsync, rename: readers see the old or
    the new content, never half, and the final name exists only with all its bytes on disk. A
    failed write leaves no temp file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """`text` (UTF-8) as `atomic_file` writes."""
    atomic_file(path, lambda f: f.write(text.encode()))


def replace_path(tmp: str, out: str) -> None:
    """Rename `tmp` (a file or folder) onto `out`; an existing `out` is moved aside first and
    deleted only after the new one is in place, so `out` is never missing and never half."""
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result normal permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if os.path.isdir(tmp) else 0o666) & ~umask)
    old = None
    if os.path.lexists(out):
        old = out + f".old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        remove_path(old)


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_zip(path: str) -> None:
    """torch checkpoints are zip archives: a truncated one has no central directory, or
    members that run past the end of the file. Cheap: reads only the directory."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                # local header (30 bytes + name + extra) then the member's data
                if info.header_offset + 30 + len(info.filename) + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename} runs past the end of the file")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"partition file {path} is damaged ({os.path.getsize(path)} bytes; {e}): "
                              "it was truncated or not fully written. Use an earlier tag "
                              "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or "
                              "re-save the checkpoint.") from None


# --------------------------------------------------------------------------- what a folder is


def has_deepspeed_files(path: str | os.PathLike) -> bool:
    path = Path(path)
    return any(path.glob("*_model_states.pt")) or any(path.glob("*_optim_states.pt"))


DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of a save


def has_dcp_files(path: str | os.PathLike) -> bool:
    """torch.distributed.checkpoint (DCP) files: its `.metadata` index or its `*.distcp` data."""
    path = Path(path)
    return (path / DCP_METADATA_FILE).is_file() or any(path.glob("*.distcp"))


def is_tag_dir(path: str | os.PathLike) -> bool:
    """A folder holding one checkpoint (DeepSpeed or DCP files, or gigamim's meta), not a save root."""
    path = Path(path)
    return path.is_dir() and ((path / META_FILE).is_file() or has_deepspeed_files(path) or has_dcp_files(path))


def is_complete(tag_dir: str | os.PathLike) -> bool:
    """gigamim wrote this tag to the end (its meta file comes after every rank's files)."""
    return (Path(tag_dir) / META_FILE).is_file()


def is_foreign(tag_dir: str | os.PathLike) -> bool:
    """A plain DeepSpeed save by another tool: DeepSpeed files, no gigamim file, and not a
    gigamim tag name (a gigamim `step_N` folder without meta is a save that was cut short)."""
    tag_dir = Path(tag_dir)
    return (tag_step(tag_dir.name) is None and not (tag_dir / CONFIG_FILE).exists()
            and not (tag_dir / META_FILE).exists() and has_deepspeed_files(tag_dir))


def is_usable(tag_dir: str | os.PathLike) -> bool:
    return is_complete(tag_dir) or is_foreign(tag_dir)


def is_universal(tag_dir: str | os.PathLike) -> bool:
    """DeepSpeed's universal format (ds_to_universal) keeps per-parameter folders in zero/
    beside the model-states file."""
    tag_dir = Path(tag_dir)
    return (tag_dir / "zero").is_dir() and any(tag_dir.glob("*_model_states.pt"))


def read_meta(tag_dir: str | os.PathLike) -> dict:
    """gigamim_meta.json of a tag, {} when absent; a damaged one is a CheckpointError."""
    path = Path(tag_dir) / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the tag is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object; the tag is damaged")
    return meta


def read_latest(root: str | os.PathLike, name: str = LATEST_FILE) -> str | None:
    """The tag named by `root/latest`, or None when the file is absent or does not hold a
    readable tag name (binary junk, a path): such a `latest` is treated as absent."""
    try:
        raw = (Path(root) / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return tag if _SAFE_TAG_RE.match(tag) else None


def _tag_sort_key(root: Path, name: str):
    step = tag_step(name)
    # gigamim tags by step (a universal copy after its source); other tools' tags by mtime.
    return (0, step, name) if step is not None else (1, (root / name).stat().st_mtime, name)


def complete_tags(ckpt_dir: str | os.PathLike) -> list[str]:
    """Complete tags, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and is_tag_dir(p) and is_complete(p)]
    return sorted(tags, key=lambda t: _tag_sort_key(root, t))


# --------------------------------------------------------------------------- THE resolver


@dataclass(frozen=True)
class Resolved:
    root: Path  # the folder holding `latest` and the tag folders
    tag: str
    note: str | None = None  # why this is not the tag `latest` names (fallback), else None

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def resolve(path: str | os.PathLike, tag: str | None = None, *, missing_ok: bool = False,
            exclude: tuple[str, ...] = ()) -> Resolved | None:
    """Pick one checkpoint tag from `path` (a save root or a tag folder) and an optional tag.

    missing_ok: return None (instead of raising) when `path` does not exist or holds no
    complete tag: `--resume auto` then starts fresh. `exclude`: tags known to be damaged
    (the caller's deeper check failed on them), skipped by the fallback."""
    path = Path(path).absolute()
    if tag is not None:
        if not (path / tag).is_dir():
            available = ", ".join(complete_tags(path)) if path.is_dir() else ""
            hint = f" (complete tags: {available})" if available else ""
            raise CheckpointError(f"tag {tag!r} not found: {path / tag} does not exist{hint}")
        if not is_usable(path / tag):
            raise CheckpointError(f"checkpoint {path / tag} is incomplete: {META_FILE} is missing (gigamim "
                                  "writes it after every rank finished saving); use an earlier tag")
        return Resolved(path, tag)
    if is_tag_dir(path):
        if not is_usable(path):
            raise CheckpointError(f"checkpoint {path} is incomplete: {META_FILE} is missing (gigamim writes it "
                                  "after every rank finished saving); use an earlier tag")
        return Resolved(path.parent, path.name)
    if not path.is_dir():
        if missing_ok:
            return None
        raise CheckpointError(f"no such checkpoint folder: {path}")
    named = read_latest(path)
    note = None
    if named is not None and named not in exclude and (path / named).is_dir() and is_usable(path / named):
        return Resolved(path, named)
    if not os.path.lexists(path / LATEST_FILE):
        note = f"{path / LATEST_FILE} is missing (deleted, or a save was cut short before writing it)"
    else:
        if named is None:
            note = f"{path / LATEST_FILE} does not hold a readable tag name"
        elif named in exclude:
            note = f"{path / LATEST_FILE} names {named}, which is damaged"
        else:
            note = f"{path / LATEST_FILE} names {named}, which is missing or incomplete"
    tags = [t for t in complete_tags(path) if t not in exclude]
    if tags:
        return Resolved(path, tags[-1], note=f"{note}; using the newest complete tag {tags[-1]}" if note else None)
    if missing_ok:
        return None
    why = f"{note}, and " if note else ""
    raise CheckpointError(f"no complete checkpoint in {path} ({why}no tag folder holds {META_FILE})")
