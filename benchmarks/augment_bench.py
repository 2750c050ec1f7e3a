"""Cost of the official fine-tuning augmentation (issue 22), as ratios within one run:
- worker side: ClassifyTransform ms/image with timm's RandAugment 'rand-m9-mstd0.5-inc1' (seeded per
  sample, global RNGs restored) against the plain crop + flip, on 500x375 JPEGs -> 224 px;
- trainer side: transforms.random_erasing (timm's RandomErasing per sample under its seed, p 0.25,
  pixel) on a normalised (B,3,224,224) fp32 batch against normalize_on_device of the same batch.
Interleaved rounds, medians of process CPU time (the machine is shared)."""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import sys
import time


def jpeg(w, h, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 3 + seed) % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 30, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def cpu_ms(fn, n):
    t = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - t) / n * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch

    from gigamim.data.transforms import ClassifyTransform, normalize_on_device, random_erasing

    torch.set_num_threads(1)
    data = [jpeg(500, 375, s) for s in range(8)]
    plain = ClassifyTransform(224, train=True)
    aug = ClassifyTransform(224, train=True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    x8 = torch.randint(0, 256, (a.batch, 3, 224, 224), dtype=torch.uint8)
    seeds = torch.randint(0, 2**62, (a.batch,))
    rows = {"plain_ms": [], "randaug_ms": [], "normalize_ms": [], "erasing_ms": []}
    for _ in range(a.rounds):
        rows["plain_ms"].append(cpu_ms(lambda i: plain(data[i % 8], random.Random(i)), a.images))
        rows["randaug_ms"].append(cpu_ms(lambda i: aug(data[i % 8], random.Random(i)), a.images))
        rows["normalize_ms"].append(cpu_ms(lambda i: normalize_on_device(x8), 5))
        x = normalize_on_device(x8)
        rows["erasing_ms"].append(cpu_ms(lambda i: random_erasing(x, seeds + i, 0.25, "pixel", 1), 5))
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {"what": __doc__.splitlines()[0], "medians": med,
           "randaug_over_plain_per_image": med["randaug_ms"] / med["plain_ms"],
           "erasing_over_normalize_per_batch": med["erasing_ms"] / med["normalize_ms"],
           "erasing_ms_per_image": med["erasing_ms"] / a.batch, "rounds": rows, "batch": a.batch,
           "images_per_round": a.images, "threads": 1, "machine": platform.processor() or platform.machine(),
           "python": sys.version.split()[0], "torch": torch.__version__, "command": " ".join(sys.argv)}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
