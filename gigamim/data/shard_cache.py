"""A per-node cache of remote / `pipe:` shards: download a shard once, then read it as a local file.

Semantics follow webdataset's `cache_dir` (`webdataset.cache`): a shard is fetched whole
through webdataset's `gopen` into `cache_dir`, later opens read the local copy, and the
folder is kept under `cache_size` bytes by deleting the least recently used shards
(webdataset's LRUCleanup). What is ours:
- safe with many ranks and DataLoader workers on one node: one `flock` per shard, so a
  shard is downloaded by one process while the others wait for it; downloads go to a
  temporary name and are renamed into place (a crash never leaves a half shard that
  looks complete); eviction holds a folder-wide lock and never deletes the shard just
  fetched (a file deleted while another process reads it stays readable on POSIX);
- a local file gives seeks, so skipping members (resume, other streams' samples) costs
  no bytes, where a pipe streams everything up to the last member needed;
- names are `<sha1 of the URL, 12 hex>-<basename>`: readable, and two URLs with the same
  basename never collide (webdataset's `url_to_cache_name` keeps only the basename).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re

from gigamim.data import tario
from gigamim.data.shardspec import shard_name


def cache_name(url: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", shard_name(url))[-100:] or "shard"
    return f"{hashlib.sha1(url.encode('utf-8')).hexdigest()[:12]}-{base}"


class _Lock:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def fetch(url: str, cache_dir: str, cache_size: int | None = None, chunk: int = 1 << 20) -> str:
    """Local path of `url` in the cache, downloading it first if needed (raises OSError etc.)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, cache_name(url))
    with _Lock(path + ".lock"):
        if os.path.exists(path):
            os.utime(path)                          # mtime = last use, for the LRU
            return path
        from webdataset.gopen import gopen

        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with gopen(url, "rb") as src, open(tmp, "wb") as dst:
                while True:
                    data = src.read(chunk)
                    if not data:
                        break
                    tario.BYTES_READ["fetched"] += len(data)
                    dst.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    if cache_size:
        evict(cache_dir, cache_size, keep=path)
    return path


def evict(cache_dir: str, cache_size: int, keep: str | None = None) -> list[str]:
    """Delete least recently used shards until the folder holds <= cache_size bytes."""
    removed = []
    with _Lock(os.path.join(cache_dir, ".evict.lock")):
        entries = []
        for name in os.listdir(cache_dir):
            p = os.path.join(cache_dir, name)
            if name.startswith(".") or name.endswith(".lock") or ".tmp" in name:
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if total <= cache_size:
                break
            if p == keep:
                continue
            with _Lock(p + ".lock"):
                try:
                    os.remove(p)
                    removed.append(p)
                    total -= size
                except FileNotFoundError:
                    pass
    return removed
