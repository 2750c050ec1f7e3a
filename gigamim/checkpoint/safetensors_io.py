"""Streaming safetensors writer (one file or HF-style shards + index) and a safe reader.

Why our own writer: `safetensors.torch.save_file` wants every tensor of a file in memory
at once and copies them into one byte buffer, so writing a 12 GB SwinV2-G file costs
~2x its size in RAM. The format is simple (8-byte header length, JSON header, raw
little-endian bytes), so we write the header from shapes alone and then stream one
tensor at a time: peak memory is the largest single tensor. Tensors may be "lazy":
anything with `.shape`, `.dtype` and `.contiguous()` (a torch.Tensor, DeepSpeed's
zero_to_fp32 `GatheredTensor`, or `SafetensorsRef` below) is materialised only while
its bytes are written.

Reading always goes through the `safetensors` library (never pickle), so files we
write are checked by an independent implementation.

Output layout (`save`):
  * OUT ends in `.safetensors` -> exactly that one file (no size limit);
  * otherwise OUT is a folder: `model.safetensors`, or, above `max_shard_size`,
    `model-00001-of-0000N.safetensors` ... + `model.safetensors.index.json`
    (`{"metadata": {"total_size": ..., ...}, "weight_map": {key: file}}`, as
    Hugging Face writes it).
Every output is written under a temporary name and renamed into place, so a crash
never leaves a half-written file where a reader would take it for a finished one.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from gigamim.checkpoint.layout import remove_path, replace_path
from gigamim.sizes import parse_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPES_BACK = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(Exception):
    """A safetensors file/folder that cannot be read or written; the message names it."""




def _nbytes(t: Any, dtype: torch.dtype | None) -> int:
    numel = 1
    for d in t.shape:
        numel *= int(d)
    return numel * (dtype or t.dtype).itemsize


def _out_dtype(t: Any, dtype: torch.dtype | None) -> torch.dtype:
    # Only floating tensors change dtype; integer/bool buffers keep their exact values.
    return dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype


def _header_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None,
                  dtype: torch.dtype | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise SafetensorsError(f"safetensors metadata values must be strings; not strings: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in tensors.items():
        out = _out_dtype(t, dtype)
        if out not in _DTYPES:
            raise SafetensorsError(f"tensor {name!r} has dtype {out}, which safetensors cannot store")
        n = _nbytes(t, out)
        header[name] = {"dtype": _DTYPES[out], "shape": [int(d) for d in t.shape], "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def _write_file(path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None,
                dtype: torch.dtype | None, progress: bool = False) -> None:
    """Write one safetensors file at `path` (caller handles atomic placement)."""
    from tqdm import tqdm

    with open(path, "wb") as f:
        f.write(_header_bytes(tensors, metadata, dtype))
        for name, lazy in tqdm(tensors.items(), desc=os.path.basename(path).split(".partial")[0], unit="tensor",
                               disable=not progress, leave=False):
            t = lazy.contiguous()
            out = _out_dtype(lazy, dtype)
            if tuple(t.shape) != tuple(lazy.shape):
                raise SafetensorsError(f"tensor {name!r} materialised with shape {tuple(t.shape)}, "
                                       f"expected {tuple(lazy.shape)}")
            t = t.detach().to(device="cpu", dtype=out).contiguous()
            if t.numel():
                # A uint8 view avoids numpy's missing bfloat16 and any copy of the data.
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())


def plan_shards(tensors: Mapping[str, Any], max_shard_size: int | str | None,
                dtype: torch.dtype | None = None) -> list[list[str]]:
    """Keys split into consecutive groups of at most `max_shard_size` bytes (a larger
    single tensor gets a shard of its own)."""
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t, _out_dtype(t, dtype))
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save(out: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
         max_shard_size: int | str | None = "5GB", dtype: torch.dtype | None = None,
         overwrite: bool = False, progress: bool = False) -> list[str]:
    """Write `tensors` to `out` (a `.safetensors` file or a folder, see module doc).
    Returns the written weight files. Nothing appears at `out` unless all of it was written."""
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if out.endswith(".safetensors"):
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".partial", dir=parent)
        os.close(fd)
        try:
            _write_file(tmp, tensors, metadata, dtype, progress)
            replace_path(tmp, out)
        except BaseException:
            remove_path(tmp)
            raise
        return [out]

    tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", suffix=".partial", dir=parent)
    try:
        shards = plan_shards(tensors, max_shard_size, dtype)
        names = ([SINGLE_NAME] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for fname, keys in zip(names, shards):
            _write_file(os.path.join(tmp_dir, fname), {k: tensors[k] for k in keys}, metadata, dtype, progress)
            weight_map.update({k: fname for k in keys})
        if len(shards) > 1:
            total = sum(_nbytes(t, _out_dtype(t, dtype)) for t in tensors.values())
            index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}
            with open(os.path.join(tmp_dir, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        replace_path(tmp_dir, out)
    except BaseException:
        remove_path(tmp_dir)
        raise
    return [os.path.join(out, n) for n in names]


# ----------------------------------------------------------------------------- reading


def weight_files(path: str) -> list[str]:
    """The safetensors files behind `path`: a file, an index json, or a folder holding
    `model.safetensors` or `model.safetensors.index.json`."""
    if os.path.isdir(path):
        for name in (INDEX_NAME, SINGLE_NAME):
            if os.path.isfile(os.path.join(path, name)):
                return weight_files(os.path.join(path, name))
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if len(found) == 1:
            return [os.path.join(path, found[0])]
        raise SafetensorsError(f"{path} holds neither {SINGLE_NAME} nor {INDEX_NAME}"
                               + (f" (found {found})" if found else ""))
    if not os.path.isfile(path):
        raise SafetensorsError(f"{path} does not exist")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            files = list(dict.fromkeys(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise SafetensorsError(f"{path} is not a safetensors index (needs a 'weight_map'): {e}") from None
        base = os.path.dirname(path)
        paths = [os.path.join(base, f) for f in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise SafetensorsError(f"index {path} names shard files that are missing: {missing}")
        return paths
    return [path]


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants
        raise SafetensorsError(f"cannot read safetensors file {path}: {e}") from None


class SafetensorsRef:
    """A lazy tensor in a safetensors file: shape and dtype from the header, data read
    (memory-mapped) only by `.contiguous()`."""

    def __init__(self, handle, key: str, path: str):
        self._handle, self.key, self.path = handle, key, path
        sl = handle.get_slice(key)
        self.shape = torch.Size(sl.get_shape())
        self.dtype = _DTYPES_BACK[sl.get_dtype()]

    def contiguous(self) -> torch.Tensor:
        return self._handle.get_tensor(self.key)


def open_lazy(path: str) -> tuple[dict[str, SafetensorsRef], dict[str, str]]:
    """All tensors behind `path` as lazy references, plus the metadata of its first file."""
    refs: dict[str, SafetensorsRef] = {}
    metadata: dict[str, str] | None = None
    for file in weight_files(path):
        h = _open(file)
        if metadata is None:
            metadata = dict(h.metadata() or {})
        for k in h.keys():
            if k in refs:
                raise SafetensorsError(f"key {k!r} appears in both {refs[k].path} and {file}")
            refs[k] = SafetensorsRef(h, k, file)
    return refs, metadata or {}


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a safetensors file / index / folder; no pickle involved."""
    refs, metadata = open_lazy(path)
    return {k: r.contiguous() for k, r in refs.items()}, metadata
