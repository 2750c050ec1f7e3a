"""SimMIMLoader on real tar shards: equal batch counts, epoch coverage, determinism, exact resume."""

import json
import math
from collections import Counter

import pytest
import torch

from gigamim.data.loader import SimMIMLoader
from tests.test_data_helpers import collect, write_dataset

SMALL = dict(img_size=64, mask_patch_size=32, model_patch_size=4, shuffle_buffer=8)


def epoch_keys(loader):
    return [k for b in collect(loader, len(loader)) for k in b["key"]]


@pytest.mark.parametrize("sizes,world,workers,mb", [
    ([13], 4, 2, 2),                 # 1 shard, 4 ranks x 2 workers
    ([1, 7, 3, 0, 12], 3, 2, 3),     # uneven shards, an empty one
    ([5, 5], 2, 0, 4),               # in-process
])
def test_equal_batches_and_each_sample_once(tmp_path, sizes, world, workers, mb):
    index, keys = write_dataset(tmp_path, sizes, w=64, h=64)
    n = len(keys)
    per_rank = math.ceil(n / (world * mb))
    seen = Counter()
    for r in range(world):
        loader = SimMIMLoader(index, mb, rank=r, world_size=world, num_workers=workers, seed=3, **SMALL)
        assert len(loader) == per_rank
        batches = collect(loader, per_rank)
        assert all(b["image"].shape == (mb, 3, 64, 64) and b["mask"].shape == (mb, 16, 16) for b in batches)
        assert batches[-1]["state"]["epoch"] == 1 and batches[-1]["state"]["batch"] == 0
        seen.update(k for b in batches for k in b["key"])
    assert set(seen) == set(keys)                                  # every sample
    assert sum(seen.values()) == world * per_rank * mb             # padding fills equal counts...
    assert sum(c - 1 for c in seen.values()) == world * per_rank * mb - n   # ...and is the only repetition


def test_deterministic_and_epochs_differ(tmp_path):
    index, keys = write_dataset(tmp_path, [6, 6, 6, 6])
    a = collect(SimMIMLoader(index, 4, num_workers=0, seed=7, **SMALL), 12)
    b = collect(SimMIMLoader(index, 4, num_workers=0, seed=7, **SMALL), 12)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))
    e0 = [k for x in a[:6] for k in x["key"]]
    e1 = [k for x in a[6:] for k in x["key"]]
    assert sorted(e0) == sorted(e1) == sorted(keys) and e0 != e1
    c = collect(SimMIMLoader(index, 4, num_workers=0, seed=8, **SMALL), 6)
    assert [k for x in c for k in x["key"]] != e0


@pytest.mark.parametrize("workers,world,mb,mode", [(0, 1, 3, "epoch"), (2, 2, 2, "epoch"),  # 5 batches: odd per worker
                                                   (0, 2, 2, "resampled")])
def test_exact_resume(tmp_path, workers, world, mb, mode):
    index, _ = write_dataset(tmp_path, [7, 9, 4])
    kw = dict(rank=world - 1, world_size=world, num_workers=workers, seed=1, mode=mode, **SMALL)
    loader = SimMIMLoader(index, mb, **kw)
    nb = len(loader)
    full = collect(loader, 2 * nb + 1)
    for k in (1, nb - 1, nb + 2):   # mid-epoch, last batch of an epoch, second epoch
        state = json.loads(json.dumps(full[k - 1]["state"]))   # what a checkpoint stores
        resumed = SimMIMLoader(index, mb, **kw)
        resumed.load_state_dict(state)
        got = collect(resumed, len(full) - k)
        for want, have in zip(full[k:], got):
            assert have["key"] == want["key"]
            assert torch.equal(have["image"], want["image"]) and torch.equal(have["mask"], want["mask"])


def test_fast_forward_does_not_decode(tmp_path):
    index, _ = write_dataset(tmp_path, [40, 40])
    loader = SimMIMLoader(index, 4, num_workers=0, **SMALL)
    loader.load_state_dict({**loader.state_dict(), "batch": 15})
    batch = next(iter(loader))
    assert loader.decode_count == 4          # only the 4 images of batch 15, none of the 60 before
    assert loader.state_dict()["batch"] == 16 and len(batch["key"]) == 4


def test_crops_do_not_depend_on_worker_count(tmp_path):
    index, _ = write_dataset(tmp_path, [6, 6])
    by_key = []
    for workers in (0, 2):
        loader = SimMIMLoader(index, 2, num_workers=workers, seed=4, **SMALL)
        by_key.append({k: (b["image"][i], b["mask"][i]) for b in collect(loader, len(loader))
                       for i, k in enumerate(b["key"])})
    assert by_key[0].keys() == by_key[1].keys()
    for k, (img, mask) in by_key[0].items():
        assert torch.equal(img, by_key[1][k][0]) and torch.equal(mask, by_key[1][k][1])


def test_resampled_mode(tmp_path):
    index, keys = write_dataset(tmp_path, [3, 5])
    loader = SimMIMLoader(index, 4, mode="resampled", num_workers=0, world_size=2, rank=0, **SMALL)
    assert len(loader) == 1
    got = collect(loader, 4)
    assert all(set(b["key"]) <= set(keys) and len(b["key"]) == 4 for b in got)
    again = collect(SimMIMLoader(index, 4, mode="resampled", num_workers=0, world_size=2, rank=0, **SMALL), 4)
    assert [b["key"] for b in got] == [b["key"] for b in again]


def test_pipe_urls_and_no_index(tmp_path):
    index, keys = write_dataset(tmp_path, [4, 3])
    urls = [f"pipe:cat {tmp_path}/part-000.tar", f"pipe:cat {tmp_path}/part-001.tar"]
    loader = SimMIMLoader(urls, 7, num_workers=0, **SMALL)        # counts by reading the pipes once
    assert loader.num_samples == 7
    assert sorted(epoch_keys(loader)) == sorted(keys)
    brace = SimMIMLoader(f"{tmp_path}/part-{{000..001}}.tar", 7, num_workers=0, index=index, **SMALL)
    assert sorted(epoch_keys(brace)) == sorted(keys)


def test_state_mismatch_starts_next_epoch(tmp_path):
    """Another seed (a different sample order) cannot continue the epoch; another world size can
    (tests/test_data_elastic.py)."""
    index, _ = write_dataset(tmp_path, [8])
    a = SimMIMLoader(index, 2, num_workers=0, **SMALL)
    collect(a, 2)
    b = SimMIMLoader(index, 2, num_workers=0, world_size=2, seed=99, **SMALL)
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.state_dict()["batch"]) == (1, 0)
    with pytest.raises(ValueError, match="not a SimMIMLoader state"):
        b.load_state_dict({"epoch": 0})


def test_one_warning_when_fewer_shards_than_streams(tmp_path, caplog):
    index, _ = write_dataset(tmp_path, [5])
    with caplog.at_level("WARNING", logger="gigamim.data"):
        loader = SimMIMLoader(index, 2, rank=3, world_size=4, num_workers=2, **SMALL)
        collect(loader, len(loader))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "1 non-empty shard(s) for 4 ranks x 2 workers" in msgs[0]
