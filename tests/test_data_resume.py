"""Exact resume with replaced batches, and elastic resume (another world size mid-epoch)."""

import json
import os
from collections import Counter

import pytest
import torch

from gigamim.data.assign import shard_permutation
from gigamim.data.loader import SimMIMLoader
from tests.test_data_helpers import collect, write_dataset

SMALL = dict(img_size=32, mask_patch_size=16, model_patch_size=4, shuffle_buffer=1)


def test_resume_after_every_batch_with_a_deleted_shard(tmp_path):
    index, _ = write_dataset(tmp_path, [6, 6, 6], w=40, h=40)
    seed = 5
    last = int(shard_permutation(3, seed, 0)[-1])      # the shard read last in epoch 0: its stream runs dry
    os.remove(tmp_path / f"part-{last:03d}.tar")
    kw = dict(num_workers=2, seed=seed, **SMALL)
    loader = SimMIMLoader(index, 2, **kw)
    nb = len(loader)
    full = collect(loader, 2 * nb)
    assert loader.skip_counts.get("batch_replaced", 0) >= 2     # the case under test happens
    for k in range(1, 2 * nb):
        state = json.loads(json.dumps(full[k - 1]["state"]))   # what a checkpoint stores
        resumed = SimMIMLoader(index, 2, **kw)
        resumed.load_state_dict(state)
        got = collect(resumed, 2 * nb - k)
        assert [b["key"] for b in got] == [b["key"] for b in full[k:]], k
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, full[k:])), k


def _epoch_from(index, states, world, mb, workers, n_batches=None):
    """Keys that `world` resumed ranks read until the end of the epoch (trainer contract:
    rank r loads saved[str(r)] if it was saved, else saved["0"])."""
    keys, lens, end_states = [], set(), []
    for r in range(world):
        loader = SimMIMLoader(index, mb, rank=r, world_size=world, num_workers=workers, seed=11, **SMALL)
        if states is not None:
            loader.load_state_dict(json.loads(json.dumps(states.get(str(r), states["0"]))))
        nb = len(loader) if n_batches is None else n_batches
        lens.add(len(loader))
        batches = collect(loader, nb)
        keys += [k for b in batches for k in b["key"]]
        end_states.append(batches[-1]["state"])
    return keys, lens, {str(r): s for r, s in enumerate(end_states)}


@pytest.mark.parametrize("new_world,new_workers", [(1, 0), (3, 2)])
def test_elastic_resume_sees_each_sample_once(tmp_path, new_world, new_workers):
    index, all_keys = write_dataset(tmp_path, [10, 14, 6, 18], w=40, h=40)      # 48 samples
    mb = 2
    before, lens, saved = _epoch_from(index, None, 2, mb, 2, n_batches=3)        # 2 ranks x 3 batches, checkpoint
    assert lens == {12}
    after, lens, ends = _epoch_from(index, saved, new_world, mb, new_workers)
    assert len(lens) == 1 and lens.pop() * new_world * mb == 48 - len(before)  # equal batches on every rank
    assert Counter(before + after) == Counter(all_keys)                          # each sample exactly once
    assert all(s["epoch"] == 1 and s["batch"] == 0 for s in ends.values())       # then a full new epoch
    nxt, lens, _ = _epoch_from(index, ends, new_world, mb, new_workers)
    assert sorted(set(nxt)) == sorted(all_keys) and lens == {-(-48 // (new_world * mb))}


def test_elastic_twice_with_padding(tmp_path):
    """2 ranks -> 3 ranks -> 1 rank inside one epoch; uneven splits pad only the last stage."""
    index, all_keys = write_dataset(tmp_path, [7, 9, 13], w=40, h=40)            # 29 samples
    mb = 2
    a, _, s1 = _epoch_from(index, None, 2, mb, 1, n_batches=2)                   # 8 consumed
    b, lens, s2 = _epoch_from(index, s1, 3, mb, 2, n_batches=2)                  # 12 more (of 21 left)
    assert lens == {4}                                                          # ceil(21 / 6)
    c, lens, _ = _epoch_from(index, s2, 1, mb, 0)
    assert lens == {5}                                                           # ceil(9 / 2): 1 padding slot
    seen = Counter(a + b + c)
    assert set(seen) == set(all_keys) and sum(seen.values()) == 30              # 29 + 1 padding repeat


def test_resume_inside_an_elastic_stage_is_exact(tmp_path):
    """2 ranks -> 3 ranks, then a plain resume (same 3 ranks) inside that stage: the same batches."""
    index, _ = write_dataset(tmp_path, [7, 9, 13], w=40, h=40)
    _, _, s1 = _epoch_from(index, None, 2, 2, 1, n_batches=2)
    full = []
    for r in range(3):
        loader = SimMIMLoader(index, 2, rank=r, world_size=3, num_workers=2, seed=11, **SMALL)
        loader.load_state_dict(json.loads(json.dumps(s1.get(str(r), s1["0"]))))
        full.append(collect(loader, len(loader)))
    for r in range(3):
        resumed = SimMIMLoader(index, 2, rank=r, world_size=3, num_workers=2, seed=11, **SMALL)
        resumed.load_state_dict(json.loads(json.dumps(full[r][0]["state"])))
        got = collect(resumed, len(full[r]) - 1)
        assert [b["key"] for b in got] == [b["key"] for b in full[r][1:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, full[r][1:]))
