"""What the checkpoint code says when it falls back or runs out of room (issue 21, item 6):
a deleted `latest` is named, and the disk-full advice suggests a lower keep_last only when
deleting the older tags would make room. Folders built here with real files; sizes measured
with find(1), independently of gigamim's own byte counter."""

from __future__ import annotations

import json
import subprocess

from gigamim.checkpoint import space
from gigamim.checkpoint.layout import resolve


def _tag(root, step: int, payload: int = 0):
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * payload)
    (tag / "gigamim_meta.json").write_text(json.dumps({"step": step}))
    return tag


def _bytes(path) -> int:
    out = subprocess.run(["find", str(path), "-type", "f", "-printf", "%s\n"], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(x) for x in out.split())


def test_deleted_latest_is_named(tmp_path):
    _tag(tmp_path, 2)
    _tag(tmp_path, 4)
    (tmp_path / "latest").write_text("step_00000004")
    assert resolve(tmp_path).note is None
    (tmp_path / "latest").unlink()
    r = resolve(tmp_path)
    assert r.tag == "step_00000004"
    assert r.note and "latest is missing" in r.note and "step_00000004" in r.note


def test_disk_full_advice_names_keep_last_only_when_it_helps(tmp_path):
    old, new = _tag(tmp_path, 2, 3_000_000), _tag(tmp_path, 4, 3_000_000)
    older = _bytes(old)
    # Deleting step 2 would make room for a 3 MB tag with 1 MB free: keep_last is the advice.
    msg = space.no_space_message(tmp_path, need=_bytes(new), have=1_000_000)
    assert "keep_last" in msg and f"{older / 1e9:.3g} GB" in msg
    # A tag larger than the free space plus every older tag: keep_last cannot help.
    msg = space.no_space_message(tmp_path, need=10 * _bytes(new), have=1_000_000)
    assert "keep_last" not in msg and "does not fit" in msg
    # Only one tag: nothing older to delete.
    lone = tmp_path / "lone"
    _tag(lone, 2, 1000)
    msg = space.no_space_message(lone, need=5000, have=100)
    assert "keep_last" not in msg and msg.count("\n") == 0
