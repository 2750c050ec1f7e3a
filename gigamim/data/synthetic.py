"""Procedural images a masked-image model can learn to reconstruct, written as ordinary shards.

Each image is a smooth two-colour gradient, a periodic texture patch (stripes or
checkers) and 1-4 filled shapes (ellipses, rectangles, triangles) with a little noise:
structure a model can infer from the unmasked 40% (continuations of edges, periodic
patterns, flat fills), unlike pure noise. Image i depends only on (seed, i), so shards
are deterministic and can be generated in parallel. `cls` is the largest shape's type.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle")


def synthetic_image(index: int, image_size: int = 256, seed: int = 0) -> tuple[Image.Image, int]:
    rng = np.random.default_rng([seed, index, 0x5A7])
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 * (1 - t) + c1 * t
    # A textured rectangle: stripes or checkers with a random period and orientation.
    x0, y0 = rng.integers(0, s // 2, 2)
    w, h = rng.integers(s // 4, s // 2, 2)
    period = rng.uniform(s / 32, s / 8)
    th = rng.uniform(0, np.pi)
    u = (np.cos(th) * xx + np.sin(th) * yy) * s / period
    v = (-np.sin(th) * xx + np.cos(th) * yy) * s / period
    pattern = np.sin(2 * np.pi * u) > 0 if rng.random() < 0.5 else (np.floor(u) + np.floor(v)) % 2 == 0
    colour = rng.uniform(0, 255, 3)
    region = np.zeros((s, s), dtype=bool)
    region[y0:y0 + h, x0:x0 + w] = True
    img[region & pattern] = colour
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    largest, largest_area = 0, -1.0
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, len(SHAPES)))
        cx, cy = rng.uniform(0, s, 2)
        rx, ry = rng.uniform(s / 16, s / 4, 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        if SHAPES[kind] == "ellipse":
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif SHAPES[kind] == "rectangle":
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            draw.polygon([(cx, cy - ry), (cx - rx, cy + ry), (cx + rx, cy + ry)], fill=fill)
        if rx * ry > largest_area:
            largest, largest_area = kind, rx * ry
    arr = np.asarray(pil, dtype=np.int16) + rng.integers(-6, 7, (s, s, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), largest


def synthetic_sample(index: int, image_size: int = 256, seed: int = 0, quality: int = 90) -> dict:
    """One shard sample: {"__key__", "jpg", "cls"} with deterministic JPEG bytes."""
    img, cls = synthetic_image(index, image_size, seed)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return {"__key__": f"synth{index:09d}", "jpg": buf.getvalue(), "cls": str(cls).encode()}


def write_synthetic_shards(out_dir, num_images: int, *, image_size: int = 256, samples_per_shard: int = 1000,
                           seed: int = 0, workers: int = 1, max_size: int | None = None, prefix: str = "synth",
                           progress: bool = False) -> str:
    """Write `num_images` synthetic JPEGs as tar shards + index.json in `out_dir`; returns the index path."""
    from gigamim.data.shard_sink import ShardSink, parallel_map

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    with ShardSink(out_dir, max_count=samples_per_shard, max_size=max_size, prefix=prefix,
                   progress_total=num_images if progress else None) as sink:
        for sample in parallel_map(_make, [(i, image_size, seed) for i in range(num_images)], workers):
            sink.write(sample)
    return sink.index_path


def _make(args):
    return synthetic_sample(*args)
