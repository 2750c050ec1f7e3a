"""Reading tar shards member by member, with sample grouping that never decodes.

Why not webdataset's `tarfile_to_samples`: exact resume must skip samples without
reading their bytes (on a local file, `tarfile` in "r:" mode seeks past unwanted
members), and bad shards must be reported by reason, not raised or slept on.
Opening still goes through `webdataset.gopen`, so `pipe:` URLs (`pipe:aws s3 cp s3://b/x.tar -`,
`pipe:curl -s ...`: the whole command goes to the shell) and `file:` work as in webdataset.

Sample grouping: exactly webdataset's rule (`tariterators.base_plus_ext` + `group_by_keys`).
A member name splits at the FIRST dot of its basename: `dir.v2/k0.input.jpg` -> key
`dir.v2/k0`, ext `input.jpg` (exts are lower-cased); consecutive members with the same key
are one sample. A basename without a dot (or starting with one) is not part of any sample,
`__*__` metadata members are skipped, and a repeated ext inside a sample keeps the first
member (webdataset raises there). Shards written by gigamim (keys never contain dots) read
the same under this rule as under the last-dot rule of gigamim <= 0.2.

Which member is the image (`pick_image`): with `image_key` (e.g. "input.jpg" or
"jpg;png", webdataset's `to_tuple` alternatives), the first of those exts present;
otherwise the first ext of IMAGE_EXTS present as a whole ext (`jpg` before `jpeg`, `png`,
...), else the multi-part ext whose last part ranks first in IMAGE_EXTS (ties: the
alphabetically first), so `input.jpg` wins over `target.png`.

Bytes: every stream counts the bytes it actually reads from the shards it opens
(`BYTES_READ`, per process); seeks over skipped members on local files cost nothing, while
pipe:/remote streams read everything up to the last member they need.
"""

from __future__ import annotations

import os
import re
import tarfile
import time
from typing import Callable, Iterator

from webdataset.gopen import gopen as wds_gopen

from gigamim.data.shardspec import local_path, url_kind

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jp2")
# Never unpickled anywhere in gigamim; listed so the reader can refuse to even read them.
PICKLE_EXTS = ("pyd", "pickle", "pkl", "pth", "pt", "npy_pickle")


class ShardError(Exception):
    """A shard could not be opened or read; `reason` is the skip-counter key."""

    def __init__(self, reason: str, url: str, detail: str):
        super().__init__(f"{reason}: {url}: {detail}")
        self.reason = reason
        self.url = url
        self.detail = detail


def is_local(url: str) -> bool:
    return url_kind(url) == "local"


def open_tar(url: str, retries: int = 2, retry_wait: float = 0.5):
    """(tarfile, underlying stream). Local files open seekable ("r:*": skipping a member
    is a seek); everything else streams through webdataset's gopen ("r|*").
    Retries transient failures; local missing files are not waited on."""
    last = None
    for attempt in range(retries + 1):
        stream = None
        try:
            if is_local(url):
                stream = _Counting(open(local_path(url), "rb"))
                return tarfile.open(fileobj=stream, mode="r:*"), stream
            stream = _Counting(wds_gopen(url, "rb"))
            return tarfile.open(fileobj=stream, mode="r|*"), stream
        except Exception as exc:  # noqa: BLE001 - reported as a skip reason, never raised deep
            last = exc
            _quiet_close(stream)
            if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                break
            if attempt < retries and not is_local(url):
                time.sleep(retry_wait * (attempt + 1))
    raise ShardError("shard_unreadable", url, f"{type(last).__name__}: {last}")


def _quiet_close(stream) -> None:
    if stream is None:
        return
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a pipe closed early exits with SIGPIPE; that is expected
        pass


_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")     # webdataset.tariterators.base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")                              # webdataset's skip_meta

# Bytes this process (each DataLoader worker is one) read from the shards it opened ("n")
# and downloaded into the shard cache ("fetched", shard_cache.py).
BYTES_READ = {"n": 0, "fetched": 0}


class _Counting:
    """File wrapper counting the bytes read through it (seeks are free, as on disk)."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, n=-1):
        data = self.raw.read(n)
        BYTES_READ["n"] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.raw, name)


def split_name(name: str) -> tuple[str | None, str | None]:
    """(key, ext) of a member name by webdataset's rule; (None, None) when it has no ext."""
    m = _BASE_PLUS_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def is_image_ext(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTS


class SampleFiles(dict):
    """ext -> bytes of the members read, and `unread`: the exts of the sample's members left
    unread (not asked for, or pickles), so a sample without an image can say what it holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unread: list[str] = []

    def member_names(self) -> list[str]:
        return sorted(set(self) | set(self.unread))


def iter_samples(url: str, start: int = 0, stop: int | None = None,
                 want: Callable[[int], bool] | None = None,
                 read_exts: tuple[str, ...] | None = IMAGE_EXTS + ("cls",),
                 on_error: Callable[[ShardError], None] | None = None,
                 retries: int = 2, read_images: bool = False) -> Iterator[tuple[int, str, dict | None]]:
    """Yield (index, key, files) for samples `start <= index < stop` of one shard.

    `files` maps ext -> bytes for the members whose ext is in `read_exts` (None = all but
    pickles) or, with `read_images`, whose ext ends in an image ext; `files` is None when
    `want(index)` is False: then no member data is read at all. Samples before `start`
    are stepped over the same way. A truncated or unreadable shard ends the iteration
    early after calling `on_error` (or raising when it is None)."""
    tf = stream = None
    index, key, files = -1, None, None
    try:
        tf, stream = open_tar(url, retries=retries)
        while True:
            try:
                ti = tf.next()
            except tarfile.ReadError as exc:
                # A partial header at the end is a truncated tar; the sample in progress is dropped.
                raise ShardError("truncated_shard", url, str(exc)) from None
            if ti is None:
                break
            tf.members = []  # keep memory flat on huge shards
            if not ti.isreg():
                continue
            name = ti.name
            if _META.match(name):
                continue  # webdataset metadata members
            mkey, ext = split_name(name)
            if mkey is None:
                continue  # webdataset drops members without an extension too
            if mkey != key:
                if key is not None and index >= start:
                    yield index, key, files
                index += 1
                if stop is not None and index >= stop:
                    key = None
                    return
                key, files = mkey, (SampleFiles() if index >= start and (want is None or want(index)) else None)
            if files is None or ext in files:
                continue
            if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
                files.unread.append(ext)
                continue  # never read, never unpickled
            if read_exts is not None and ext not in read_exts and not (read_images and is_image_ext(ext)):
                files.unread.append(ext)
                continue
            try:
                fobj = tf.extractfile(ti)
                data = fobj.read() if fobj is not None else b""
            except (tarfile.ReadError, EOFError, OSError) as exc:
                raise ShardError("truncated_shard", url, f"{name}: {exc}") from None
            if len(data) != ti.size:
                raise ShardError("truncated_shard", url, f"{name}: {len(data)} of {ti.size} bytes")
            files[ext] = data
        if key is not None and index >= start:
            yield index, key, files
        if is_local(url):
            # "r:" mode ends quietly at a cut-off header; a truncated tar shows as an
            # offset past the end of the file.
            size = os.fstat(stream.fileno()).st_size
            if tf.offset > size:
                raise ShardError("truncated_shard", url, f"ends at byte {size}, expected at least {tf.offset}")
    except ShardError as exc:
        if on_error is None:
            raise
        on_error(exc)
    finally:
        if tf is not None:
            try:
                tf.close()
            except Exception:  # noqa: BLE001
                pass
        _quiet_close(stream)


def count_samples(url: str) -> int:
    """Samples in one shard, reading headers only (raises ShardError)."""
    n = 0
    for _ in iter_samples(url, want=lambda i: False):
        n += 1
    return n


def image_key_options(image_key: str | None) -> tuple[str, ...] | None:
    """`"input.jpg;png"` -> ("input.jpg", "png"); None/"" -> None (the default priority)."""
    if not image_key:
        return None
    opts = tuple(e.strip().lower().lstrip(".") for e in str(image_key).split(";") if e.strip())
    return opts or None


def pick_image(files: dict, image_key: str | tuple[str, ...] | None = None) -> tuple[str, bytes] | None:
    """The sample's image member (ext, bytes) by the rule in the module docstring."""
    opts = image_key_options(image_key) if isinstance(image_key, str) else image_key
    if opts:
        for ext in opts:
            if ext in files:
                return ext, files[ext]
        return None
    for ext in IMAGE_EXTS:
        if ext in files:
            return ext, files[ext]
    multi = sorted((IMAGE_EXTS.index(e.rsplit(".", 1)[-1]), e) for e in files if "." in e and is_image_ext(e))
    return (multi[0][1], files[multi[0][1]]) if multi else None

