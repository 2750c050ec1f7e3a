"""Labelled shards -> in-memory (uint8 images, labels) for probing and small fine-tunes.

A small adapter until the data package's classification loader lands: it reads the same
webdataset tar shards (`gigamim make-shards` of an ImageFolder writes `<key>.cls`, an ASCII
int) through gigamim's own tar reader, decodes each image once, resizes the short side to
``img_size`` and centre-crops (the usual evaluation transform). Samples without a ``.cls``
member are an error naming the shard: a probe or fine-tune without labels is meaningless.
"""

from __future__ import annotations

import json
import os

import torch


class LabelError(ValueError):
    """Shards that cannot give (image, label) pairs; the message names the shard and the fix."""


def class_names(shards) -> list[str]:
    """Class names from the index.json next to / given as ``shards`` (make-shards report), or []."""
    path = str(shards)
    if not path.endswith(".json"):
        return []
    for candidate in (path, os.path.join(os.path.dirname(path), "make_shards_report.json")):
        try:
            with open(candidate, encoding="utf-8") as f:
                names = json.load(f).get("classes") or []
            if names:
                return [str(n) for n in names]
        except (OSError, ValueError, AttributeError):
            continue
    return []


def _eval_resize(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_labelled(shards, img_size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, S, S), int64 (N,)) of every sample of ``shards`` (index.json, brace
    pattern or list), in shard order."""
    from gigamim.data.loader import resolve_shards
    from gigamim.data.tario import ShardError, iter_samples, pick_image
    from gigamim.data.transforms import BadSample, decode_rgb, pil_to_uint8_chw

    try:
        urls, _ = resolve_shards(shards)
    except (ValueError, FileNotFoundError) as e:
        raise LabelError(str(e)) from None
    images, labels = [], []
    for url in urls:
        if not os.path.exists(url) and "://" not in url and not url.startswith("pipe:"):
            raise LabelError(f"shard {url} does not exist")
        try:
            for _, key, files in iter_samples(url):
                if "cls" not in files:
                    raise LabelError(f"sample {key!r} in {url} has no .cls label member; build labelled shards with "
                                     "`gigamim make-shards` from an ImageFolder (one subfolder per class)")
                picked = pick_image(files)
                if picked is None:
                    continue
                try:
                    img, _ = decode_rgb(picked[1])
                except BadSample:
                    continue
                try:
                    labels.append(int(files["cls"].decode().strip()))
                except ValueError:
                    raise LabelError(f"sample {key!r} in {url}: .cls is not an integer") from None
                images.append(pil_to_uint8_chw(_eval_resize(img, img_size)).contiguous())
                if limit is not None and len(images) >= limit:
                    break
        except ShardError as e:
            raise LabelError(str(e)) from None
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise LabelError(f"no labelled images in {shards}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
