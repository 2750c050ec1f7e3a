"""Which samples each (rank, worker) stream reads in an epoch, and in what order.

Everything here is a pure function of (shard sample counts, seed, epoch, world size,
workers, micro-batch, mode): no file is opened. That is what makes the position of a
run fully described by (epoch, batch index), and resume exact.

Epoch mode
  1. Shards are permuted with (seed, epoch) BEFORE any split (webdataset shuffles after
     the node/worker split, which repeats the same shard-to-rank assignment every epoch).
  2. The permuted shards form one sequence of N samples. Each rank gets
     B = ceil(N / (world_size * micro_batch)) batches; the sequence is padded to
     world_size * B * micro_batch slots by wrapping round to its start (padding copies
     carry copy=1 so their crops differ), then cut into contiguous chunks: rank-major,
     and within a rank one chunk per worker sized to that worker's batches (worker k
     makes batches k, k+K, k+2K, ...). Cuts fall at sample granularity, so 1 shard
     feeds 4 ranks x 2 workers with equal batch counts and no sample twice.
Resampled mode
  Each stream draws whole shards with replacement (probability ∝ sample count) until it
  has its quota; the nominal epoch has the same length as in epoch mode.
Elastic continuation (a resume on another world size, worker count or micro-batch)
  The global order is the permuted shard sequence above; a plan "stage" cuts a pool of
  that sequence (stage 0: all of it) into streams as described. When an epoch is resumed
  under a different geometry, `remaining_pool` replays the cut of every earlier stage of
  the epoch (from their geometry and batch counts, all in the loader state) to find which
  sequence positions were consumed, and the rest of the epoch is a new stage over the
  positions NOT consumed, in sequence order, cut the same way for the new geometry. Every
  sample is thus seen once per epoch across any number of changes (padding repeats only
  to fill the last stage's equal batches), and batches stay equal across ranks.
Order within a stream
  A bounded-window shuffle: input i is emitted in order of i + U(0, shuffle_buffer).
  Like a shuffle buffer it never holds more than ~shuffle_buffer undecoded samples, but
  its output order is computable up front, so a resumed stream knows which inputs were
  already emitted without reading them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int   # index into the loader's shard list
    start: int   # first sample index inside the shard
    stop: int    # one past the last
    copy: int    # 0 for the first use of these samples in the epoch, >0 for padding / resampling repeats

    def __len__(self) -> int:
        return self.stop - self.start


def batches_per_rank(total: int, world_size: int, micro_batch_size: int) -> int:
    return -(-total // (world_size * micro_batch_size)) if total > 0 else 0


def worker_batch_ids(num_batches: int, num_streams: int, k: int) -> range:
    """Batch indices (within the rank's epoch) that worker stream k produces."""
    return range(k, num_batches, num_streams)


def shard_permutation(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def _chunk(total: int, world_size: int, streams_per_rank: int, micro_batch_size: int, rank: int, k: int):
    """(first slot, length) of stream (rank, k) in a padded sequence of `total` items."""
    nb = batches_per_rank(total, world_size, micro_batch_size)
    per_k = [len(worker_batch_ids(nb, streams_per_rank, j)) * micro_batch_size for j in range(streams_per_rank)]
    return rank * nb * micro_batch_size + sum(per_k[:k]), per_k[k]


def stream_segments(counts: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
                    streams_per_rank: int, k: int, micro_batch_size: int, mode: str = "epoch",
                    pool: np.ndarray | None = None) -> list[Segment]:
    """The input sequence of stream (rank, k) as shard segments; its length is always
    len(worker_batch_ids(...)) * micro_batch_size. `pool`: sorted positions of the
    epoch's sequence that this stage covers (None: all of them)."""
    total = int(sum(counts)) if pool is None else len(pool)
    first, length = _chunk(total, world_size, streams_per_rank, micro_batch_size, rank, k)
    if length == 0:
        return []
    if mode == "resampled":
        return _resampled(counts, length, np.random.default_rng([seed, epoch, rank, k, 0xA11]))
    if mode != "epoch":
        raise ValueError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
    order = [int(i) for i in shard_permutation(len(counts), seed, epoch) if counts[i] > 0]
    starts = np.cumsum([0] + [counts[i] for i in order]).tolist()
    out: list[Segment] = []
    if pool is not None:
        # Slot q holds pool[q % total] (copy q // total); consecutive positions of one shard join.
        slots = np.arange(first, first + length)
        copies, pos = slots // total, pool[slots % total]
        for p, c in zip(pos.tolist(), copies.tolist()):
            j = bisect.bisect_right(starts, p) - 1
            i = p - starts[j]
            last = out[-1] if out else None
            if last is not None and last.shard == order[j] and last.stop == i and last.copy == c:
                out[-1] = Segment(last.shard, last.start, i + 1, c)
            else:
                out.append(Segment(order[j], i, i + 1, c))
        return out
    pos, end = first, first + length
    while pos < end:
        copy, q = divmod(pos, total)
        j = bisect.bisect_right(starts, q) - 1
        shard_pos = q - starts[j]
        take = min(counts[order[j]] - shard_pos, end - pos)
        out.append(Segment(order[j], shard_pos, shard_pos + take, copy))
        pos += take
    return out


def shuffle_seed_parts(seed: int, epoch: int, rank: int, k: int, stage: int) -> list[int]:
    # Stage 0 keeps the seed parts of gigamim <= 0.2, so their checkpoints resume exactly.
    return [seed, epoch, rank, k, 0xB0F] + ([stage] if stage else [])


def remaining_pool(num_samples: int, *, seed: int, epoch: int, stages: list[dict]) -> np.ndarray:
    """Sorted sequence positions not consumed by the finished `stages` of an epoch; each stage
    is {"world_size", "streams", "micro_batch_size", "shuffle_buffer", "batches"} (batches
    every rank had taken when the geometry changed)."""
    pool = np.arange(num_samples, dtype=np.int64)
    for i, st in enumerate(stages):
        total = len(pool)
        w, streams, mb, b = int(st["world_size"]), int(st["streams"]), int(st["micro_batch_size"]), int(st["batches"])
        used = np.zeros(total, dtype=bool)
        for r in range(w):
            for k in range(streams):
                first, length = _chunk(total, w, streams, mb, r, k)
                done = len(range(k, b, streams)) * mb if b > k else 0
                if not done:
                    continue
                order = window_shuffle_order(length, int(st["shuffle_buffer"]), shuffle_seed_parts(seed, epoch, r, k, i))
                slots = first + order[:done]
                used[slots[slots < total]] = True      # padding copies (slot >= total) consume nothing
        pool = pool[~used]
    return pool


def _resampled(counts: list[int], length: int, rng: np.random.Generator) -> list[Segment]:
    p = np.asarray(counts, dtype=np.float64)
    p /= p.sum()
    uses: dict[int, int] = {}
    out: list[Segment] = []
    while length > 0:
        i = int(rng.choice(len(counts), p=p))
        take = min(counts[i], length)
        out.append(Segment(i, 0, take, uses.get(i, 0)))
        uses[i] = uses.get(i, 0) + 1
        length -= take
    return out


def window_shuffle_order(length: int, window: int, seed_parts: list[int]) -> np.ndarray:
    """Output order (a permutation of range(length)): argsort of i + U(0, window)."""
    if window <= 1 or length <= 1:
        return np.arange(length)
    keys = np.arange(length, dtype=np.float64) + np.random.default_rng(seed_parts).random(length) * window
    return np.argsort(keys, kind="stable")
