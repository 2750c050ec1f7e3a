"""Bad data never stops a run: each case is counted under its reason; pickles are never loaded."""

import io
import json
import os
import pickle
import tarfile

import pytest

from gigamim.data.errors import DataError
from gigamim.data.loader import SimMIMLoader
from tests.test_data_helpers import collect, image_bytes, write_dataset, write_tar

TINY = dict(img_size=32, mask_patch_size=16, model_patch_size=4, shuffle_buffer=4, num_workers=0)


class _Creates:
    """Unpickling this calls open(path, "w"), i.e. creates a file: the canary."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _one_epoch(loader):
    return collect(loader, len(loader))


def test_each_bad_case_is_counted(tmp_path):
    good = image_bytes(80, 80, seed=1)
    members = [
        ("good1.jpg", good),
        ("corrupt.jpg", good[:200] + bytes(range(256)) * 8),               # garbage after the header
        ("truncated.jpg", good[: len(good) // 2]),
        ("truncpng.png", image_bytes(80, 80, fmt="PNG")[:300]),
        ("empty.jpg", b""),
        ("textonly.txt", b"no image here"),
        ("fake.jpg", b"this is not an image at all" * 10),
        ("cmyk.jpg", image_bytes(80, 80, mode="CMYK")),
        ("gray16.png", image_bytes(80, 80, mode="I;16", fmt="PNG")),
        ("palette.png", image_bytes(80, 80, mode="P", fmt="PNG", transparency=0)),
        ("rgba.png", image_bytes(80, 80, mode="RGBA", fmt="PNG")),
        ("gray.jpg", image_bytes(80, 80, mode="L")),
        ("small.jpg", image_bytes(20, 20)),
        ("good2.jpg", good),
    ]
    write_tar(tmp_path / "bad.tar", members)
    loader = SimMIMLoader([str(tmp_path / "bad.tar")], 7, **TINY)
    assert loader.num_samples == 14 and len(loader) == 2
    batches = _one_epoch(loader)
    assert loader.skip_counts == {"corrupt_image": 3, "empty_member": 1, "no_image": 1, "not_an_image": 1}
    assert loader.fix_counts == {"converted_cmyk": 1, "converted_16bit": 1, "converted_alpha": 2,
                                 "converted_l": 1, "upscaled_small": 1}
    bad = {"corrupt", "truncated", "truncpng", "empty", "textonly", "fake"}
    for b in batches:   # full batches; bad slots hold good images of the same stream
        assert b["image"].shape == (7, 3, 32, 32) and not bad & set(b["key"])
    assert json.loads(json.dumps(loader.state_dict()))["skip_counts"] == loader.skip_counts


def test_missing_and_truncated_shards(tmp_path):
    index, keys = write_dataset(tmp_path, [6, 6, 6], w=40, h=40)
    os.remove(tmp_path / "part-001.tar")                      # listed in the index, gone
    whole = (tmp_path / "part-002.tar").read_bytes()
    cut = len(whole) * 6 // 10
    (tmp_path / "part-002.tar").write_bytes(whole[:cut])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:       # reference: members wholly before the cut
        cut_off = {m.name.split(".")[0] for m in tf.getmembers() if m.offset_data + m.size > cut}
    intact = {k for k in keys[12:] if k not in cut_off}          # every member of the sample intact
    intact_jpgs = len(intact)
    loader = SimMIMLoader(index, 6, **TINY)
    batches = _one_epoch(loader)
    assert loader.skip_counts["shard_unreadable"] == 6
    assert loader.skip_counts["truncated_shard"] == 6 - intact_jpgs
    seen = {k for b in batches for k in b["key"]}
    assert seen == set(keys[:6]) | intact


def test_nothing_readable_names_the_shards(tmp_path):
    index, _ = write_dataset(tmp_path, [3, 3], w=40, h=40)
    for name in ("part-000.tar", "part-001.tar"):
        os.remove(tmp_path / name)
    loader = SimMIMLoader(index, 2, **TINY)
    with pytest.raises(DataError, match="^rank 0 found no readable image.*part-000.tar.*part-001.tar"):
        next(iter(loader))
    with pytest.raises(ValueError, match="no samples in the 2 shard.*part-000.tar"):
        SimMIMLoader([str(tmp_path / "part-000.tar"), str(tmp_path / "part-001.tar")], 2, **TINY)


def test_pickle_member_is_never_unpickled(tmp_path):
    canary = tmp_path / "unpickled.txt"
    payload = pickle.dumps(_Creates(str(canary)))
    members = []
    for i in range(4):
        members += [(f"k{i}.jpg", image_bytes(48, 48, seed=i))]
        members += [(f"k{i}.{ext}", payload) for ext in ("pyd", "pickle", "pkl", "pth")]
    write_tar(tmp_path / "p.tar", members)
    loader = SimMIMLoader([str(tmp_path / "p.tar")], 2, **TINY)
    assert sorted(k for b in _one_epoch(loader) for k in b["key"]) == ["k0", "k1", "k2", "k3"]
    from gigamim.data.make_shards import make_shards
    make_shards(str(tmp_path / "p.tar"), str(tmp_path / "out"), progress=False)   # re-sharding copies no pickles
    assert not canary.exists()
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        assert not [n for n in tf.getnames() if n.rsplit(".", 1)[-1] in ("pyd", "pickle", "pkl", "pth")]
    pickle.loads(payload)        # the canary works: loading it does create the file
    assert canary.exists()


def test_all_bad_batch_borrows_ahead_then_reuses_last_good(tmp_path):
    good = [image_bytes(40, 40, seed=i) for i in range(2)]
    # shuffle_buffer=1 keeps tar order: batch 0 = (bad, bad) -> first good image ahead of it;
    # batch 2 = (bad, bad) with nothing readable after it -> the rank's last good batch.
    members = [("b0.jpg", b""), ("b1.jpg", b"junk"), ("g0.jpg", good[0]), ("g1.jpg", good[1]),
               ("b2.jpg", b""), ("b3.jpg", b"")]
    write_tar(tmp_path / "x.tar", members)
    loader = SimMIMLoader([str(tmp_path / "x.tar")], 2, **{**TINY, "shuffle_buffer": 1})
    batches = _one_epoch(loader)
    assert [b["key"] for b in batches] == [["g0", "g0"], ["g0", "g1"], ["g0", "g1"]]
    assert loader.skip_counts == {"empty_member": 3, "not_an_image": 1, "batch_replaced": 1}


def test_warnings_are_rate_limited_and_do_not_sleep(tmp_path, caplog):
    members = [(f"k{i:03d}.jpg", b"\xff\xd8\xff\xe0 broken") for i in range(60)] + [("ok.jpg", image_bytes(40, 40))]
    write_tar(tmp_path / "c.tar", members)
    loader = SimMIMLoader([str(tmp_path / "c.tar")], 61, **TINY)
    import time

    from gigamim.data import loader as pipeline
    pipeline._WARN.seen.clear()      # the limiter is per process; earlier tests used up its burst
    pipeline._WARN.last.clear()
    t = time.perf_counter()
    with caplog.at_level("WARNING", logger="gigamim.data"):
        batch = next(iter(loader))
    assert time.perf_counter() - t < 20          # webdataset's warn_* handlers would sleep 0.5 s x 60 = 30 s
    assert sum(loader.skip_counts.values()) == 60 and batch["key"] == ["ok"] * 61
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 3
