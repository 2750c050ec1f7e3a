"""SimMIMLoader / ClassificationLoader: the training readers (tar shards -> uint8 image batches
with SimMIM masks, or with class labels for fine-tuning and linear probing).

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
rank finishes an epoch without one readable image the loader raises DataError (errors.py),
naming the shards; so does a sample without a label when labels are asked for.
Warnings are rate-limited and never sleep. Pickle members are never read (tario.py).
The last good batch is in the state (as the shard positions and random parts of its
samples, rebuilt on demand), so a resume right after a replaced batch continues exactly.

Elastic resume: a state saved under another world size / worker count / micro-batch
continues the SAME epoch with exactly the samples it had not consumed (assign.py,
"Elastic continuation"); each rank may be given any rank's state (they all describe the
same global position). Only a different seed, mode or dataset starts the next epoch.

Counters for the trainer to log per step (cumulative for this rank, all workers):
`skip_counts` (reason -> samples skipped), `fix_counts` (reason -> samples repaired:
converted_<mode>, upscaled_small, exif_orientation), `bytes_read` (bytes read from the
shards it opened: files, pipes, cached copies), `bytes_fetched` (bytes downloaded into the
shard cache), `decode_count`.

Why not webdataset's split_by_node/split_by_worker/shuffle stages: they split before
shuffling (or shuffle per worker with worker-local epoch counters), cut at shard
granularity (so 1 shard cannot feed 8 streams equally) and have no notion of position.
webdataset is still used for opening `pipe:` and remote URLs; specs are parsed by shardspec.py.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gigamim.data import assign, shardspec
from gigamim.data.errors import DataError
from gigamim.data.masking import MaskGenerator
from gigamim.data.seeding import derive_seed, sample_rng
from gigamim.data import tario
from gigamim.data.shardspec import shard_name
from gigamim.data.tario import SampleFiles, ShardError, count_samples, image_key_options, iter_samples, pick_image
from gigamim.data.transforms import BadSample, ClassifyTransform, SimMIMTransform

log = logging.getLogger("gigamim.data")



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
    transform: SimMIMTransform
    masker: MaskGenerator | None  # None: no masks (classification)
    labels: bool = False
    image_key: tuple | None = None
    cache_dir: str | None = None
    cache_size: int | None = None
    retries: int = 2

    def read_exts(self) -> tuple:
        return ("cls",) * self.labels + (self.image_key or ())


class _Lost:
    """Placeholder for a planned sample that never arrived (unreadable/truncated shard)."""

    def __init__(self, reason: str):
        self.reason = reason


class Sample(NamedTuple):
    """One decoded sample, before `_assemble` stacks a batch of them. The loader collates by
    itself (its DataLoader moves whole batches, `batch_size=None`), so this type never meets
    torch's default_collate."""

    image: Any               # PIL image, uint8 RGB, cropped to img_size
    mask: Any                # np.ndarray (SimMIM) or None
    label: int | None
    info: dict | None        # what the transform repaired (counted by `_Stream._account`), its erase_seed
    slot: list               # [shard, index, key, salt, *extra]: what `_rebuild` needs to make it again
    valid: bool              # a sample's own first appearance in the epoch: False for padding repeats,
                             # substitutes in a bad sample's slot and stand-ins for a lost batch


def _label(files: dict, key: str, url: str) -> int:
    data = files.get("cls") if files else None
    if data is None:
        raise DataError(f"labels were asked for but sample {key!r} of {shard_name(url)} has no .cls member "
                        f"(write labelled shards with `gigamim make-shards` from an ImageFolder)")
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"sample {key!r} of {shard_name(url)} has a .cls member that is not an integer: "
                        f"{data[:20]!r}") from None


def _make_sample(cfg: _Config, key, files, parts, url):
    """(image, mask or None, label or None, info) for one sample; raises BadSample, or
    DataError for a missing label."""
    if isinstance(files, _Lost):
        raise BadSample(files.reason)
    found = pick_image(files, cfg.image_key) if files is not None else None
    if found is None:
        names = files.member_names() if isinstance(files, SampleFiles) else sorted(files or ())
        raise BadSample("no_image", f"no image member among {names} (data.image_key picks another member)"
                        if names else "the sample has no members")
    label = _label(files, key, url) if cfg.labels else None
    rng = sample_rng(*parts)
    img, info = cfg.transform.apply(found[1], rng)
    return img, (cfg.masker(rng) if cfg.masker is not None else None), label, info


def _open_url(cfg: _Config, url: str) -> str:
    """The URL to read: a local cache copy for remote/pipe shards when a cache is set."""
    if cfg.cache_dir and shardspec.url_kind(url) != "local":
        from gigamim.data import shard_cache

        try:
            return shard_cache.fetch(url, cfg.cache_dir, cfg.cache_size)
        except Exception as exc:  # noqa: BLE001 - reported as a skip reason, like an unreadable shard
            raise ShardError("shard_unreadable", url, f"cache download failed: {type(exc).__name__}: {exc}") from None
    return url


class _Stream:
    """One (rank, worker) stream for one epoch stage, starting at one of its batches."""

    def __init__(self, cfg: _Config, epoch: int, k: int, first_batch: int, pool=None, stage: int = 0):
        self.cfg, self.epoch, self.k = cfg, epoch, k
        total = sum(cfg.counts) if pool is None else len(pool)
        self.batch_ids = assign.worker_batch_ids(assign.batches_per_rank(total, cfg.world_size, cfg.micro_batch_size),
                                                 cfg.streams, k)
        # Local index of the first batch >= first_batch that this stream makes.
        self.j0 = len(range(k, first_batch, cfg.streams)) if first_batch > k else 0
        self.segments = assign.stream_segments(cfg.counts, seed=cfg.seed, epoch=epoch, rank=cfg.rank,
                                               world_size=cfg.world_size, streams_per_rank=cfg.streams, k=k,
                                               micro_batch_size=cfg.micro_batch_size, mode=cfg.mode, pool=pool)
        self.length = sum(len(s) for s in self.segments)
        self.order = assign.window_shuffle_order(self.length, cfg.shuffle_buffer,
                                                 assign.shuffle_seed_parts(cfg.seed, epoch, cfg.rank, k, stage))
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
        self._bytes_mark = dict(tario.BYTES_READ)

    # -- reading
    def _iter_inputs(self):
        pos = 0
        for seg in self.segments:
            url = self.cfg.urls[seg.shard]
            base, start, needed = pos, seg.start, self.needed
            errors: list[ShardError] = []
            seen = 0
            wanted = np.flatnonzero(needed[base:base + len(seg)])
            if not len(wanted):
                # Nothing of this segment is needed (a resume stepped past it): do not open the
                # shard at all; a pipe/remote URL would stream every byte of it.
                pos = base + len(seg)
                continue
            # Read only up to the last needed sample: a pipe ends there instead of at seg.stop.
            stop = seg.start + int(wanted[-1]) + 1
            try:
                source = _open_url(self.cfg, url)
            except ShardError as exc:
                errors.append(exc)
                source = None
            if source is not None:
                for idx, key, files in iter_samples(source, seg.start, stop,
                                                    want=lambda i: bool(needed[base + i - start]),
                                                    read_exts=self.cfg.read_exts(), read_images=True,
                                                    on_error=errors.append, retries=self.cfg.retries):
                    yield base + idx - start, (key, files, seg.copy, seg.shard, idx)
                    seen += 1
            if seen < stop - seg.start:
                reason = errors[0].reason if errors else "missing_sample"
                detail = errors[0].detail if errors else f"index says {seg.stop} samples, shard has {seg.start + seen}"
                self.warn.warn(reason, f"{shard_name(url)}: {detail} ({stop - seg.start - seen} planned samples lost)")
                self.bad_shards.add(url)
                for p in range(base + seen, base + stop - seg.start):
                    yield p, (None, _Lost(reason), seg.copy, seg.shard, seg.start + p - base)
            pos = base + len(seg)

    def _fetch(self, pos: int):
        """The raw input at stream position `pos`, reading forward as far as needed."""
        while pos not in self.held:
            p, item = next(self._inputs)
            if self.needed[p]:
                self.held[p] = item
        return self.held[pos]

    # -- decoding
    def _salt(self, copy):
        return copy if self.cfg.mode == "epoch" else f"{copy}@{self.cfg.rank}.{self.k}"

    def _make(self, item, *extra) -> Sample:
        """The sample of `item`; `extra` salts a re-made one (a probe, a substitute), which is
        then not `valid`, like a padding repeat (copy > 0)."""
        key, files, copy, shard, idx = item
        parts = [self.cfg.seed, self.epoch, key, self._salt(copy), *extra]
        out = _make_sample(self.cfg, key, files, parts, self.cfg.urls[shard])
        self.decoded += 1
        return Sample(*out, slot=[shard, idx, key, *parts[3:]], valid=copy == 0 and not extra)

    def _account(self, info):
        if info["converted"]:
            self.fixes[f"converted_{info['converted']}"] += 1
        if info["upscaled"]:
            self.fixes["upscaled_small"] += 1
        if info.get("exif_transposed"):
            self.fixes["exif_orientation"] += 1

    def _donor_ahead(self, after: int):
        """First decodable input after output position `after` (for an all-bad batch)."""
        for out_pos in range(after, self.length):
            item = self._fetch(int(self.order[out_pos]))
            try:
                self._make(item, "probe")
                return item
            except BadSample:
                continue
        return None

    def batches(self):
        try:
            yield from self._batches()
        except DataError as exc:
            yield {"error": exc}    # the object, not torch's re-raise with a traceback in it (errors.py)

    def _batches(self):
        mb = self.cfg.micro_batch_size
        for j in range(self.j0, len(self.batch_ids)):
            items = [self._fetch(int(p)) for p in self.order[j * mb:(j + 1) * mb]]
            for p in self.order[j * mb:(j + 1) * mb]:
                del self.held[int(p)]
            made, bad, good = [None] * mb, [], []
            for i, item in enumerate(items):
                try:
                    made[i] = self._make(item)
                    good.append(item)
                    self._account(made[i].info)
                except BadSample as exc:
                    self.skips[exc.reason] += 1
                    if not isinstance(item[1], _Lost):    # lost samples were reported once per shard
                        self.warn.warn(exc.reason, f"sample {item[0]!r}: {exc.detail}")
                    bad.append(i)
            if bad and not good:
                donor = self._donor_ahead((j + 1) * mb)
                good = [donor] if donor is not None else []
            if bad and not good:
                yield self._emit(j, None, None)
                continue
            for t, i in enumerate(bad):
                made[i] = self._make(good[t % len(good)], "substitute", j, i)
            yield self._emit(j, _assemble(self.cfg, made, self.in_worker), [m.slot for m in made])

    def _emit(self, j: int, batch: dict | None, slots) -> dict:
        now = dict(tario.BYTES_READ)
        meta = {"b": self.batch_ids[j], "epoch": self.epoch, "skips": dict(self.skips), "fixes": dict(self.fixes),
                "decoded": self.decoded, "bad_shards": sorted(self.bad_shards),
                "bytes": {k: now[k] - self._bytes_mark.get(k, 0) for k in now}}
        self.skips, self.fixes, self.decoded, self.bad_shards, self._bytes_mark = Counter(), Counter(), 0, set(), now
        desc = {"epoch": self.epoch, "slots": slots} if slots is not None else None
        return {"batch": batch, "meta": meta, "desc": desc}


def _assemble(cfg: _Config, made: list[Sample], in_worker: bool) -> dict:
    mb, s = len(made), cfg.transform.img_size
    buf = torch.empty((mb, s, s, 3), dtype=torch.uint8)
    if in_worker:
        buf.share_memory_()   # filled in place: the hand-over to the main process then copies nothing
    nhwc = buf.numpy()
    for i, m in enumerate(made):
        nhwc[i] = np.asarray(m.image)
    # (B,3,H,W) view with channels-last strides: see SimMIMTransform.apply.
    batch = {"image": buf.permute(0, 3, 1, 2), "key": [m.slot[2] for m in made]}
    if cfg.masker is not None:
        batch["mask"] = torch.from_numpy(np.stack([m.mask for m in made]))
    if cfg.labels:
        batch["label"] = torch.tensor([m.label for m in made], dtype=torch.int64)
    if "erase_seed" in (made[0].info or {}):   # per-sample seeds of transforms.random_erasing (on the device)
        batch["erase_seed"] = torch.tensor([m.info["erase_seed"] for m in made], dtype=torch.int64)
    batch["valid"] = torch.tensor([m.valid for m in made], dtype=torch.bool)   # an evaluation drops the rest
    return batch


def _rebuild(cfg: _Config, desc: dict) -> dict:
    """A batch again from its slot descriptions (the state's `last_good`), in this process.
    It only ever stands in for a lost batch, so none of its samples is `valid`."""
    made = []
    for shard, idx, key, *rest in desc["slots"]:
        url = cfg.urls[shard]
        found = [(k, f) for _, k, f in iter_samples(_open_url(cfg, url), idx, idx + 1, read_exts=cfg.read_exts(),
                                                     read_images=True, retries=cfg.retries)]
        if not found or found[0][0] != key:
            raise DataError(f"cannot rebuild the saved last good batch: sample {idx} of {shard_name(url)} "
                            f"is {found[0][0] if found else 'missing'!r}, not {key!r} (did the shards change?)")
        img, mask, label, info = _make_sample(cfg, key, found[0][1], [cfg.seed, desc["epoch"], key, *rest], url)
        made.append(Sample(img, mask, label, info, [shard, idx, key, *rest], valid=False))
    return _assemble(cfg, made, False)


class _EpochDataset(IterableDataset):
    """The rank's epoch stage from batch `first_batch` on; DataLoader worker w plays stream
    (w + first_batch) % K so that the first batch to arrive is batch `first_batch`."""

    def __init__(self, cfg: _Config, epoch: int, first_batch: int, pool=None, stage: int = 0):
        self.cfg, self.epoch, self.first_batch, self.pool, self.stage = cfg, epoch, first_batch, pool, stage

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # PIL does the work; torch intra-op threads only oversubscribe
        k = (w + self.first_batch) % self.cfg.streams
        yield from _Stream(self.cfg, self.epoch, k, self.first_batch, self.pool, self.stage).batches()


# ----------------------------------------------------------------------------- main process

class _ShardLoader:
    """The shared machinery of SimMIMLoader and ClassificationLoader (see the module docstring)."""

    STATE_FORMAT = "gigamim.data.ShardLoader/1"

    def _setup(self, shards, micro_batch_size, *, rank, world_size, num_workers, seed, mode, shuffle_buffer, index,
               pin_memory, prefetch_factor, multiprocessing_context, transform, masker, labels, image_key,
               cache_dir, cache_size):
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
        self.bytes_read = 0      # bytes read from opened shards (local files, pipes, cached copies)
        self.bytes_fetched = 0   # bytes downloaded into the shard cache
        self.classes = shardspec.resolve(shards).classes if labels else None
        if any(c is None for c in counts):
            counts = self._count(urls, counts, cache_dir, cache_size)
        if sum(counts) == 0:
            raise ValueError(f"no samples in the {len(urls)} shard(s) {_shard_list(urls)}")
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.cfg = _Config(urls=urls, counts=counts, micro_batch_size=micro_batch_size, rank=rank,
                           world_size=world_size, streams=max(num_workers, 1), seed=seed, mode=mode,
                           shuffle_buffer=shuffle_buffer, transform=transform, masker=masker, labels=labels,
                           image_key=image_key_options(image_key), cache_dir=cache_dir, cache_size=cache_size)
        self.epoch = 0
        self._batch = 0          # batches of the current stage of self.epoch already yielded
        self._stages: list[dict] = []   # finished stages of this epoch (elastic resume), oldest first
        self._pool = None        # sequence positions of the current stage (None: the whole epoch)
        self.decode_count = 0    # images decoded for this loader (all its workers), for tests and benchmarks
        self._last_good = None
        self._last_good_desc = None
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
        """Batches per rank in the current epoch (stage)."""
        total = self.num_samples if self._pool is None else len(self._pool)
        return assign.batches_per_rank(total, self.cfg.world_size, self.cfg.micro_batch_size)

    def _count(self, urls, counts, cache_dir, cache_size):
        log.warning("data: no index for %d shard(s); counting samples by reading tar headers "
                    "(write an index with `gigamim make-shards` to skip this)", sum(c is None for c in counts))
        out = []
        for url, c in zip(urls, counts):
            if c is None:
                try:
                    if cache_dir and shardspec.url_kind(url) != "local":
                        from gigamim.data import shard_cache

                        url = shard_cache.fetch(url, cache_dir, cache_size)
                    c = count_samples(url)
                except ShardError as exc:
                    log.warning("data: %s", exc)
                    self.skip_counts[exc.reason] = self.skip_counts.get(exc.reason, 0) + 1
                    c = 0
                except OSError as exc:
                    log.warning("data: shard_unreadable: %s: %s", url, exc)
                    self.skip_counts["shard_unreadable"] = self.skip_counts.get("shard_unreadable", 0) + 1
                    c = 0
            out.append(c)
        return out

    # -- position
    def _geometry(self) -> dict:
        cfg = self.cfg
        return {"world_size": cfg.world_size, "streams": cfg.streams, "micro_batch_size": cfg.micro_batch_size,
                "shuffle_buffer": cfg.shuffle_buffer}

    def state_dict(self) -> dict:
        cfg = self.cfg
        return {"format": self.STATE_FORMAT, "epoch": self.epoch, "batch": self._batch, "seed": cfg.seed,
                "mode": cfg.mode, "world_size": cfg.world_size, "rank": cfg.rank, "num_workers": self.num_workers,
                "streams": cfg.streams, "shuffle_buffer": cfg.shuffle_buffer,
                "micro_batch_size": cfg.micro_batch_size, "num_samples": self.num_samples,
                "num_shards": len(cfg.urls), "batches_per_epoch": len(self), "stages": [dict(s) for s in self._stages],
                "last_good": self._last_good_desc,
                "skip_counts": dict(self.skip_counts), "fix_counts": dict(self.fix_counts),
                "decode_count": self.decode_count, "bytes_read": self.bytes_read,
                "bytes_fetched": self.bytes_fetched}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") not in (self.STATE_FORMAT,) + self._OLD_FORMATS:
            raise ValueError(f"not a {type(self).__name__} state (format "
                             f"{state.get('format') if isinstance(state, dict) else type(state)!r}, "
                             f"expected {self.STATE_FORMAT!r})")
        cfg = self.cfg
        epoch, batch = int(state["epoch"]), int(state["batch"])
        saved = {"world_size": state.get("world_size"), "streams": state.get("streams", max(state.get("num_workers", 0), 1)),
                 "micro_batch_size": state.get("micro_batch_size"), "shuffle_buffer": state.get("shuffle_buffer", cfg.shuffle_buffer)}
        stages = [dict(s) for s in state.get("stages", [])]
        same_data = {"seed": cfg.seed, "mode": cfg.mode, "num_samples": self.num_samples}
        diff = {k: (state.get(k), v) for k, v in same_data.items() if state.get(k) != v}
        if cfg.mode == "resampled":
            diff.update({k: (saved[k], v) for k, v in self._geometry().items() if saved[k] != v})
        self._stages, self._pool = [], None
        if diff and (batch > 0 or stages):
            # The plan depends on all of these: resuming mid-epoch would repeat or skip samples.
            log.warning("data: resume state differs (%s); cannot resume mid-epoch exactly, starting epoch %d",
                        ", ".join(f"{k}: saved {a} now {b}" for k, (a, b) in diff.items()), epoch + 1)
            epoch, batch = epoch + 1, 0
        elif saved != self._geometry() and (batch > 0 or stages):
            # Elastic: the saved stage ends here; the rest of the epoch is a new stage for this geometry.
            stages.append({**saved, "batches": batch})
            batch = 0
            self._stages = stages
        else:
            self._stages = stages
        if self._stages:
            self._pool = assign.remaining_pool(self.num_samples, seed=cfg.seed, epoch=epoch, stages=self._stages)
        if batch >= len(self):
            epoch, batch, self._stages, self._pool = epoch + 1, 0, [], None
        self.epoch, self._batch = epoch, batch
        if state.get("rank") == cfg.rank:
            self.skip_counts = dict(state.get("skip_counts", {}))
            self.fix_counts = dict(state.get("fix_counts", {}))
            self.bytes_read = int(state.get("bytes_read", 0))
            self.bytes_fetched = int(state.get("bytes_fetched", 0))
        self._last_good, self._last_good_desc = None, state.get("last_good")
        self.decode_count = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next iter() at the beginning of `epoch`."""
        self.epoch, self._batch, self._stages, self._pool = int(epoch), 0, [], None

    # -- iteration
    def _epoch_batches(self, epoch: int, first: int):
        ds = _EpochDataset(self.cfg, epoch, first, self._pool, len(self._stages))
        if self.num_workers == 0:
            return iter(ds)
        # Its own generator: a DataLoader otherwise draws its workers' base seed from torch's
        # global RNG, so (re)starting an iterator (a resume, an evaluation pass) would shift
        # the trainer's drop-path stream. The samples' randomness never comes from it.
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, self.cfg.rank, first) % 2**63)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               prefetch_factor=self.prefetch_factor, persistent_workers=False,
                               multiprocessing_context=self.multiprocessing_context,
                               worker_init_fn=_ignore_stop_signals, generator=generator))

    def _absorb(self, meta: dict) -> None:
        for src, dst in ((meta["skips"], self.skip_counts), (meta["fixes"], self.fix_counts)):
            for k, v in src.items():
                dst[k] = dst.get(k, 0) + v
        self.decode_count += meta["decoded"]
        self.bytes_read += meta["bytes"]["n"]
        self.bytes_fetched += meta["bytes"]["fetched"]

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

    def _replacement(self):
        """The rank's last good batch, standing in for a lost one: its samples were already
        yielded, so none is `valid` here (an evaluation counts each sample once)."""
        if self._last_good is None and self._last_good_desc is not None:
            self._last_good = _rebuild(self.cfg, self._last_good_desc)
        if self._last_good is None:
            return None
        return {**self._last_good, "valid": torch.zeros_like(self._last_good["valid"])}

    def _ordered(self, batches, epoch: int, first: int, nb: int):
        """The epoch's batches in order, bad ones replaced, the position advanced."""
        pending: dict[int, dict] = {}
        expected = first
        missing: list[int] = []     # batches with no readable image, waiting for a good batch
        bad_shards: set[str] = set()
        for item in batches:
            if "error" in item:
                raise item["error"]     # a DataError from the stream (a worker's, unpickled here)
            meta = item["meta"]
            pending[meta["b"]] = item
            while expected in pending:
                item = pending.pop(expected)
                self._absorb(item["meta"])
                bad_shards.update(item["meta"]["bad_shards"])
                batch = item["batch"]
                if batch is None:
                    self.skip_counts["batch_replaced"] = self.skip_counts.get("batch_replaced", 0) + 1
                    batch = self._replacement()
                    if batch is None:
                        missing.append(expected)
                        expected += 1
                        continue
                else:
                    self._last_good, self._last_good_desc = batch, item["desc"]
                for _ in missing:       # batches that came before any readable one: stand-ins
                    yield from self._advance(self._replacement(), epoch, nb)
                missing = []
                yield from self._advance(batch, epoch, nb)
                expected += 1
        if missing or expected < nb:
            shards = sorted(bad_shards) or self.cfg.urls
            raise DataError(
                f"rank {self.cfg.rank} found no readable image in epoch {epoch} "
                f"({nb - first} batches planned, {expected - first} produced); skip counts "
                f"{self.skip_counts}; shards: {_shard_list(shards)}")

    def _advance(self, batch, epoch, nb):
        self._batch += 1
        if self._batch >= nb:
            self.epoch, self._batch, self._stages, self._pool = epoch + 1, 0, [], None
        yield {k: (list(v) if k == "key" else v) for k, v in batch.items()}


class SimMIMLoader(_ShardLoader):
    """Batches `{"image": uint8 (B,3,H,W), "mask": bool (B,H/4,W/4), "key": list[str], "valid": bool (B,)}`
    forever (+ `"label"`: int64 (B,) with labels=True).

    "image" has channels-last strides (a view of NHWC memory; `transforms.normalize_on_device`
    returns contiguous NCHW on the device); call `.contiguous()` for NCHW memory on the CPU.

    shards: any shard spec (shardspec.py): brace pattern (`/data/train-{000000..000127}.tar`,
        `pipe:curl -s https://.../x-{0..9}.tar`), `,`/`::` lists, a list of URLs, a folder, or an
        index.json written by make-shards (counts come from it).
    index: optional index.json (or {url: count}) giving counts for `shards`; without any index
        the shards are scanned once (headers only) to count samples.
    mode: "epoch" (every sample once per epoch, padded to equal batch counts) or "resampled"
        (shards drawn with replacement; nominal epoch of the same length).
    image_key: which member is the image ("input.jpg", "jpg;png"; default: tario.pick_image's priority).
    labels: also yield "label" from each sample's `.cls` member (a one-line error if one lacks it).
    cache_dir / cache_size: per-node cache of remote and pipe: shards (shard_cache.py), bytes bound.
    A resume continues exactly with the same seed and data; another world size, worker
    count or micro-batch continues the same epoch with the samples not yet consumed.
    """

    STATE_FORMAT = "gigamim.data.SimMIMLoader/1"
    _OLD_FORMATS = ()

    def __init__(self, shards, micro_batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, img_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6, mode: str = "epoch", shuffle_buffer: int = 1000, index=None,
                 image_key: str | None = None, labels: bool = False, cache_dir: str | None = None,
                 cache_size: int | None = None, pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context=None, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)):
        self._setup(shards, micro_batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                    mode=mode, shuffle_buffer=shuffle_buffer, index=index, pin_memory=pin_memory,
                    prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context,
                    transform=SimMIMTransform(img_size, scale, ratio),
                    masker=MaskGenerator(img_size, mask_patch_size, model_patch_size, mask_ratio),
                    labels=labels, image_key=image_key, cache_dir=cache_dir, cache_size=cache_size)


class ClassificationLoader(_ShardLoader):
    """Labelled batches for fine-tuning and linear probing, with the SimMIMLoader position model
    (exact and elastic resume, bad-data handling, cache):
    `{"image": uint8 (B,3,H,W) channels-last, "label": int64 (B,), "key": list[str], "valid": bool (B,)}`.

    train=True: RandomResizedCrop(img_size, scale, ratio) + flip (probability hflip) + timm's
    `auto_augment` policy, shuffled; with reprob > 0 batches carry "erase_seed" (int64 (B,)) for
    transforms.random_erasing on the normalised images; train=False: resize to img_size /
    crop_pct + centre crop, shard order, and `valid` False on padding repeats and on images
    standing in for bad ones (drop those when averaging eval metrics so every sample counts
    once). `classes`: class names from the index.json (None when it has none). Labels come
    from `.cls` members.
    """

    STATE_FORMAT = "gigamim.data.ClassificationLoader/1"
    _OLD_FORMATS = ()

    def __init__(self, shards, micro_batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, img_size: int = 224, train: bool = True, mode: str = "epoch",
                 shuffle_buffer: int | None = None, index=None, image_key: str | None = None,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, crop_pct: float = 0.875,
                 auto_augment: str | None = None, reprob: float = 0.0, interpolation: str = "bicubic",
                 cache_dir: str | None = None,
                 cache_size: int | None = None, pin_memory: bool = False, prefetch_factor: int = 2,
                 multiprocessing_context=None):
        if shuffle_buffer is None:
            shuffle_buffer = 1000 if train else 1
        self._setup(shards, micro_batch_size, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                    mode=mode, shuffle_buffer=shuffle_buffer, index=index, pin_memory=pin_memory,
                    prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context,
                    transform=ClassifyTransform(img_size, train=train, scale=scale, ratio=ratio, hflip=hflip,
                                                crop_pct=crop_pct, auto_augment=auto_augment, reprob=reprob,
                                                interpolation=interpolation),
                    masker=None, labels=True, image_key=image_key, cache_dir=cache_dir, cache_size=cache_size)
        self.train = train


def check_labelled(shards) -> None:
    """Raise DataError (one line) when the first sample of the first local shard of `shards`
    has no `.cls` label: unlabelled shards are refused before a run starts, instead of at its
    first batch. Remote and pipe: shards are not opened here (the loader still checks every
    sample it reads)."""
    urls = shardspec.resolve(shards).urls
    first = next((u for u in urls if shardspec.url_kind(u) == "local"), None)
    if first is None:
        return
    for _, key, files in iter_samples(shardspec.local_path(first), stop=1, read_exts=("cls",)):
        if not files or "cls" not in files:
            raise DataError(f"{shards} is not labelled: sample {key!r} of {shard_name(first)} has no .cls member "
                            "(write labelled shards with `gigamim make-shards` from an ImageFolder)")
        return


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
