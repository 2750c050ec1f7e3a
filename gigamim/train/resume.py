"""Where a run continues from: `--resume` resolved to one checked tag, and the checks that a
tag fits this run, before any process group or weight exists. Shared by every training verb
(the resolver and completeness check are `checkpoint.check`'s, as `gigamim consolidate` uses)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gigamim.checkpoint.layout import CheckpointError
from gigamim.config import Config


@dataclass(frozen=True)
class ResumePoint:
    root: Path
    tag: str
    universal: bool  # DeepSpeed's universal format (loads on any world size with load_universal)
    meta: dict

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def resolve_resume(spec: str | None, ckpt_dir: str, world_size: int, say=print) -> ResumePoint | None:
    """`--resume` -> the checked tag to load, or None to start fresh ('auto' with nothing saved)."""
    if not spec:
        return None
    from gigamim.checkpoint.check import resolve_checked
    from gigamim.checkpoint.layout import is_universal, read_meta

    found = resolve_checked(ckpt_dir if spec == "auto" else spec, missing_ok=spec == "auto")
    if found is None:
        say(f"gigamim: no checkpoint in {ckpt_dir}; starting from step 0")
        return None
    resolved, _ = found
    if resolved.note:
        say(f"gigamim: warning: {resolved.note}")
    universal = is_universal(resolved.tag_dir)
    meta = read_meta(resolved.tag_dir)
    saved_world = meta.get("world_size")
    # A tag whose engine reshards on load (its meta says so: DCP tags) resumes on any world
    # size as it is; the data position follows through the loader's elastic resume.
    reshardable = universal or bool(meta.get("reshardable"))
    if not reshardable and saved_world is not None and saved_world != world_size:
        raise CheckpointError(
            f"{resolved.tag_dir} was saved by {saved_world} ranks and this run has {world_size}: convert it first "
            f"(`gigamim consolidate {resolved.root} --tag {resolved.tag} --universal`) and resume from "
            f"{resolved.tag_dir}_universal")
    return ResumePoint(resolved.root, resolved.tag, universal, meta)


def check_compatible(meta: dict, cfg: Config, tag_dir: Path, say=print, task: str = "pretrain") -> None:
    """Before any weight is read: the tag's model must be this run's model (else one line
    instead of a wall of missing state_dict keys after DeepSpeed has read every partition).
    SwinV2 weights follow another image size or window (the position bias is a continuous
    MLP of relative offsets and the index tables are rebuilt), so those are warnings."""
    saved_engine, engine = meta.get("engine"), cfg.train.engine
    if saved_engine and saved_engine != engine:
        # Each engine reads its own files (ZeRO partitions, DCP shards): one line, before any weight.
        raise CheckpointError(f"{tag_dir} was written by train.engine={saved_engine} and this run has "
                              f"train.engine={engine}: resume with --set train.engine={saved_engine}, or start from "
                              f"its weights (`gigamim consolidate {tag_dir} OUT`, then finetune.weights=OUT)")
    saved_task = meta.get("task", "pretrain")  # tags before 0.2 are all pretraining's
    if saved_task != task:
        raise CheckpointError(f"{tag_dir} is a {saved_task} checkpoint and this is `gigamim {task}`: give "
                              f"{'finetune.weights' if task == 'finetune' else 'another checkpoint.dir'} instead "
                              "of --resume, or resume it with the verb that wrote it")
    if task == "finetune" and meta.get("num_classes") not in (None, cfg.finetune.num_classes):
        raise CheckpointError(f"{tag_dir} has a {meta['num_classes']}-class head and this run has "
                              f"finetune.num_classes={cfg.finetune.num_classes}: resume with --set "
                              f"finetune.num_classes={meta['num_classes']}, or start fresh in another checkpoint.dir")
    saved = meta.get("model")
    if saved and saved != cfg.model.name:
        raise CheckpointError(f"{tag_dir} holds model {saved} and this run is model.name={cfg.model.name}: "
                              f"resume with --set model.name={saved}, or start fresh in another checkpoint.dir")
    for key, now in (("img_size", cfg.model.img_size), ("window_size", cfg.model.window_size)):
        old = meta.get(key)
        if old is not None and now is not None and old != now:
            say(f"gigamim: warning: model.{key} changed since {tag_dir.name}: {old} -> {now}; "
                f"the weights follow (SwinV2's position bias is continuous), the numbers will not be those of {old}")
