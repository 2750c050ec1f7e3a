"""Helpers for the data tests (no tests here): real images and real tar files written with
the standard library's `tarfile`, independent of gigamim's own writer."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def image_bytes(w=80, h=80, seed=0, mode="RGB", fmt="JPEG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3 + seed * 7) % 256, (yy * 3) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    base = np.clip(base.astype(int) + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    if mode == "I;16":
        img = Image.fromarray(base[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def write_tar(path, members) -> str:
    """members: [(name, bytes)] in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return str(path)


def write_dataset(root, sizes, *, w=72, h=72, prefix="part") -> tuple[str, list[str]]:
    """Shards with sizes[i] JPEG samples each (plus a .cls member) and an index.json; returns (index, keys)."""
    os.makedirs(root, exist_ok=True)
    keys, shards = [], []
    n = 0
    for i, size in enumerate(sizes):
        members = []
        for _ in range(size):
            key = f"s{n:05d}"
            members += [(f"{key}.jpg", image_bytes(w, h, seed=n)), (f"{key}.cls", str(n % 3).encode())]
            keys.append(key)
            n += 1
        name = f"{prefix}-{i:03d}.tar"
        write_tar(os.path.join(root, name), members)
        shards.append({"url": name, "num_samples": size})
    index = os.path.join(root, "index.json")
    with open(index, "w") as f:
        json.dump({"shards": shards, "total": n}, f)
    return index, keys


def collect(loader, n):
    it = iter(loader)
    out = []
    for _ in range(n):
        b = next(it)
        out.append({"key": list(b["key"]), "image": b["image"].clone(), "mask": b["mask"].clone(),
                    "state": loader.state_dict()})
    return out
