"""Shards written by webdataset read with webdataset's grouping: same keys, same count."""

import io
import json
import os
import subprocess

import pytest
import webdataset as wds
from PIL import Image

from gigamim.data import shard_cache
from gigamim.data.errors import DataError
from gigamim.data.loader import SimMIMLoader, resolve_shards
from gigamim.data.shardspec import shard_name
from gigamim.data.tario import iter_samples, pick_image
from tests.test_data_helpers import collect, image_bytes, write_tar

SMALL = dict(img_size=32, mask_patch_size=16, model_patch_size=4, shuffle_buffer=4, num_workers=0)


def solid(colour, fmt="JPEG", size=48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def wds_samples(urls):
    """Reference: what webdataset.WebDataset yields (raw bytes, no decoding, no shuffling)."""
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    return [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in ds]


def ours(urls):
    return [(k, sorted(f)) for url in urls for _, k, f in iter_samples(url, read_exts=None)]


def _write_tarwriter_set(root, n_shards=3, per_shard=4):
    """Keys with dots in directory names, multi-part exts, .json and .cls per sample."""
    pattern = os.path.join(root, "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(n_shards * per_shard):
            sink.write({"__key__": f"photos.v2/2024.06/img{i:04d}", "input.jpg": solid((200, 10, 10)),
                        "target.png": solid((10, 10, 200), fmt="PNG"),
                        "json": json.dumps({"i": i}).encode(), "cls": str(i % 5).encode()})
    return [pattern % s for s in range(n_shards)]


def test_shardwriter_set_reads_like_webdataset(tmp_path):
    urls = _write_tarwriter_set(str(tmp_path))
    ref = wds_samples(urls)
    assert len(ref) == 12 and ref[0] == ("photos.v2/2024.06/img0000", ["cls", "input.jpg", "json", "target.png"])
    assert ours(urls) == ref
    loader = SimMIMLoader(urls, 4, **SMALL)                     # counts by our own header scan
    assert loader.num_samples == len(ref)
    epoch = [k for b in collect(loader, len(loader)) for k in b["key"]]
    assert sorted(epoch) == sorted(k for k, _ in ref)


def test_tarwriter_single_and_awkward_names(tmp_path):
    path = str(tmp_path / "one.tar")
    with wds.TarWriter(path) as sink:
        for i, key in enumerate(["a.b/c", "d/e", "plain", "x.y.z/k"]):
            sink.write({"__key__": key, "jpg": solid((i * 40, 0, 0)), "seg.png": solid((0, 0, 0), fmt="PNG"),
                        "cls": b"1"})
    assert ours([path]) == wds_samples([path])
    # Hand-written: dotted basenames group by the first dot; no-ext and __meta__ members are ignored.
    members = [("img.0001.jpg", image_bytes(40, 40, seed=1)), ("img.0002.jpg", image_bytes(40, 40, seed=2)),
               ("dir.v2/a.jpg", image_bytes(40, 40, seed=3)), ("dir.v2/a.seg.png", image_bytes(40, 40, fmt="PNG")),
               ("README", b"no extension"), ("__meta__.json", b"{}"), ("b.JPG", image_bytes(40, 40, seed=4))]
    write_tar(tmp_path / "hand.tar", members)
    assert ours([str(tmp_path / "hand.tar")]) == wds_samples([str(tmp_path / "hand.tar")])


def test_old_gigamim_shards_read_the_same(tmp_path):
    """make-shards keys never had dots: `<8 digits>_<name>.<ext>` (+ .cls) -> key = name minus ext."""
    members = []
    for i in range(5):
        members += [(f"{i:08d}_cat_a{i}.jpg", image_bytes(40, 40, seed=i)), (f"{i:08d}_cat_a{i}.cls", b"0")]
    write_tar(tmp_path / "shard-000000.tar", members)
    got = ours([str(tmp_path / "shard-000000.tar")])
    assert got == [(f"{i:08d}_cat_a{i}", ["cls", "jpg"]) for i in range(5)]


@pytest.mark.parametrize("image_key,colour", [(None, 0), ("target.png", 2), ("webp;target.png", 2)])
def test_image_member_priority(tmp_path, image_key, colour):
    urls = _write_tarwriter_set(str(tmp_path), n_shards=1)
    loader = SimMIMLoader(urls, 4, image_key=image_key, **SMALL)
    img = collect(loader, 1)[0]["image"].float()
    assert int(img.mean(dim=(0, 2, 3)).argmax()) == colour      # input.jpg is red, target.png blue
    files = {"seg.png": b"1", "input.jpg": b"2", "target.png": b"3"}
    assert pick_image(files)[0] == "input.jpg" and pick_image({**files, "png": b"4"})[0] == "png"
    assert pick_image(files, "nope") is None


def test_missing_image_key_is_skipped_by_reason(tmp_path):
    urls = _write_tarwriter_set(str(tmp_path), n_shards=1)
    loader = SimMIMLoader(urls, 4, image_key="depth.png", **SMALL)
    with pytest.raises(DataError, match="no readable image"):
        collect(loader, 1)
    assert loader.skip_counts["no_image"] == 4


def test_pipe_urls_read_and_are_named_like_webdataset(tmp_path):
    """A `pipe:` URL is a command handed whole to the shell (webdataset's gopen), and its shard
    is named after the URL inside the command (webdataset's `pipe_cleaner` rule): `aws s3 cp
    s3://bucket/train/part-0.tar -` is part-0.tar (in logs, the cache, an index), not `-`."""
    from webdataset.cache import pipe_cleaner

    src = tmp_path / "src"
    src.mkdir()
    for s in range(2):                                   # shards written by GNU tar, not by Python
        names = []
        for i in range(3):
            (src / f"s{s}k{i}.jpg").write_bytes(image_bytes(40, 40, seed=3 * s + i))
            (src / f"s{s}k{i}.cls").write_bytes(str(i).encode())
            names += [f"s{s}k{i}.cls", f"s{s}k{i}.jpg"]
        subprocess.run(["tar", "cf", str(tmp_path / f"part-{s}.tar"), "-C", str(src), *names], check=True)
    aws = tmp_path / "aws"                               # `aws s3 cp s3://.../<name> -` serving the local copy
    aws.write_text(f'#!/bin/sh\nexec cat "{tmp_path}/$(basename "$3")"\n')
    aws.chmod(0o755)
    s3 = f"pipe:{aws} s3 cp s3://bucket/train/part-0.tar -"
    piped = f"pipe:cat '{tmp_path}/part-1.tar' | cat"    # quotes and a pipeline: the shell's business
    for url in (s3, piped):
        ref = wds_samples([url])
        assert len(ref) == 3 and ref[0][1] == ["cls", "jpg"]
        assert ours([url]) == ref
    # the name: webdataset's rule (its function is marked obsolete, so call the undecorated one)
    assert shard_name(s3) == os.path.basename(pipe_cleaner.__wrapped__(s3)) == "part-0.tar"
    assert shard_name(f"pipe:cat {tmp_path}/part-1.tar") == "part-1.tar"
    # ... which is how an index's counts find pipe URLs, and what the cache file is called
    with open(tmp_path / "index.json", "w") as f:
        json.dump({"shards": [{"url": "part-0.tar", "num_samples": 3}], "total": 3}, f)
    assert resolve_shards([s3], index=str(tmp_path / "index.json")) == ([s3], [3])
    cached = shard_cache.fetch(s3, str(tmp_path / "cache"))
    assert cached.endswith("-part-0.tar")
    assert open(cached, "rb").read() == (tmp_path / "part-0.tar").read_bytes()
