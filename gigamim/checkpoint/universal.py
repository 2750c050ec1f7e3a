"""ZeRO checkpoint -> DeepSpeed's universal format (`gigamim consolidate --universal`).

Writes `<CKPT_DIR>/<TAG>_universal` (or OUT) with the tag's `gigamim_config.yaml` and
`gigamim_meta.json` (meta gains `"universal": true, "source_tag", "source_world_size"`).
DeepSpeed's own convention is kept: `<CKPT_DIR>/latest_universal` names the new folder, and
`latest` is NOT changed, because a `latest` that names a universal folder breaks every
resume that does not set `checkpoint.load_universal`. `gigamim pretrain --resume
<CKPT_DIR>/<TAG>_universal` resumes it on any world size (the trainer sets load_universal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile

from gigamim.checkpoint.check import open_checkpoint
from gigamim.checkpoint.layout import (CONFIG_FILE, LATEST_UNIVERSAL_FILE, META_FILE, UNIVERSAL_SUFFIX, CheckpointError,
                                       atomic_write, replace_path)
from gigamim.checkpoint.zero_fp32 import quiet_output


def to_universal(ckpt_dir: str, tag: str | None = None, out: str | None = None, overwrite: bool = False,
                 workers: int = 1, quiet: bool = True) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (loadable on any world
    size with `checkpoint.load_universal`). Returns the universal tag folder."""
    info = open_checkpoint(ckpt_dir, tag)
    if info.format != "zero":
        raise CheckpointError(f"{info.tag_dir} is a torch.distributed.checkpoint tag: it resumes on any world size "
                              "as it is (--resume it directly); --universal converts DeepSpeed tags only")
    from deepspeed.checkpoint import ds_to_universal

    out = os.path.abspath(out or os.path.join(info.root, info.tag + UNIVERSAL_SUFFIX))
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".partial", dir=parent)
    except OSError as e:  # a read-only checkpoint folder (a mounted archive) is a user's choice, not a crash
        raise CheckpointError(f"cannot write the universal checkpoint into {parent} ({e.strerror or e}): give OUT "
                              "in a writable folder (gigamim consolidate CKPT_DIR --universal OUT)") from None
    latest_universal = os.path.join(parent, LATEST_UNIVERSAL_FILE)
    previous = open(latest_universal, encoding="utf-8").read() if os.path.isfile(latest_universal) else None
    args = argparse.Namespace(input_folder=info.tag_dir, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              # ZeRO-1/2 conversion asserts a version record that plain
                              # (non-Megatron) models do not save; DeepSpeed's flag adds it.
                              inject_missing_state=True)
    try:
        with quiet_output(quiet):
            ds_to_universal.main(args)
        if os.path.isfile(os.path.join(info.tag_dir, CONFIG_FILE)):
            shutil.copy2(os.path.join(info.tag_dir, CONFIG_FILE), os.path.join(tmp, CONFIG_FILE))
        meta = dict(info.meta, universal=True, source_tag=info.tag, source_world_size=info.world_size)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        replace_path(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        # ds_to_universal pointed latest_universal at the temporary folder; undo that.
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(latest_universal)
        else:
            with open(latest_universal, "w", encoding="utf-8") as f:
                f.write(previous)
        raise
    atomic_write(latest_universal, os.path.basename(out))
    return out
