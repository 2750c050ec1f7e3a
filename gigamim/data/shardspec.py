"""THE shard-spec parser: one set of rules for `data.shards`, the loader and make-shards.

`resolve(spec)` turns a spec into a `ShardList` (URLs, per-shard sample counts where an
index gives them, class names where an index has them); `missing_local_shards(spec)`
lists the local shard files that do not exist. `config.validate` and `SimMIMLoader`
both go through here, so a spec is accepted or rejected the same way at config time
and in the loader (config additionally rejects missing local shard files; the loader
tolerates shards that vanish during a run and counts them as skipped).

Rules
- A spec is a string, a path, or a list/tuple of strings. A list is taken element by
  element; each element is brace-expanded but never split (use a list when a `pipe:`
  command itself contains `,` or `::`).
- A string is split into parts at `::` (webdataset's separator) and at `,` that is
  OUTSIDE braces: `a.tar,b.tar` and `a.tar::b.tar` are two shards, while
  `x-{a,b}.tar` is one brace pattern. Whitespace around parts is dropped, empty parts
  are ignored.
- Braces must balance in every part; each part is expanded with `braceexpand` (what
  webdataset uses): ranges `{000..009}` keep their zero padding, lists `{a,b}`, nesting.
  No environment-variable expansion (unlike webdataset's `WDS_` substitution): a spec
  means the same on every node.
- A part ending in `.json` is a gigamim index (`{"shards": [{"url", "num_samples"}], "total",
  optional "classes"}`); its relative URLs are relative to the index's own location
  (folder for a local index, URL for a remote one). A part naming a local folder means
  that folder's `index.json` if it has one, else every `*.tar` in it (sorted).
- Kinds: `pipe:<command>` (run by webdataset's gopen: everything after `pipe:` goes to the
  shell whole, never split), `file:<path>` and plain paths
  (local), `<scheme>://...` or `<scheme>:...` (remote: `s3://`, `https://`, `gs://`, ...;
  opened by webdataset's gopen). Windows drive letters `C:\\...` are local.
- A shard's name (`shard_name`: logs, cache files, matching an index's counts by basename)
  is the basename of what its URL reads; for a `pipe:` command that is `pipe_source`.
- Errors are `ShardSpecError` (a ValueError) with one line naming the spec and the problem:
  empty spec, unbalanced braces, empty folder, unreadable or malformed index.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field

import braceexpand

INDEX_NAME = "index.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_DRIVE = re.compile(r"^[a-zA-Z]:[\\/]")
# webdataset's rule for the URL inside a pipe command (`webdataset.cache.pipe_cleaner`).
_PIPE_URL_WORD = re.compile(r"^(https?|hdfs|gs|ais|s3):")


class ShardSpecError(ValueError):
    """A shard spec that cannot mean any list of shards; the message is one line."""


@dataclass
class ShardList:
    urls: list[str]
    counts: list[int | None]                 # None where no index gives the count
    classes: list[str] | None = None         # class names from an index (labelled shards)
    indexes: list[str] = field(default_factory=list)   # index files the spec went through


def url_kind(url: str) -> str:
    """'pipe', 'local' or 'remote'."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("file:") or _DRIVE.match(url) or not _SCHEME.match(url):
        return "local"
    return "remote"


def pipe_source(url: str) -> str:
    """What a URL reads: for `pipe:<command>`, the first word of the command that is an
    http(s)/hdfs/gs/ais/s3 URL (`pipe:aws s3 cp s3://b/x.tar -` -> `s3://b/x.tar`), exactly
    webdataset's `pipe_cleaner`, which is marked obsolete in webdataset 1.x, so it cannot be
    called (it raises unless ALLOW_OBSOLETE=1); for a command without such a word
    (`pipe:cat /data/x.tar`), its last word, where webdataset keeps the whole command (we
    want a name from it). Any other URL is returned as it is."""
    if not url.startswith("pipe:"):
        return url
    words = [w for w in url[len("pipe:"):].split(" ") if w]
    return next((w for w in words if _PIPE_URL_WORD.match(w)), words[-1] if words else url)


def shard_name(url: str) -> str:
    """A short, stable name for logs, cache files and index matching: the basename of what
    the URL reads (`pipe_source`)."""
    return os.path.basename(pipe_source(url).rstrip("/")) or url


def local_path(url: str) -> str:
    """The filesystem path of a local URL (`file:///x`, `file:x` or a plain path)."""
    if url.startswith("file:"):
        rest = url[len("file:"):]
        return "/" + rest.lstrip("/") if rest.startswith("//") else rest
    return url


def split_spec(spec: str) -> list[str]:
    """Top-level parts of a spec string: split at `::` and at `,` outside braces."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(spec):
        ch = spec[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ShardSpecError(f"shard spec {spec!r}: unbalanced braces (a '}}' without its '{{')")
        if depth == 0 and (ch == "," or spec.startswith("::", i)):
            parts.append("".join(cur))
            cur = []
            i += 2 if ch == ":" else 1
            continue
        cur.append(ch)
        i += 1
    if depth != 0:
        raise ShardSpecError(f"shard spec {spec!r}: unbalanced braces ({depth} '{{' not closed)")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def expand_part(part: str) -> list[str]:
    """Brace expansion of one part (braces are checked to balance first)."""
    depth = 0
    for ch in part:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            break
    if depth != 0:
        raise ShardSpecError(f"shard spec part {part!r}: unbalanced braces")
    try:
        return [u for u in braceexpand.braceexpand(part) if u]
    except braceexpand.UnbalancedBracesError:
        raise ShardSpecError(f"shard spec part {part!r}: unbalanced braces") from None


def _parts(spec) -> list[str]:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        if not spec.strip():
            raise ShardSpecError("shard spec is empty: give a brace pattern, a list, a folder or an index.json of tar shards")
        return [u for p in split_spec(spec) for u in expand_part(p)]
    if isinstance(spec, (list, tuple)):
        out = [u for item in spec for u in expand_part(str(os.fspath(item)).strip())]
        if not out:
            raise ShardSpecError("shard spec is an empty list")
        return out
    raise ShardSpecError(f"shard spec must be a string or a list of strings, got {type(spec).__name__}")


def _join(base: str, url: str) -> str:
    """`url` as written in an index at `base` (a local folder or a remote/pipe-less URL dir)."""
    if url_kind(url) != "local" or url.startswith("file:") or os.path.isabs(url):
        return url
    if url_kind(base) == "local":
        return os.path.join(base, url)
    return posixpath.join(base, url)


def read_index(path: str) -> tuple[list[str], list[int], list[str] | None]:
    """(urls, counts, classes) of a gigamim index.json (local, or remote through gopen)."""
    try:
        if url_kind(path) == "local":
            with open(local_path(path), encoding="utf-8") as f:
                index = json.load(f)
            base = os.path.dirname(os.path.abspath(local_path(path)))
        else:
            from webdataset.gopen import gopen

            with gopen(path, "rb") as f:
                index = json.loads(f.read().decode("utf-8"))
            base = path.rsplit("/", 1)[0] if "/" in path else ""
        entries = index["shards"]
        urls = [_join(base, str(e["url"])) for e in entries]
        counts = [int(e["num_samples"]) for e in entries]
        classes = index.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError("'classes' must be a list of strings")
    except FileNotFoundError:
        raise ShardSpecError(f"shard index {path!r} does not exist") from None
    except OSError as exc:
        raise ShardSpecError(f"shard index {path!r} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ShardSpecError(f"shard index {path!r} is not a gigamim index "
                             f'({{"shards": [{{"url": ..., "num_samples": n}}], "total": N}}): '
                             f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not urls:
        raise ShardSpecError(f"shard index {path!r} lists no shards")
    return urls, counts, classes


def _folder(path: str) -> str | list[str]:
    """A local folder: its index.json, or its tar files."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        return index
    tars = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(TAR_SUFFIXES))
    if not tars:
        raise ShardSpecError(f"shard folder {path!r} holds no {INDEX_NAME} and no .tar files")
    return tars


def resolve(spec) -> ShardList:
    """The shard list a spec means (reads index files; opens no shard)."""
    urls: list[str] = []
    counts: list[int | None] = []
    classes: list[str] | None = None
    indexes: list[str] = []
    for part in _parts(spec):
        if url_kind(part) == "local" and os.path.isdir(local_path(part)):
            found = _folder(local_path(part))
            if isinstance(found, list):
                urls += found
                counts += [None] * len(found)
                continue
            part = found
        if part.endswith(".json"):
            iurls, icounts, icls = read_index(part)
            if icls is not None:
                if classes is not None and classes != icls:
                    raise ShardSpecError(f"shard indexes disagree on class names ({part!r} vs an earlier one)")
                classes = icls
            urls += iurls
            counts += icounts
            indexes.append(part)
        else:
            urls.append(part)
            counts.append(None)
    return ShardList(urls, counts, classes, indexes)


def missing_local_shards(spec) -> list[str]:
    """Local shard files of `spec` that do not exist (pipe: and remote URLs are not checked).
    Raises ShardSpecError for a spec that means no shard list at all."""
    return [u for u in resolve(spec).urls if url_kind(u) == "local" and not os.path.isfile(local_path(u))]
