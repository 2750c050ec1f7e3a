"""Cost of EXIF orientation in the decode path: SimMIMTransform.apply ms/image on JPEGs without
EXIF, with Orientation=1 and with Orientation=6, against the same transform with the EXIF step
switched off (same run, interleaved rounds, medians). Sizes: 256x192 (no draft) and 1024x768
(draft decode at reduced scale)."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import time


def jpeg(w, h, orientation=None):
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def timed(fn, data, n):
    t = time.perf_counter()
    for i in range(n):
        fn(data, random.Random(i))
    return (time.perf_counter() - t) / n * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from gigamim.data import transforms

    t = transforms.SimMIMTransform(192)
    real = transforms.exif_orientation
    res = {}
    for w, h in ((256, 192), (1024, 768)):
        for name, orient in (("no_exif", None), ("orientation_1", 1), ("orientation_6", 6)):
            data = jpeg(w, h, orient)
            on, off = [], []
            for _ in range(args.rounds):
                transforms.exif_orientation = real
                on.append(timed(t.apply, data, args.n))
                transforms.exif_orientation = lambda img: 1
                off.append(timed(t.apply, data, args.n))
            transforms.exif_orientation = real
            res[f"{w}x{h}_{name}"] = {"ms_with_exif_step": round(statistics.median(on), 4),
                                      "ms_without_exif_step": round(statistics.median(off), 4),
                                      "ratio": round(statistics.median(on) / statistics.median(off), 3)}
            print(f"{w}x{h} {name}: {res[f'{w}x{h}_{name}']}", flush=True)
    import PIL
    out = {"results": res, "n": args.n, "rounds": args.rounds, "command": " ".join(sys.argv),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "PIL": PIL.__version__,
                       "python": sys.version.split()[0], "loadavg": os.getloadavg()},
           "note": "orientation_6 without the EXIF step is the old, sideways output: its ratio is the price of "
                   "the transpose; no_exif/orientation_1 ratios are the price of reading the tag"}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
