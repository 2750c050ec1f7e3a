"""A checked checkpoint's fp32 weights, lazily, whatever wrote them, and their provenance.

`lazy_fp32_state_dict(info)` picks the reader of the tag's format (`CheckpointInfo.format`,
set by `check.check_checkpoint` from what the folder holds): DeepSpeed's ZeRO partitions
(`zero_fp32`) or torch.distributed.checkpoint files (`dcp`). Both give the model's own
state-dict keys as lazy tensors (`.shape`, `.dtype`, `.contiguous()`), so `gigamim
consolidate` and `gigamim export` write the same safetensors for either.
"""

from __future__ import annotations

from gigamim.checkpoint.check import CheckpointInfo


def lazy_fp32_state_dict(info: CheckpointInfo, quiet: bool = True) -> dict:
    """name -> lazy fp32 tensor of a checked tag (`check.open_checkpoint`)."""
    if info.format == "dcp":
        from gigamim.checkpoint.dcp import lazy_fp32_state_dict as from_dcp

        return from_dcp(info.tag_dir)
    from gigamim.checkpoint.zero_fp32 import lazy_fp32_state_dict as from_zero

    return from_zero(info, quiet=quiet)


def metadata_for(info: CheckpointInfo, fmt: str) -> dict[str, str]:
    """safetensors metadata (strings only) describing where weights came from."""
    from gigamim import __version__

    md = {
        "format": fmt,
        "gigamim_version": str(info.meta.get("version", __version__)),
        "exported_by": f"gigamim {__version__}",
        "step": str(info.meta.get("step", "")),
        "model": str(info.meta.get("model", "")),
        "img_size": str(info.meta.get("img_size", "")),
        "source_tag": info.tag,
        "source_world_size": str(info.world_size),
        # the ZeRO stage of a DeepSpeed tag; "" for a DCP tag (no ZeRO stage)
        "zero_stage": "" if info.zero_stage is None else str(info.zero_stage),
        "dtype": "float32",
    }
    if info.config_yaml is not None:
        md["gigamim_config"] = info.config_yaml
    return md
