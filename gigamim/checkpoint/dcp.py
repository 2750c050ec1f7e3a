"""Reader of torch.distributed.checkpoint (DCP) tags: the completeness check and lazy fp32 weights.

A DCP tag (written by an engine that saves with `dcp.save`, e.g. train.engine=fsdp2) holds:

    .metadata            DCP's index: every tensor's global shape and dtype, and for each
                         chunk the file, offset and length it was written to
    __<rank>_<n>.distcp  each rank's chunks (the model under "model.*", the optimizer under "optim.*")
    engine_state.pt      rank 0's torch.save of the LR schedule and gigamim's client state

`check_dcp` reads only the index and file sizes (no tensor): every file the index names is
present and long enough for the chunks it should hold. `lazy_fp32_state_dict` gives the
model's tensors one at a time (`.contiguous()` loads one tensor with DCP's own reader, no
process group), so peak memory is about the largest tensor, as for the ZeRO reader.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from gigamim.checkpoint.layout import DCP_METADATA_FILE, CheckpointError, check_zip

ENGINE_STATE_FILE = "engine_state.pt"  # beside the DCP files: scheduler + client state (rank 0)
MODEL_KEY = "model"  # the top-level key the model's state dict is saved under


def is_dcp_tag(tag_dir: str | os.PathLike) -> bool:
    tag_dir = Path(tag_dir)
    return (tag_dir / DCP_METADATA_FILE).is_file() or any(tag_dir.glob("*.distcp"))


def read_metadata(tag_dir: str | os.PathLike):
    """DCP's index of the tag; CheckpointError when missing or unreadable."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(tag_dir) / DCP_METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {DCP_METADATA_FILE} (written last by "
                              "torch.distributed.checkpoint) is missing. Use an earlier tag "
                              "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or re-save.")
    try:
        return FileSystemReader(str(tag_dir)).read_metadata()
    except Exception as e:  # a truncated pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}). Use an earlier tag "
                              f"(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or "
                              "re-save the checkpoint.") from None


def check_dcp(tag_dir: str | os.PathLike) -> tuple[list[str], int]:
    """Every data file the index names is present and holds its chunks; the engine state file
    is a whole zip. Returns (data files, ranks that wrote data); reads no tensor."""
    tag_dir = Path(tag_dir)
    md = read_metadata(tag_dir)
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    if not needed:
        raise CheckpointError(f"{tag_dir / DCP_METADATA_FILE} names no data file: is it a DCP checkpoint of a model?")
    for name, end in sorted(needed.items()):
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {name} is missing ({DCP_METADATA_FILE} "
                                  "names it; a rank did not finish saving). Use an earlier tag "
                                  "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or re-save.")
        size = path.stat().st_size
        if size < end:
            raise CheckpointError(f"data file {path} is damaged ({size} bytes, its chunks end at byte {end}): it "
                                  "was truncated or not fully written. Use an earlier tag "
                                  "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or re-save.")
    if not any(k.startswith(f"{MODEL_KEY}.") for k in md.state_dict_metadata):
        raise CheckpointError(f"{tag_dir} holds no model weights ('{MODEL_KEY}.*' entries) in its DCP index")
    state = tag_dir / ENGINE_STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {ENGINE_STATE_FILE} (LR schedule and train "
                              "state) is missing. Use an earlier tag "
                              "(consolidate/export: --tag TAG; pretrain/finetune: --resume CKPT_DIR/TAG) or re-save.")
    check_zip(str(state))
    ranks = {name.split("_")[2] for name in needed if name.startswith("__") and name.count("_") >= 3}
    return [str(tag_dir / n) for n in sorted(needed)], len(ranks)


class _CachedReader:
    """DCP's FileSystemReader with the index read once (each lazy tensor is one DCP load)."""

    def __new__(cls, path: str):
        from torch.distributed.checkpoint import FileSystemReader

        class Reader(FileSystemReader):
            _md = None

            def read_metadata(self, *args, **kwargs):
                if self._md is None:
                    self._md = super().read_metadata(*args, **kwargs)
                return self._md

        return Reader(path)


class _LazyTensor:
    """One model tensor of a DCP tag: `.shape`, `.dtype`, `.contiguous()` loads it (fp32)."""

    def __init__(self, reader, name: str, meta):
        self.reader, self.name = reader, name
        self.shape, self.dtype = meta.size, meta.properties.dtype

    def contiguous(self):
        import torch
        import torch.distributed.checkpoint as dcp

        out = torch.empty(self.shape, dtype=self.dtype)
        with warnings.catch_warnings():
            # no process group here, on purpose (one reader process); DCP warns that it assumes so
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({MODEL_KEY: {self.name: out}}, storage_reader=self.reader, no_dist=True)
        return out.float() if out.is_floating_point() else out


def lazy_fp32_state_dict(tag_dir: str | os.PathLike) -> dict:
    """name -> lazy tensor of the model's state dict (keys as the model's own `state_dict()`)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _CachedReader(str(tag_dir))
    md = reader.read_metadata()
    out = {}
    for flat, meta in md.state_dict_metadata.items():
        path = (md.planner_data or {}).get(flat)
        if not path or path[0] != MODEL_KEY or not isinstance(meta, TensorStorageMetadata):
            continue
        name = ".".join(str(p) for p in path[1:])
        out[name] = _LazyTensor(reader, name, meta)
    if not out:
        raise CheckpointError(f"{tag_dir} holds no model tensors in its DCP index")
    return out
