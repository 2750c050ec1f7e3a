"""Writing webdataset tar shards: `ShardSink` (size / count-limited shards, an index.json with
the classes and counts) and `parallel_map`; used by `gigamim make-shards` and the synthetic
data writer alike."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Iterable, Iterator

INDEX_NAME = "index.json"
REPORT_NAME = "make_shards_report.json"


def sanitize_key(name: str, limit: int = 64) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return safe[-limit:] if safe else "x"




def _tar_bytes(sample: dict) -> int:
    return sum(512 + math.ceil(len(v) / 512) * 512 for k, v in sample.items() if not k.startswith("__"))


class ShardSink:
    """Writes samples ({"__key__": str, ext: bytes, ...}) into size/count-limited shards."""

    def __init__(self, out_dir, max_count: int = 1000, max_size: int | None = None, prefix: str = "shard",
                 progress_total: int | None = None, overwrite: bool = True, classes: list[str] | None = None):
        import webdataset as wds

        self._wds = wds
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = os.path.abspath(str(out_dir))
        os.makedirs(self.out_dir, exist_ok=True)
        self.index_path = os.path.join(self.out_dir, INDEX_NAME)
        if not overwrite and os.path.exists(self.index_path):
            raise FileExistsError(f"{self.index_path} exists; pass --overwrite to replace the shards in {self.out_dir}")
        self.max_count, self.max_size, self.prefix = max_count, max_size, prefix
        self.shards: list[dict] = []
        self.total = 0
        self.classes = list(classes) if classes else None
        self._writer = None
        self._count = self._size = 0
        self._bar = None
        if progress_total is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, unit="img", desc="make-shards", dynamic_ncols=True)

    def _open(self):
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        # Fixed header fields so equal input gives byte-identical tars. mtime is an int on
        # purpose: tarfile writes a float mtime as an extra PAX header block per member.
        self._writer = self._wds.TarWriter(os.path.join(self.out_dir, name), encoder=False, mtime=0,
                                           user="gigamim", group="gigamim", mode=0o644)
        self.shards.append({"url": name, "num_samples": 0})
        self._count = self._size = 0

    def _close_shard(self):
        if self._writer is not None:
            self._writer.close()
            self.shards[-1]["num_samples"] = self._count
            self._writer = None

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"unsafe shard key {key!r}: only [A-Za-z0-9_-] allowed")
        size = _tar_bytes(sample)
        full = self._writer is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_size and self._count > 0 and self._size + size + 1024 + 10240 > self.max_size))
        if self._writer is None or full:
            self._close_shard()
            self._open()
        self._writer.write(sample)
        self._count += 1
        self._size += size
        self.total += 1
        if self._bar is not None:
            self._bar.update(1)

    def skip(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        self._close_shard()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        with open(self.index_path, "w", encoding="utf-8") as f:
            index = {"shards": self.shards, "total": self.total}
            if self.classes:
                index["classes"] = self.classes
            json.dump(index, f, indent=1)
            f.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parallel_map(fn, items: Iterable, workers: int) -> Iterator:
    """fn over items in input order (deterministic output), in `workers` processes when > 1."""
    if workers <= 1:
        yield from map(fn, items)
        return
    import multiprocessing as mp

    with mp.get_context("fork" if sys.platform != "win32" else "spawn").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=8)
