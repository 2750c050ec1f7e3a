"""Reading tar shards member by member, with sample grouping that never decodes.

Why not webdataset's `tarfile_to_samples`: exact resume must skip samples without
reading their bytes (on a local file, `tarfile` in "r:" mode seeks past unwanted
members), and bad shards must be reported by reason, not raised or slept on.
Opening still goes through `webdataset.gopen`, so `pipe:` URLs (`pipe:aws s3 cp s3://b/x.tar -`,
`pipe:curl -s ...`) and `file:` work as in webdataset.

Sample grouping (how member names map to (key, ext)):
webdataset splits a name at the FIRST dot of its basename, so `img.0001.jpg` and
`img.0002.jpg` both get key `img` and collapse into one sample. Here a member joins the
current sample when its name starts with `<current key>.`; otherwise it starts a new
sample whose key is the name minus its LAST extension. So `a.jpg`+`a.cls` -> key `a`;
`img.0001.jpg`, `img.0002.jpg` -> keys `img.0001`, `img.0002`; webdataset's multi-part
extensions (`a.jpg`, `a.seg.png`) still group under `a` when the shortest name comes first.
The shard writer never produces keys with dots (make-shards sanitises them).
"""

from __future__ import annotations

import os
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
                stream = open(local_path(url), "rb")
                return tarfile.open(fileobj=stream, mode="r:*"), stream
            stream = wds_gopen(url, "rb")
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


def _ext_after(key: str, name: str) -> str:
    return name[len(key) + 1:]


def _stem(name: str) -> tuple[str, str]:
    """Name minus its last extension (only a dot in the basename counts)."""
    slash, dot = name.rfind("/"), name.rfind(".")
    if dot <= slash:
        return name, ""
    return name[:dot], name[dot + 1:]


def iter_samples(url: str, start: int = 0, stop: int | None = None,
                 want: Callable[[int], bool] | None = None,
                 read_exts: tuple[str, ...] | None = IMAGE_EXTS + ("cls",),
                 on_error: Callable[[ShardError], None] | None = None,
                 retries: int = 2) -> Iterator[tuple[int, str, dict | None]]:
    """Yield (index, key, files) for samples `start <= index < stop` of one shard.

    `files` maps ext -> bytes for the members whose ext is in `read_exts` (None = all but
    pickles), or is None when `want(index)` is False: then no member data is read at all.
    Samples before `start` are stepped over the same way. A truncated or unreadable shard
    ends the iteration early after calling `on_error` (or raising when it is None)."""
    tf = stream = None
    index, key, files = -1, None, None
    def finish():
        return (index, key, files)
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
            base = name.rsplit("/", 1)[-1]
            if base.startswith("__") and base.endswith("__"):
                continue  # webdataset metadata members
            if key is not None and name.startswith(key + "."):
                ext = _ext_after(key, name)
            else:
                stem, ext = _stem(name)
                if key is not None and key.startswith(stem + ".") and ext:
                    # `a.seg.png` came before `a.jpg`: shrink the key, keep the exts distinct.
                    suffix = key[len(stem) + 1:]
                    if files is not None:
                        files = {f"{suffix}.{e}": v for e, v in files.items()}
                    key = stem
                else:
                    if key is not None and index >= start:
                        yield finish()
                    index += 1
                    if stop is not None and index >= stop:
                        key = None
                        return
                    key, files = stem, ({} if index >= start and (want is None or want(index)) else None)
            if files is None:
                continue
            ext_l = ext.lower()
            if ext_l.rsplit(".", 1)[-1] in PICKLE_EXTS:
                continue  # never read, never unpickled
            if read_exts is not None and ext_l not in read_exts:
                continue
            try:
                fobj = tf.extractfile(ti)
                data = fobj.read() if fobj is not None else b""
            except (tarfile.ReadError, EOFError, OSError) as exc:
                raise ShardError("truncated_shard", url, f"{name}: {exc}") from None
            if len(data) != ti.size:
                raise ShardError("truncated_shard", url, f"{name}: {len(data)} of {ti.size} bytes")
            files[ext_l] = data
        if key is not None and index >= start:
            yield finish()
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


def pick_image(files: dict) -> tuple[str, bytes] | None:
    """The sample's image member: an exact image ext first, then e.g. `seg.png`-style ones."""
    for ext in IMAGE_EXTS:
        if ext in files:
            return ext, files[ext]
    for ext, data in files.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return ext, data
    return None


def shard_name(url: str) -> str:
    """A short, stable name for logs: the basename of the last path-like token."""
    token = url.split()[-1] if url.startswith("pipe:") else url
    return os.path.basename(token.rstrip("/")) or url
