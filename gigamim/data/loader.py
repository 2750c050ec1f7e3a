"""SimMIMLoader: the training reader (tar shards -> uint8 image batches + SimMIM masks).

Position model (why resume is exact): assign.py fixes, from (seed, epoch, world size,
workers, micro-batch), which samples each (rank, worker) stream reads and in what order.
Worker k of a rank makes the rank's batches k, k+K, k+2K, ...; the main process puts
them back in batch order (DataLoader already delivers in order; the reorder buffer only
makes that a checked property). So (epoch, batch) is the whole position. Resuming at
batch b, each stream computes which of its inputs were already emitted and steps over
them at the tar-header level (seeks on local files) without reading or decoding them.
Crops, flips and masks come from (seed, epoch, sample key, copy), never from a worker's
RNG, so they do not depend on the number of workers or on the resume point.

Bad data: a sample that cannot be used (see transforms.BadSample and tario.ShardError
reasons) is counted by reason and its slot is filled with another image of the same batch
(re-cropped with its own randomness), or, if the whole batch is bad, with the next good
image of the stream; batch sizes and counts never change. A batch with no readable image
anywhere in its stream's remaining epoch is replaced by the rank's last good batch; if a
rank finishes an epoch without one readable image the loader raises, naming the shards.
Warnings are rate-limited and never sleep. Pickle members are never read (tario.py).

Why not webdataset's split_by_node/split_by_worker/shuffle stages: they split before
shuffling (or shuffle per worker with worker-local epoch counters), cut at shard
granularity (so 1 shard cannot feed 8 streams equally) and have no notion of position.
webdataset is still used for opening `pipe:` and remote URLs; specs are parsed by shardspec.py.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gigamim.data import assign, shardspec
from gigamim.data.masking import MaskGenerator
from gigamim.data.seeding import sample_rng
from gigamim.data.tario import IMAGE_EXTS, ShardError, count_samples, iter_samples, pick_image, shard_name
from gigamim.data.transforms import BadSample, SimMIMTransform

log = logging.getLogger("gigamim.data")

STATE_FORMAT = "gigamim.data.SimMIMLoader/1"


class RateLimitedLog:
    """First `burst` messages per reason, then at most one per `every_s` seconds (with the
    count so far). Never sleeps: a billion-image run must not stall on a bad shard."""

    def __init__(self, burst: int = 3, every_s: float = 60.0):
        self.burst, self.every_s = burst, every_s
        self.seen: Counter = Counter()
        self.last: dict[str, float] = {}

    def warn(self, reason: str, msg: str) -> None:
        self.seen[reason] += 1
        n = self.seen[reason]
        now = time.monotonic()
        if n <= self.burst or now - self.last.get(reason, 0.0) >= self.every_s:
            self.last[reason] = now
            log.warning("data: skipped (%s, %d so far in this process): %s", reason, n, msg)


# One limiter per process (each DataLoader worker is a process), shared by all its streams and epochs.
_WARN = RateLimitedLog()


# ----------------------------------------------------------------------------- shard list

def resolve_shards(shards, index=None) -> tuple[list[str], list[int | None]]:
    """(urls, counts) of a shard spec, by the one parser (`shardspec.resolve`: brace patterns,
    `,`/`::` lists, folders, index.json, pipe:/remote URLs). counts[i] is None when no index
    gives it; `index` (an index.json or {url: count}) supplies counts by shard basename."""
    found = shardspec.resolve(shards)
    urls, counts = found.urls, found.counts
    if index is not None:
        if isinstance(index, dict):
            iurls, icounts = list(index), list(index.values())
        else:
            iurls, icounts, _ = shardspec.read_index(str(index))
        by_name = {shard_name(u): c for u, c in zip(iurls, icounts)}
        counts = [c if c is not None else by_name.get(shard_name(u)) for u, c in zip(urls, counts)]
    return urls, counts


# ----------------------------------------------------------------------------- worker side

@dataclass
class _Config:
    urls: list[str]
    counts: list[int]
    micro_batch_size: int
    rank: int
    world_size: int
    streams: int                 # streams per rank = max(num_workers, 1)
    seed: int
    mode: str
    shuffle_buffer: int
    img_size: int
    mask_patch_size: int
    model_patch_size: int
    mask_ratio: float
    scale: tuple = (0.67, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    retries: int = 2
    transform: SimMIMTransform = field(init=False)
    masker: MaskGenerator = field(init=False)

    def __post_init__(self):
        self.transform = SimMIMTransform(self.img_size, self.scale, self.ratio)
        self.masker = MaskGenerator(self.img_size, self.mask_patch_size, self.model_patch_size, self.mask_ratio)

    @property
    def batches_per_rank(self) -> int:
        return assign.batches_per_rank(sum(self.counts), self.world_size, self.micro_batch_size)


class _Lost:
    """Placeholder for a planned sample that never arrived (unreadable/truncated shard)."""

    def __init__(self, reason: str):
        self.reason = reason


class _Stream:
    """One (rank, worker) stream for one epoch, starting at one of its batches."""

    def __init__(self, cfg: _Config, epoch: int, k: int, first_batch: int):
        self.cfg, self.epoch, self.k = cfg, epoch, k
        self.batch_ids = assign.worker_batch_ids(cfg.batches_per_rank, cfg.streams, k)
        # Local index of the first batch >= first_batch that this stream makes.
        self.j0 = len(range(k, first_batch, cfg.streams)) if first_batch > k else 0
        self.segments = assign.stream_segments(cfg.counts, seed=cfg.seed, epoch=epoch, rank=cfg.rank,
                                             world_size=cfg.world_size, streams_per_rank=cfg.streams, k=k,
                                             micro_batch_size=cfg.micro_batch_size, mode=cfg.mode)
        self.length = sum(len(s) for s in self.segments)
        self.order = assign.window_shuffle_order(self.length, cfg.shuffle_buffer,
                                               [cfg.seed, epoch, cfg.rank, k, 0xB0F])
        self.needed = np.ones(self.length, dtype=bool)
        self.needed[self.order[: self.j0 * cfg.micro_batch_size]] = False
        self.skips: Counter = Counter()
        self.fixes: Counter = Counter()
        self.decoded = 0
        self.warn = _WARN
        self.bad_shards: set[str] = set()
        self.held: dict[int, tuple] = {}
        self._inputs = self._iter_inputs()
        self.in_worker = get_worker_info() is not None

    # -- reading
    def _iter_inputs(self):
        pos = 0
        for seg in self.segments:
            url = self.cfg.urls[seg.shard]
            base, start, needed = pos, seg.start, self.needed
            errors: list[ShardError] = []
            seen = 0
            for idx, key, files in iter_samples(url, seg.start, seg.stop,
                                                want=lambda i: bool(needed[base + i - start]),
                                                read_exts=IMAGE_EXTS, on_error=errors.append,
                                                retries=self.cfg.retries):
                yield base + idx - start, key, files, seg.copy
                seen += 1
            if seen < len(seg):
                reason = errors[0].reason if errors else "missing_sample"
                detail = errors[0].detail if errors else f"index says {seg.stop} samples, shard has {seg.start + seen}"
                self.warn.warn(reason, f"{shard_name(url)}: {detail} ({len(seg) - seen} planned samples lost)")
                self.bad_shards.add(url)
                for p in range(base + seen, base + len(seg)):
                    yield p, None, _Lost(reason), seg.copy
            pos = base + len(seg)

    def _fetch(self, pos: int):
        """The raw input at stream position `pos`, reading forward as far as needed."""
        while pos not in self.held:
            p, key, files, copy = next(self._inputs)
            if self.needed[p]:
                self.held[p] = (key, files, copy)
        return self.held[pos]

    # -- decoding
    def _salt(self, copy):
        return copy if self.cfg.mode == "epoch" else f"{copy}@{self.cfg.rank}.{self.k}"

    def _make(self, key, files, copy, *extra):
        if isinstance(files, _Lost):
            raise BadSample(files.reason)
        found = pick_image(files) if files is not None else None
        if found is None:
            raise BadSample("no_image", f"members: {sorted(files) if files else []}")
        rng = sample_rng(self.cfg.seed, self.epoch, key, self._salt(copy), *extra)
        self.decoded += 1
        img, info = self.cfg.transform.apply(found[1], rng)
        return img, self.cfg.masker(rng), info

    def _account(self, info):
        if info["converted"]:
            self.fixes[f"converted_{info['converted']}"] += 1
        if info["upscaled"]:
            self.fixes["upscaled_small"] += 1

    def _donor_ahead(self, after: int):
        """First decodable input after output position `after` (for an all-bad batch)."""
        for out_pos in range(after, self.length):
            key, files, copy = self._fetch(int(self.order[out_pos]))
            try:
                self._make(key, files, copy, "probe")
                return key, files, copy
            except BadSample:
                continue
        return None

    def batches(self):
        mb = self.cfg.micro_batch_size
        for j in range(self.j0, len(self.batch_ids)):
            items = [self._fetch(int(p)) for p in self.order[j * mb:(j + 1) * mb]]
            for p in self.order[j * mb:(j + 1) * mb]:
                del self.held[int(p)]
            imgs, masks, keys, bad, good = [None] * mb, [None] * mb, [None] * mb, [], []
            for i, (key, files, copy) in enumerate(items):
                try:
                    imgs[i], masks[i], info = self._make(key, files, copy)
                    keys[i] = key
                    good.append((key, files, copy))
                    self._account(info)
                except BadSample as exc:
                    self.skips[exc.reason] += 1
                    if not isinstance(files, _Lost):    # lost samples were reported once per shard
                        self.warn.warn(exc.reason, f"sample {key!r}: {exc.detail}")
                    bad.append(i)
            if bad and not good:
                donor = self._donor_ahead((j + 1) * mb)
                good = [donor] if donor is not None else []
            if bad and not good:
                yield self._emit(j, None)
                continue
            for t, i in enumerate(bad):
                key, files, copy = good[t % len(good)]
                imgs[i], masks[i], info = self._make(key, files, copy, "substitute", j, i)
                keys[i] = key
            s = self.cfg.img_size
            buf = torch.empty((mb, s, s, 3), dtype=torch.uint8)
            if self.in_worker:
                buf.share_memory_()   # filled in place: the hand-over to the main process then copies nothing
            nhwc = buf.numpy()
            for i, img in enumerate(imgs):
                nhwc[i] = np.asarray(img)
            # (B,3,H,W) view with channels-last strides: see SimMIMTransform.apply.
            yield self._emit(j, {"image": buf.permute(0, 3, 1, 2),
                                 "mask": torch.from_numpy(np.stack(masks)), "key": keys})

    def _emit(self, j: int, batch: dict | None) -> dict:
        meta = {"b": self.batch_ids[j], "epoch": self.epoch, "skips": dict(self.skips), "fixes": dict(self.fixes),
                "decoded": self.decoded, "bad_shards": sorted(self.bad_shards)}
        self.skips, self.fixes, self.decoded, self.bad_shards = Counter(), Counter(), 0, set()
        return {"batch": batch, "meta": meta}


class _EpochDataset(IterableDataset):
    """The rank's epoch from batch `first_batch` on; DataLoader worker w plays stream
    (w + first_batch) % K so that the first batch to arrive is batch `first_batch`."""

    def __init__(self, cfg: _Config, epoch: int, first_batch: int):
        self.cfg, self.epoch, self.first_batch = cfg, epoch, first_batch

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # PIL does the work; torch intra-op threads only oversubscribe
        k = (w + self.first_batch) % self.cfg.streams
        yield from _Stream(self.cfg, self.epoch, k, self.first_batch).batches()


# ----------------------------------------------------------------------------- main process

class SimMIMLoader:
    """Batches `{"image": uint8 (B,3,H,W), "mask": bool (B,H/4,W/4), "key": list[str]}` forever.

    "image" has channels-last strides (a view of NHWC memory; `transforms.normalize_on_device`
    returns contiguous NCHW on the device); call `.contiguous()` for NCHW memory on the CPU.

    shards: brace pattern (`/data/train-{000000..000127}.tar`, `pipe:curl -s https://.../x-{0..9}.tar`),
        a list of URLs, or an index.json written by make-shards (counts come from it).
    index: optional index.json (or {url: count}) giving counts for `shards`; without any index
        the shards are scanned once (headers only) to count samples.
    mode: "epoch" (every sample once per epoch, padded to equal batch counts) or "resampled"
        (shards drawn with replacement; nominal epoch of the same length).
    Exact resume needs the same world_size, num_workers, micro_batch_size, seed and data.
    """

    def __init__(self, shards, micro_batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, img_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, mode: str = "epoch", shuffle_buffer: int = 1000, index=None,
                 pin_memory: bool = False, prefetch_factor: int = 2, multiprocessing_context=None):
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"mode must be 'epoch' or 'resampled', got {mode!r}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        urls, counts = resolve_shards(shards, index)
        self.skip_counts: dict[str, int] = {}
        self.fix_counts: dict[str, int] = {}
        if any(c is None for c in counts):
            counts = self._count(urls, counts)
        if sum(counts) == 0:
            raise ValueError(f"no samples in the {len(urls)} shard(s) {_shard_list(urls)}")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.cfg = _Config(urls=urls, counts=counts, micro_batch_size=micro_batch_size, rank=rank,
                           world_size=world_size, streams=max(num_workers, 1), seed=seed, mode=mode,
                           shuffle_buffer=shuffle_buffer, img_size=img_size, mask_patch_size=mask_patch_size,
                           model_patch_size=model_patch_size, mask_ratio=mask_ratio)
        self.epoch = 0
        self._batch = 0          # batches of self.epoch already yielded
        self.decode_count = 0    # images decoded for this loader (all its workers), for tests and benchmarks
        self._last_good = None
        nonempty = sum(1 for c in counts if c > 0)
        if nonempty < world_size * self.cfg.streams:
            log.warning("data: %d non-empty shard(s) for %d ranks x %d workers = %d streams; %s",
                        nonempty, world_size, self.cfg.streams, world_size * self.cfg.streams,
                        "shards are split at sample granularity (several streams read parts of one shard)"
                        if mode == "epoch" else "streams resample the same shards")

    # -- sizes
    @property
    def num_samples(self) -> int:
        return sum(self.cfg.counts)

    @property
    def urls(self) -> list[str]:
        return list(self.cfg.urls)

    def __len__(self) -> int:
        return self.cfg.batches_per_rank

    def _count(self, urls, counts):
        log.warning("data: no index for %d shard(s); counting samples by reading tar headers "
                    "(write an index with `gigamim make-shards` to skip this)", sum(c is None for c in counts))
        out = []
        for url, c in zip(urls, counts):
            if c is None:
                try:
                    c = count_samples(url)
                except ShardError as exc:
                    log.warning("data: %s", exc)
                    self.skip_counts[exc.reason] = self.skip_counts.get(exc.reason, 0) + 1
                    c = 0
            out.append(c)
        return out

    # -- position
    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"format": STATE_FORMAT, "epoch": self.epoch, "batch": self._batch, "seed": cfg.seed,
                "mode": cfg.mode, "world_size": cfg.world_size, "rank": cfg.rank, "num_workers": self.num_workers,
                "micro_batch_size": cfg.micro_batch_size, "num_samples": self.num_samples,
                "num_shards": len(cfg.urls), "batches_per_epoch": len(self),
                "skip_counts": dict(self.skip_counts), "fix_counts": dict(self.fix_counts),
                "decode_count": self.decode_count}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a SimMIMLoader state (format {state.get('format') if isinstance(state, dict) else type(state)!r}, "
                             f"expected {STATE_FORMAT!r})")
        cfg = self.cfg
        mine = {"seed": cfg.seed, "mode": cfg.mode, "world_size": cfg.world_size, "num_workers": self.num_workers,
                "micro_batch_size": cfg.micro_batch_size, "num_samples": self.num_samples}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if diff and batch > 0:
            # The plan depends on all of these: resuming mid-epoch would repeat or skip samples.
            log.warning("data: resume state differs (%s); cannot resume mid-epoch exactly, starting epoch %d",
                        ", ".join(f"{k}: saved {a} now {b}" for k, (a, b) in diff.items()), epoch + 1)
            epoch, batch = epoch + 1, 0
        if batch >= len(self):
            epoch, batch = epoch + 1, 0
        self.epoch, self._batch = epoch, batch
        if state.get("rank") == cfg.rank:
            self.skip_counts = dict(state.get("skip_counts", {}))
            self.fix_counts = dict(state.get("fix_counts", {}))
        self.decode_count = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iter() at the beginning of `epoch`."""
        self.epoch, self._batch = int(epoch), 0

    # -- iteration
    def _epoch_batches(self, epoch: int, first: int):
        ds = _EpochDataset(self.cfg, epoch, first)
        if self.num_workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               prefetch_factor=self.prefetch_factor, persistent_workers=False,
                               multiprocessing_context=self.multiprocessing_context,
                               worker_init_fn=_ignore_stop_signals))

    def _absorb(self, meta: dict) -> None:
        for src, dst in ((meta["skips"], self.skip_counts), (meta["fixes"], self.fix_counts)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        self.decode_count += meta["decoded"]

    def __iter__(self):
        while True:
            epoch, first, nb = self.epoch, self._batch, len(self)
            batches = self._epoch_batches(epoch, first)
            try:
                yield from self._ordered(batches, epoch, first, nb)
            finally:
                # Stop the workers now, not at garbage collection: a generator left suspended
                # at exit would leave them to multiprocessing's atexit, which SIGTERMs and
                # joins them, and they ignore SIGTERM (see _ignore_stop_signals).
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()

    def _ordered(self, batches, epoch: int, first: int, nb: int):
        """The epoch's batches in order, bad ones replaced, the position advanced."""
        pending: dict[int, dict] = {}
        expected = first
        missing: list[int] = []     # batches with no readable image, waiting for a good batch
        bad_shards: set[str] = set()
        for item in batches:
            meta = item["meta"]
            pending[meta["b"]] = item
            while expected in pending:
                item = pending.pop(expected)
                self._absorb(item["meta"])
                bad_shards.update(item["meta"]["bad_shards"])
                batch = item["batch"]
                if batch is None:
                    self.skip_counts["batch_replaced"] = self.skip_counts.get("batch_replaced", 0) + 1
                    if self._last_good is None:
                        missing.append(expected)
                        expected += 1
                        continue
                    batch = self._last_good
                self._last_good = batch
                for _ in missing:       # batches that came before any readable one
                    yield from self._advance(batch, epoch, nb)
                missing = []
                yield from self._advance(batch, epoch, nb)
                expected += 1
        if missing or expected < nb:
            shards = sorted(bad_shards) or self.cfg.urls
            raise RuntimeError(
                f"data: rank {self.cfg.rank} found no readable image in epoch {epoch} "
                f"({nb - first} batches planned, {expected - first} produced); skip counts "
                f"{self.skip_counts}; shards: {_shard_list(shards)}")

    def _advance(self, batch, epoch, nb):
        self._batch += 1
        if self._batch >= nb:
            self.epoch, self._batch = epoch + 1, 0
        yield {"image": batch["image"], "mask": batch["mask"], "key": list(batch["key"])}


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process: a preempted job signals every
    process, and the trainer must still get batches while it finishes its step and saves.
    Workers exit when the main process shuts the loader down (or dies: torch's watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _shard_list(urls, limit: int = 10) -> str:
    shown = ", ".join(urls[:limit])
    return shown + (f", ... ({len(urls) - limit} more)" if len(urls) > limit else "")
