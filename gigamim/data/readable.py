"""Is there anything to read? A cheap check of a shard set before a run builds anything.

The loader skips unreadable shards one by one (counted in `data_skipped`); a set in which no
shard is a tar archive (a wrong folder, files that are not shards, a failed download) is
a mistake to say in one line at start-up, not after the engine is built. The local shards
are opened in order until one holds a member: with good data that is the first shard (one
open, one 512-byte header); only an all-bad set is read to its end. Remote and `pipe:` URLs
are not opened here (the loader says what it meets).
"""

from __future__ import annotations

import tarfile

from gigamim.data import shardspec


def first_readable_shard(spec) -> str | None:
    """The first local shard of `spec` whose first tar member can be read; None when every
    local shard fails. Raises ValueError naming the first failure when none is readable
    (the spec has local shards and none is a tar archive with a member)."""
    urls = shardspec.resolve(spec).urls
    local = [u for u in urls if shardspec.url_kind(u) == "local"]
    if len(local) < len(urls):
        return None  # remote shards may be fine: the loader will tell
    first_error = None
    for url in local:
        path = shardspec.local_path(url)
        try:
            with tarfile.open(path, mode="r|*") as tar:
                if tar.next() is not None:
                    return path
                why = "no members"
        except (tarfile.TarError, OSError, EOFError) as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
        if first_error is None:
            first_error = f"{path} ({why})"
    if first_error is None:
        return None
    raise ValueError(f"none of the {len(local)} shard(s) is a readable tar archive; the first: {first_error}")
