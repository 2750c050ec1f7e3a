"""A disk that really fills: a small tmpfs (root only; skipped otherwise). torch.save's own
error on it must become "no space left on <dir>: need ~X GB, have Y GB"; the check before a
save compares the free space with the previous tag's size, measured here with `du`."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest
import torch

from gigamim.checkpoint import space
from tests.helpers.faults import small_tmpfs


def _du_bytes(path) -> int:
    """Sum of the file sizes under `path`, by find(1) (directory entries not counted)."""
    out = subprocess.run(["find", str(path), "-type", "f", "-printf", "%s\n"], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(x) for x in out.split())


def _complete_tag(root, step: int, payload: int):
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * payload)
    (tag / "gigamim_meta.json").write_text(json.dumps({"step": step}))
    return tag


def test_torch_save_on_a_full_disk_becomes_one_line(tmp_path):
    with small_tmpfs(tmp_path / "disk", 1 << 20) as disk:
        with pytest.raises(RuntimeError) as raised:
            torch.save({"w": torch.zeros(1 << 19)}, disk / "x.pt")  # 2 MiB into 1 MiB
        assert "space" not in str(raised.value).lower()  # torch never says so itself
        err = space.space_error(raised.value, disk, need=3 * 10**9)
        assert err is not None
        msg = str(err)
        assert "\n" not in msg and msg.startswith(f"no space left on {disk}: need ~3 GB, have ")
        have = float(msg.split("have ")[1].split(" GB")[0])
        assert have * 1e9 <= 1 << 20
        # Plain file writes give ENOSPC; same line.
        with pytest.raises(OSError) as raised:
            (disk / "y").write_bytes(b"\0" * (2 << 20))
        assert raised.value.errno == errno.ENOSPC
        assert str(space.space_error(raised.value, disk)).startswith(f"no space left on {disk}: have ")


def test_stream_error_on_a_disk_with_room_is_not_called_full(tmp_path):
    fake = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    if space.free_bytes(tmp_path) < 2 * space.NEARLY_FULL_BYTES:
        pytest.skip("the test folder's disk is itself nearly full")
    assert space.space_error(fake, tmp_path) is None
    assert space.space_error(fake, tmp_path / "not" / "yet") is None  # measured on the nearest existing parent
    assert space.space_error(PermissionError(errno.EACCES, "denied"), tmp_path) is None


def test_check_before_save_uses_the_previous_tag_size(tmp_path):
    with small_tmpfs(tmp_path / "disk", 4 << 20) as disk:
        ck = disk / "ck"
        assert space.check_free_space(ck) is None  # no tag yet: nothing to compare against
        old = _complete_tag(ck, 10, 1 << 20)
        # An incomplete (crashed) tag later than the complete one is not the reference.
        (ck / "step_00000020").mkdir()
        (ck / "step_00000020" / "junk.pt").write_bytes(b"\0" * 1000)
        need = space.check_free_space(ck)
        assert need == pytest.approx(_du_bytes(old) * space.MARGIN, rel=1e-6)
        _complete_tag(ck, 30, 2 << 20)  # newest tag is now 2 MiB; free is below that
        free = space.free_bytes(ck)
        assert free < (2 << 20)
        with pytest.raises(space.NoSpaceError) as err:
            space.check_free_space(ck)
        assert f"no space left on {ck}" in str(err.value)
        assert f"have {free / 1e9:.3g} GB" in str(err.value)
