"""`gigamim consolidate` on REAL DeepSpeed ZeRO checkpoints made by 2 CPU ranks.

Reference: the full fp32 weights gathered inside the training run
(deepspeed.zero.GatheredParameters) and written there by safetensors' own `save_file`;
our output is read back with safetensors' own reader. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gigamim.checkpoint import consolidate
from tests.helpers import zero_checkpoints as zc


@pytest.fixture(scope="session")
def nano_ckpt(tmp_path_factory):
    return zc.nano_zero3(tmp_path_factory.getbasetemp())


@pytest.fixture
def damaged(nano_ckpt, tmp_path):
    """A private copy of the shared checkpoint that a test may break."""
    ckpt, _ = nano_ckpt
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    return copy


def _assert_equal_to_reference(got: dict, ref_path):
    ref = load_file(str(ref_path))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v), f"{k} differs from the weights gathered in the run"


def test_consolidated_weights_equal_gathered_bit_for_bit(nano_ckpt, tmp_path, capsys):
    ckpt, ref = nano_ckpt
    out = tmp_path / "model.safetensors"
    assert consolidate.main([str(ckpt), str(out)]) == 0  # tag from `latest`
    got = load_file(str(out))
    _assert_equal_to_reference(got, ref)
    assert any(k == "encoder.mask_token" for k in got) and "decoder.0.weight" in got
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    assert md["gigamim_config"] == (tag_dir / "gigamim_config.yaml").read_text()
    assert md["step"] == "2" and md["format"] == "simmim" and md["source_world_size"] == "2"
    assert md["zero_stage"] == "3"
    # it says which tag it used: the one DeepSpeed's `latest` names, with the step and the ranks
    # DeepSpeed recorded (issue 24: consolidate did not name the tag)
    printed = capsys.readouterr().out
    assert f"consolidated {tag_dir.name} of {ckpt} (step 2, swinv2_nano, ZeRO-3 from 2 rank(s))" in printed, printed


def test_sharded_output_has_hf_index(nano_ckpt, tmp_path):
    ckpt, ref = nano_ckpt
    out = tmp_path / "sharded"
    assert consolidate.main([str(ckpt), str(out), "--tag", "step_00000002", "--max-shard-size", "300KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    got, total = {}, 0
    for name in files:
        assert (out / name).stat().st_size <= 300_000 + 64_000 or len(load_file(str(out / name))) == 1
        part = load_file(str(out / name))
        assert all(index["weight_map"][k] == name for k in part)
        got.update(part)
        total += sum(t.numel() * t.element_size() for t in part.values())
    assert index["metadata"]["total_size"] == total
    _assert_equal_to_reference(got, ref)


def test_tag_folder_itself_is_accepted(nano_ckpt, tmp_path):
    ckpt, ref = nano_ckpt
    out = tmp_path / "m.safetensors"
    consolidate.consolidate(str(ckpt / "step_00000002"), str(out))
    _assert_equal_to_reference(load_file(str(out)), ref)


def _fails(argv, capsys, *needles):
    rc = consolidate.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in error message: {err}"
    return err


def _no_output_left(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name], "temporary output left behind"


def test_wrong_tag_names_it_and_lists_tags(nano_ckpt, tmp_path, capsys):
    ckpt, _ = nano_ckpt
    out = tmp_path / "o.safetensors"
    _fails([str(ckpt), str(out), "--tag", "step_00000099"], capsys, "step_00000099", "step_00000002")
    _no_output_left(out)


def test_latest_naming_a_missing_tag_falls_back_like_resume(damaged, nano_ckpt, tmp_path, capsys):
    """`latest` naming a tag that is gone: the newest complete tag is used (as `--resume auto`
    does), and the warning names both."""
    _, ref = nano_ckpt
    (damaged / "latest").write_text("step_00000050")
    out = tmp_path / "o.safetensors"
    assert consolidate.main([str(damaged), str(out)]) == 0
    err = capsys.readouterr().err
    assert "step_00000050" in err and "step_00000002" in err and len(err.strip().splitlines()) == 1, err
    _assert_equal_to_reference(load_file(str(out)), ref)


def test_missing_partition_file(damaged, tmp_path, capsys):
    victim = damaged / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.unlink()
    out = tmp_path / "o"
    _fails([str(damaged), str(out)], capsys, victim.name, "world size 2", "missing")
    _no_output_left(out)


def test_truncated_partition_file(damaged, tmp_path, capsys):
    victim = damaged / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    out = tmp_path / "o.safetensors"
    _fails([str(damaged), str(out)], capsys, str(victim), "truncated")
    _no_output_left(out)


def test_mismatched_world_size(damaged, tmp_path, capsys):
    tag = damaged / "step_00000002"
    # A leftover partition from a run with more ranks, mixed into this tag.
    shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    out = tmp_path / "o.safetensors"
    _fails([str(damaged), str(out)], capsys, "zero_pp_rank_2_mp_rank_00_optim_states.pt", "world size 2")
    _no_output_left(out)
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    # gigamim's own record disagreeing with DeepSpeed's
    meta = json.loads((tag / "gigamim_meta.json").read_text())
    (tag / "gigamim_meta.json").write_text(json.dumps(dict(meta, world_size=4)))
    _fails([str(damaged), str(out)], capsys, "gigamim_meta.json", "4")
    _no_output_left(out)


def test_interrupted_gigamim_save_is_refused(damaged, tmp_path, capsys):
    (damaged / "step_00000002" / "gigamim_meta.json").unlink()
    _fails([str(damaged), str(tmp_path / "o.safetensors")], capsys, "incomplete", "gigamim_meta.json")


def test_existing_output_is_kept_without_force(nano_ckpt, tmp_path, capsys):
    ckpt, ref = nano_ckpt
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    _fails([str(ckpt), str(out)], capsys, "exists", "--force")
    assert out.read_bytes() == b"precious"
    assert consolidate.main([str(ckpt), str(out), "--force"]) == 0
    _assert_equal_to_reference(load_file(str(out)), ref)


def test_universal_conversion(nano_ckpt, damaged):
    """ds_to_universal output: a new tag folder beside the source with our config/meta,
    `latest_universal` naming it, `latest` untouched; per-parameter fp32 = gathered weights."""
    _, ref_path = nano_ckpt
    latest_before = (damaged / "latest").read_text()
    assert consolidate.main([str(damaged), "--universal"]) == 0
    uni = damaged / "step_00000002_universal"
    from gigamim.checkpoint.layout import is_universal
    assert is_universal(str(uni))
    assert (damaged / "latest").read_text() == latest_before
    assert (damaged / "latest_universal").read_text().strip() == uni.name
    assert (uni / "gigamim_config.yaml").read_text() == (damaged / "step_00000002" / "gigamim_config.yaml").read_text()
    meta = json.loads((uni / "gigamim_meta.json").read_text())
    assert meta["universal"] is True and meta["source_tag"] == "step_00000002" and meta["source_world_size"] == 2
    assert not [p for p in damaged.iterdir() if ".partial" in p.name]
    for k, v in load_file(str(ref_path)).items():
        got = torch.load(uni / "zero" / k / "fp32.pt", weights_only=True)
        assert torch.equal(got.reshape(v.shape), v), k


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_consolidated_equal_gathered(tmp_path, stage):
    ckpt, ref = tmp_path / "ckpt", tmp_path / "ref.safetensors"
    zc.launch(2, ckpt, stage=stage, reference=ref)
    out = tmp_path / "out"
    assert consolidate.main([str(ckpt), str(out)]) == 0
    _assert_equal_to_reference(load_file(str(out / "model.safetensors")), ref)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["zero_stage"] == str(stage)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """2 ranks: save at step 2, keep training to step 4 (losses recorded); universal copy."""
    base = tmp_path_factory.mktemp("uni")
    ckpt = base / "ckpt"
    zc.launch(2, ckpt, steps=2, extra_steps=2, losses=base / "a.json")
    tag = consolidate.to_universal(str(ckpt))
    return ckpt, os.path.basename(tag), json.loads((base / "a.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_universal_on_other_world_size(two_rank_run, tmp_path, new_world):
    """Resume the universal copy on 1 / 3 ranks: the resumed losses of steps 3 and 4 match
    the uninterrupted 2-rank run (step 4 also checks that the AdamW moments and step count
    came back). Same global batch (6) on every world size."""
    ckpt, tag, a = two_rank_run
    zc.launch(new_world, ckpt, steps=0, extra_steps=2, resume_tag=tag, load_universal=True,
              losses=tmp_path / "b.json")
    b = json.loads((tmp_path / "b.json").read_text())
    assert sorted(b) == ["3", "4"]
    for step in ("3", "4"):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
