"""One resolver for every verb: `--resume`, `gigamim consolidate` and `gigamim export` pick the
same tag for the same checkpoint folder, whatever state the folder is in.

The folders are made from a real 2-rank ZeRO-3 DeepSpeed checkpoint (tests/helpers): its tag
is copied as an older tag and then damaged in the ways a crash or a disk leaves them. The
expected pick for each state is written out by hand below (the reference), and both code
paths must agree with it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gigamim.checkpoint import consolidate
from gigamim.checkpoint.check import open_checkpoint
from gigamim.checkpoint.layout import CheckpointError
from gigamim.train.resume import resolve_resume
from tests.helpers import zero_checkpoints as zc

NEW, OLD = "step_00000002", "step_00000001"


@pytest.fixture(scope="module")
def nano_ckpt(tmp_path_factory):
    return zc.nano_zero3(tmp_path_factory.getbasetemp())


@pytest.fixture
def two_tags(nano_ckpt, tmp_path):
    """ckpt/{step_00000001, step_00000002, latest -> step_00000002}, all complete."""
    src, _ = nano_ckpt
    root = tmp_path / "ckpt"
    shutil.copytree(src, root)
    shutil.copytree(root / NEW, root / OLD)
    meta = json.loads((root / OLD / "gigamim_meta.json").read_text())
    (root / OLD / "gigamim_meta.json").write_text(json.dumps(dict(meta, step=1)))
    assert (root / "latest").read_text().strip() == NEW
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "healthy": (lambda r: None, NEW, None),
    "latest names a missing tag": (lambda r: (r / "latest").write_text("step_00000077"), NEW, "step_00000077"),
    "latest is binary junk": (lambda r: (r / "latest").write_bytes(bytes(range(130, 194))), NEW, "readable"),
    "latest is absent": (lambda r: (r / "latest").unlink(), NEW, "latest is missing"),
    "newest tag has no meta (save cut short)": (lambda r: (r / NEW / "gigamim_meta.json").unlink(), OLD, NEW),
    "newest tag has a truncated optimizer partition": (
        lambda r: _truncate(r / NEW / "zero_pp_rank_1_mp_rank_00_optim_states.pt"), OLD,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "newest tag lost a rank's model states": (
        lambda r: (r / NEW / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink(), OLD,
        "zero_pp_rank_1_mp_rank_00_model_states.pt"),
}


@pytest.mark.parametrize("state", list(DAMAGE))
def test_resume_and_consolidate_pick_the_same_tag(two_tags, state, capsys):
    damage, expected, named_in_warning = DAMAGE[state]
    damage(two_tags)
    notes = []
    resume = resolve_resume("auto", str(two_tags), world_size=2, say=notes.append)
    assert resume.tag == expected
    assert open_checkpoint(two_tags).tag == expected
    if named_in_warning:
        assert len(notes) == 1 and named_in_warning in notes[0] and expected in notes[0], notes
        assert ".;" not in notes[0], notes  # one sentence per note, not "... re-save the checkpoint.; using"
        assert named_in_warning in capsys.readouterr().err
    else:
        assert notes == []
    # --resume DIR (not auto) picks the same.
    assert resolve_resume(str(two_tags), str(two_tags), world_size=2, say=lambda m: None).tag == expected


def test_export_picks_the_same_tag(two_tags, tmp_path):
    from gigamim.checkpoint import export

    _truncate(two_tags / NEW / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    out = tmp_path / "enc.safetensors"
    assert export.main([str(two_tags), str(out), "--format", "encoder"]) == 0
    _, md = export.load_export(str(out))
    assert md["source_tag"] == OLD


def test_explicit_damaged_tag_is_refused_not_replaced(two_tags, tmp_path, capsys):
    _truncate(two_tags / NEW / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        resolve_resume(str(two_tags / NEW), str(two_tags), world_size=2)
    assert consolidate.main([str(two_tags), str(tmp_path / "o.safetensors"), "--tag", NEW]) == 2
    err = capsys.readouterr().err
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in err and len(err.strip().splitlines()) == 1


def test_nothing_to_resume(tmp_path):
    notes = []
    assert resolve_resume("auto", str(tmp_path / "none"), world_size=2, say=notes.append) is None
    assert "starting from step 0" in notes[0]
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "none"), str(tmp_path), world_size=2)


def test_other_world_size_points_to_universal(two_tags):
    with pytest.raises(CheckpointError, match="saved by 2 ranks and this run has 3.*--universal"):
        resolve_resume("auto", str(two_tags), world_size=3)
