"""Bytes read per epoch per rank from `pipe:` shards at 2 ranks x 2 workers, against bytes needed.

Shards are read through `pipe:python benchmarks/count_cat.py FILE LOG`, which logs the bytes
it wrote into the pipe: the measurement is outside the reader, so the same script measures
any gigamim version (run it with PYTHONPATH at an old checkout for "before"). Cases:
  epoch         one full epoch, ranks 0 and 1 each with 2 DataLoader workers (run concurrently)
  resume        a resume at the middle of the epoch, read to its end
  cache         the same with `cache_dir` (new versions only): epoch 1, epoch 2, then the resume
"bytes needed" = the tar bytes (headers + padded data) of the samples a rank consumes.
Also writes bytes read from local files (the reader's own counter, new versions only).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import platform
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def write_shards(root, n_shards, per_shard, side=160):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = {}
    for s in range(n_shards):
        path = os.path.join(root, f"b-{s:03d}.tar")
        with tarfile.open(path, "w") as tf:
            for i in range(per_shard):
                key = f"s{s:03d}_{i:04d}"
                arr = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="JPEG", quality=80)
                for ext, data in (("jpg", buf.getvalue()), ("cls", b"1")):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                    sizes[key] = sizes.get(key, 0) + 512 + -(-len(data) // 512) * 512
    return sizes


def _rank(args):
    urls, rank, mb, start_batch, n_batches, kw, out = args
    from gigamim.data.loader import SimMIMLoader

    loader = SimMIMLoader(urls, mb, rank=rank, world_size=2, num_workers=2, seed=0, img_size=64,
                          mask_patch_size=32, shuffle_buffer=64, **kw)
    n_epoch = len(loader)
    if start_batch:
        state = loader.state_dict()
        state["batch"] = start_batch
        loader.load_state_dict(state)
    keys = []
    it = iter(loader)
    for _ in range(n_batches if n_batches else n_epoch - start_batch):
        keys += next(it)["key"]
    with open(out, "w") as f:
        json.dump({"keys": keys, "n_epoch": n_epoch, "bytes_read": getattr(loader, "bytes_read", None),
                   "bytes_fetched": getattr(loader, "bytes_fetched", None)}, f)


def run_case(urls, mb, start, n, kw, tmp, tag):
    outs = [os.path.join(tmp, f"{tag}-r{r}.json") for r in (0, 1)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=((urls, r, mb, start, n, kw, outs[r]),)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{tag}: a rank failed ({p.exitcode})")
    return [json.load(open(o)) for o in outs]


def read_log(log):
    total = 0
    opens = 0
    if os.path.exists(log):
        for line in open(log):
            total += int(line.rsplit("\t", 1)[1])
            opens += 1
    os.remove(log) if os.path.exists(log) else None
    return total, opens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=40)
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--label", default="after")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--cache", action="store_true", help="also run the cache_dir cases (new versions)")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="gigamim-bytes-")
    sizes = write_shards(tmp, args.shards, args.per_shard)
    files = [os.path.join(tmp, f"b-{s:03d}.tar") for s in range(args.shards)]
    log = os.path.join(tmp, "pipe.log")
    urls = [f"pipe:{sys.executable} {HERE}/count_cat.py {log} {f}" for f in files]
    dataset = sum(os.path.getsize(f) for f in files)
    result = {"label": args.label, "shards": args.shards, "samples": args.shards * args.per_shard,
              "dataset_tar_bytes": dataset, "micro_batch": args.mb, "world": 2, "workers": 2, "cases": {}}
    index = {f"b-{s:03d}.tar": args.per_shard for s in range(args.shards)}

    def case(name, start, kw, n=None, shard_urls=None):
        t = time.perf_counter()
        ranks = run_case(shard_urls or urls, args.mb, start, n, {"index": index, **kw}, tmp, name)
        read, opens = read_log(log)
        needed = [sum(sizes[k] for k in set(r["keys"])) for r in ranks]
        result["cases"][name] = {"pipe_bytes_read_total": read, "pipe_opens": opens,
                                 "bytes_needed_per_rank": needed, "bytes_needed_total": sum(needed),
                                 "read_over_needed": round(read / max(sum(needed), 1), 3),
                                 "reader_bytes_read_per_rank": [r["bytes_read"] for r in ranks],
                                 "cache_bytes_fetched_per_rank": [r["bytes_fetched"] for r in ranks],
                                 "wall_s": round(time.perf_counter() - t, 2)}
        print(name, json.dumps(result["cases"][name]), flush=True)
        return ranks

    ranks = case("epoch", 0, {})
    half = ranks[0]["n_epoch"] // 2
    case("resume_mid_epoch", half, {})
    if args.cache:
        case("local_epoch", 0, {}, shard_urls=files)
        case("local_resume_mid_epoch", half, {}, shard_urls=files)
        cache = os.path.join(tmp, "cache")
        case("cache_epoch1", 0, {"cache_dir": cache})
        case("cache_epoch2", 0, {"cache_dir": cache})
        case("cache_resume_mid_epoch", half, {"cache_dir": cache})
        small = os.path.join(tmp, "cache_small")
        case("cache_bounded_quarter_epoch1", 0, {"cache_dir": small, "cache_size": dataset // 4})
        result["cases"]["cache_bounded_quarter_epoch1"]["cache_dir_bytes_after"] = sum(
            os.path.getsize(os.path.join(small, n)) for n in os.listdir(small) if n.endswith(".tar"))
    import PIL
    import torch
    import webdataset
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                         "torch": torch.__version__, "webdataset": webdataset.__version__, "PIL": PIL.__version__,
                         "loadavg": os.getloadavg()}
    result["command"] = " ".join(sys.argv)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
