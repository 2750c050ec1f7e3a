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


def stream_segments(counts: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
                    streams_per_rank: int, k: int, micro_batch_size: int, mode: str = "epoch") -> list[Segment]:
    """The input sequence of stream (rank, k) as shard segments; its length is always
    len(worker_batch_ids(...)) * micro_batch_size."""
    total = int(sum(counts))
    nb = batches_per_rank(total, world_size, micro_batch_size)
    per_k = [len(worker_batch_ids(nb, streams_per_rank, j)) * micro_batch_size for j in range(streams_per_rank)]
    length = per_k[k]
    if length == 0:
        return []
    if mode == "resampled":
        return _resampled(counts, length, np.random.default_rng([seed, epoch, rank, k, 0xA11]))
    if mode != "epoch":
        raise ValueError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
    order = [int(i) for i in shard_permutation(len(counts), seed, epoch) if counts[i] > 0]
    starts = np.cumsum([0] + [counts[i] for i in order]).tolist()
    first = rank * nb * micro_batch_size + sum(per_k[:k])
    out: list[Segment] = []
    pos, end = first, first + length
    while pos < end:
        copy, q = divmod(pos, total)
        j = bisect.bisect_right(starts, q) - 1
        shard_pos = q - starts[j]
        take = min(counts[order[j]] - shard_pos, end - pos)
        out.append(Segment(order[j], shard_pos, shard_pos + take, copy))
        pos += take
    return out


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
