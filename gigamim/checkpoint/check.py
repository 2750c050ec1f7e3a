"""Is a checkpoint whole? The completeness check that consolidation, export and resume share.

`check_checkpoint` verifies, BEFORE any weight is read: the tag exists and is complete
(`layout.resolve`), then by what the folder holds. DeepSpeed's files: every rank's
model/optimizer partition file that the recorded data-parallel world size calls for is
present and not truncated (zip directory check), no file of another world size is mixed in,
and the optimizer partitions agree on stage and partition count. torch.distributed.checkpoint
files (`checkpoint.dcp`): the `.metadata` index is readable and every data file it names is
present and long enough, and the engine-state file is whole. Any failure raises
`CheckpointError` naming the file and what to do.

`resolve_checked` is what `--resume` uses: the resolver's pick, checked; a damaged pick
falls back to the newest complete tag that passes, with a note saying what was damaged.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gigamim.checkpoint.layout import (CONFIG_FILE, META_FILE, CheckpointError, Resolved, check_zip, is_tag_dir,
                                       is_universal, read_meta, resolve)


@dataclass
class CheckpointInfo:
    root: str  # the folder holding `latest` and the tag folders
    tag: str
    tag_dir: str
    zero_stage: int | None  # DeepSpeed's ZeRO stage; None for a DCP tag
    world_size: int  # data-parallel ranks that saved it
    model_files: list[str] = field(default_factory=list)  # DCP: every data file (model and optimizer)
    optim_files: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # gigamim_meta.json, {} when absent
    config_yaml: str | None = None  # gigamim_config.yaml text, None when absent
    format: str = "zero"  # "zero" (ZeRO partition files) or "dcp" (torch.distributed.checkpoint files)


def _torch_load(path: str):
    import torch

    try:
        # mmap: only the pickled structure is read; tensors stay on disk until touched.
        # weights_only=False: DeepSpeed pickles its own classes (its checkpoints only).
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read partition file {path}: {type(e).__name__}: {e}. "
                              "Use an earlier tag "
                              "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) "
                              "or re-save the checkpoint.") from None


def _read_config(tag_dir: str) -> str | None:
    path = os.path.join(tag_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def check_dcp_checkpoint(resolved: Resolved) -> CheckpointInfo:
    """Completeness check of a torch.distributed.checkpoint tag (`checkpoint.dcp`)."""
    from gigamim.checkpoint.dcp import check_dcp

    tag_dir = str(resolved.tag_dir)
    files, ranks = check_dcp(tag_dir)
    meta = read_meta(tag_dir)
    world = int(meta.get("world_size", ranks))
    if ranks > world:
        raise CheckpointError(f"checkpoint {tag_dir} mixes world sizes: {os.path.join(tag_dir, META_FILE)} says "
                              f"{world} ranks but {ranks} ranks wrote its data files")
    return CheckpointInfo(root=str(resolved.root), tag=resolved.tag, tag_dir=tag_dir, zero_stage=None,
                          world_size=world, model_files=files, meta=meta, config_yaml=_read_config(tag_dir),
                          format="dcp")


def check_checkpoint(ckpt_dir: str | os.PathLike, tag: str | None = None) -> CheckpointInfo:
    """Completeness check of a checkpoint tag (the one `layout.resolve` picks), by what the
    folder holds: torch.distributed.checkpoint files, else DeepSpeed's ZeRO files; raises
    CheckpointError naming the damaged file, reads no weights."""
    from gigamim.checkpoint.dcp import is_dcp_tag

    resolved = resolve(ckpt_dir, tag)
    if is_dcp_tag(resolved.tag_dir):
        return check_dcp_checkpoint(resolved)
    return check_zero_checkpoint(resolved)


def check_written(tag_dir: str | os.PathLike) -> CheckpointInfo:
    """The files check of a tag whose ranks have just written it, before gigamim marks it
    complete (meta, `latest`): the same check as `check_checkpoint`, without asking for the
    meta file that is about to be written."""
    from gigamim.checkpoint.dcp import is_dcp_tag

    resolved = Resolved(Path(tag_dir).parent, Path(tag_dir).name)
    return check_dcp_checkpoint(resolved) if is_dcp_tag(tag_dir) else check_zero_checkpoint(resolved)


def check_zero_checkpoint(resolved: Resolved) -> CheckpointInfo:
    """Completeness check of a DeepSpeed ZeRO tag (its per-rank partition files)."""
    root, tag, tag_dir = str(resolved.root), resolved.tag, str(resolved.tag_dir)
    model_files = sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt")))
    optim_files = sorted(glob.glob(os.path.join(tag_dir, "*_optim_states.pt")))
    if not model_files and not optim_files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed checkpoint files (*_model_states.pt, "
                              "*_optim_states.pt)")
    if is_universal(tag_dir) and not optim_files:
        raise CheckpointError(f"{tag_dir} is a universal checkpoint; consolidate the tag it was made from")

    # Stage 3 saves one model-states file per rank, stages 1/2 one for all ranks.
    stage3 = bool(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_*_model_states.pt")))
    first_model = (os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt") if stage3
                   else os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    if not os.path.isfile(first_model):
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {os.path.basename(first_model)} is missing")
    check_zip(first_model)
    state = _torch_load(first_model)
    world = state.get("dp_world_size") if isinstance(state, dict) else None
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{first_model} records no data-parallel world size (dp_world_size); "
                              "is it a DeepSpeed checkpoint?")
    if state.get("mp_world_size", 1) != 1:
        raise CheckpointError(f"{first_model}: model-parallel checkpoints (mp_world_size="
                              f"{state['mp_world_size']}) are not supported")
    del state

    prefix = ""  # DeepSpeed's bf16 optimizer names its partitions bf16_zero_pp_rank_*
    if any(os.path.basename(f).startswith("bf16_") for f in optim_files):
        prefix = "bf16_"
    want_optim = [os.path.join(tag_dir, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)]
    want_model = ([os.path.join(tag_dir, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
                  if stage3 else [first_model])
    missing = [f for f in want_model + want_optim if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(
            f"checkpoint {tag_dir} is incomplete: {first_model} records world size {world} but "
            f"{', '.join(os.path.basename(m) for m in missing)} {'is' if len(missing) == 1 else 'are'} missing "
            "(a rank did not finish saving). Use an earlier tag "
            "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or re-save.")
    extra = sorted(set(model_files + optim_files) - set(want_model + want_optim))
    if extra:
        raise CheckpointError(
            f"checkpoint {tag_dir} mixes world sizes: {first_model} records world size {world} but "
            f"{', '.join(os.path.basename(e) for e in extra)} also exist (left over from a save with more ranks?). "
            "Remove the extra files or re-save into a fresh tag.")

    meta = read_meta(tag_dir)  # resolve() already refused a gigamim tag without its meta
    meta_path = os.path.join(tag_dir, META_FILE)
    if meta:
        if "world_size" in meta and int(meta["world_size"]) != world:
            raise CheckpointError(f"world size mismatch: {meta_path} says {meta['world_size']} but "
                                  f"{first_model} records {world}")
    config_yaml = _read_config(tag_dir)

    for f in want_model[1:] + want_optim:
        check_zip(f)
    stage = None
    numels = []
    for f in want_optim:
        osd = _torch_load(f).get("optimizer_state_dict", {})
        f_stage, count = osd.get("zero_stage"), osd.get("partition_count")
        if f_stage is None or count is None:
            raise CheckpointError(f"{f} is not a ZeRO optimizer partition (no zero_stage/partition_count)")
        count = max(count) if isinstance(count, list) else count
        if count != world:
            raise CheckpointError(f"world size mismatch: {f} was saved as one of {count} partitions but "
                                  f"{first_model} records world size {world}")
        stage = int(f_stage) if stage is None else stage
        if int(f_stage) != stage:
            raise CheckpointError(f"{f} is a ZeRO stage {int(f_stage)} partition, the others are stage {stage}")
        if stage == 3:
            numels.append(sum(t.numel() for t in osd.get("fp32_flat_groups", [])))
    if stage == 3 and len(set(numels)) > 1:
        raise CheckpointError(f"ZeRO-3 partitions of {tag_dir} differ in size ({numels} elements per rank): "
                              "files from different saves are mixed")
    if (stage == 3) != stage3:
        raise CheckpointError(f"{tag_dir}: optimizer partitions are ZeRO stage {stage} but the model-states "
                              "files have the other stage's layout")
    return CheckpointInfo(root=root, tag=tag, tag_dir=tag_dir, zero_stage=stage, world_size=world,
                          model_files=want_model, optim_files=want_optim, meta=meta, config_yaml=config_yaml)


def check_universal(tag_dir: str | os.PathLike) -> None:
    """A universal folder (`ds_to_universal` output): its model-states file is whole and it
    has per-parameter folders. Loading it is DeepSpeed's `load_universal` path."""
    tag_dir = str(tag_dir)
    if not is_universal(tag_dir):
        raise CheckpointError(f"{tag_dir} is not a complete universal checkpoint (no model states or no zero/)")
    for f in sorted(glob.glob(os.path.join(tag_dir, "*_model_states.pt"))):
        check_zip(f)


def check_tag(resolved: Resolved) -> CheckpointInfo | None:
    """The check that fits the tag's format; CheckpointError when damaged. None for a
    universal folder (no per-rank partitions to describe)."""
    if is_universal(resolved.tag_dir):
        check_universal(resolved.tag_dir)
        return None
    return check_checkpoint(resolved.root, resolved.tag)


def resolve_checked(path: str | os.PathLike, tag: str | None = None, *, missing_ok: bool = False
                    ) -> tuple[Resolved, CheckpointInfo | None] | None:
    """`layout.resolve` + `check_tag`: (resolved, info), or None when `missing_ok` and there
    is nothing to resume. With neither a tag nor a tag folder given, a damaged pick is
    excluded and the next newest complete tag is tried; the returned `note` says what was
    damaged. An explicitly named tag that is damaged raises."""
    explicit = tag is not None or is_tag_dir(path)
    damaged: list[str] = []
    notes: list[str] = []
    while True:
        try:
            r = resolve(path, tag, missing_ok=missing_ok, exclude=tuple(damaged))
        except CheckpointError:
            if damaged:  # every candidate was damaged
                raise CheckpointError(f"no undamaged checkpoint in {path}: {'; '.join(notes)}") from None
            raise
        if r is None:
            if damaged:
                raise CheckpointError(f"no undamaged checkpoint in {path}: {'; '.join(notes)}")
            return None
        try:
            info = check_tag(r)
        except CheckpointError as e:
            if explicit:
                raise
            damaged.append(r.tag)
            notes.append(str(e))
            continue
        if damaged:
            # Each note is a sentence of its own ("... re-save the checkpoint."): no ".;" joints.
            r = Resolved(r.root, r.tag, note="; ".join([n.rstrip(". ") for n in notes]
                                                       + [f"using the newest complete tag {r.tag}"]))
        return r, info


def open_checkpoint(path: str | os.PathLike, tag: str | None = None) -> CheckpointInfo:
    """The checked checkpoint that `--resume` would pick, for the consolidate/export verbs; a
    fallback is said in one line on stderr."""
    r, info = resolve_checked(path, tag)
    if r.note:
        print(f"gigamim: warning: {r.note}", file=sys.stderr)
    if info is None:
        raise CheckpointError(f"{r.tag_dir} is a universal checkpoint; consolidate the tag it was made from")
    return info
