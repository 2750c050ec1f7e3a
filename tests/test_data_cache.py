"""Per-node shard cache: one download per shard however many processes ask, size-bounded, same samples."""

import multiprocessing as mp
import os
import sys

from gigamim.data import shard_cache
from gigamim.data.loader import SimMIMLoader
from tests.test_data_helpers import collect, write_dataset

SMALL = dict(img_size=32, mask_patch_size=16, model_patch_size=4, shuffle_buffer=4)
COUNT_CAT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "count_cat.py")


def _pipe(log, path):
    return f"pipe:{sys.executable} {COUNT_CAT} {log} {path}"


def _fetch(args):
    url, cache = args
    return shard_cache.fetch(url, cache)


def _downloads(log):
    return [line.split("\t")[0] for line in open(log)] if os.path.exists(log) else []


def test_one_download_for_concurrent_processes(tmp_path):
    _, _ = write_dataset(tmp_path, [5], w=40, h=40)
    log, cache = str(tmp_path / "log"), str(tmp_path / "cache")
    url = _pipe(log, tmp_path / "part-000.tar")
    with mp.get_context("fork").Pool(4) as pool:
        paths = pool.map(_fetch, [(url, cache)] * 8)
    assert len(set(paths)) == 1 and len(_downloads(log)) == 1
    assert open(paths[0], "rb").read() == (tmp_path / "part-000.tar").read_bytes()
    assert not [n for n in os.listdir(cache) if ".tmp" in n]


def test_loader_reads_the_cache_and_bounds_it(tmp_path):
    index, keys = write_dataset(tmp_path, [4, 4, 4, 4], w=40, h=40)
    log, cache = str(tmp_path / "log"), str(tmp_path / "cache")
    urls = [_pipe(log, tmp_path / f"part-00{i}.tar") for i in range(4)]
    counts = {f"part-00{i}.tar": 4 for i in range(4)}
    plain = SimMIMLoader(urls, 4, index=counts, num_workers=2, **SMALL)
    want = [b["key"] for b in collect(plain, 2 * len(plain))]
    os.remove(log)
    cached = SimMIMLoader(urls, 4, index=counts, num_workers=2, cache_dir=cache, **SMALL)
    got = [b["key"] for b in collect(cached, 2 * len(cached))]
    assert got == want                                          # same samples, same order
    assert sorted(_downloads(log)) == sorted(str(tmp_path / f"part-00{i}.tar") for i in range(4))   # once each
    one = os.path.getsize(tmp_path / "part-000.tar")
    small = str(tmp_path / "small")
    bounded = SimMIMLoader(urls, 4, index=counts, num_workers=0, cache_dir=small, cache_size=2 * one + 100, **SMALL)
    collect(bounded, len(bounded))
    held = [n for n in os.listdir(small) if n.endswith(".tar")]
    assert 1 <= len(held) <= 2
