"""Issue 24's points 3-5: the README's timm block works for every size (the export's metadata
holds timm's constructor arguments, and a timm name where one fits), the verbs end without the
cosmetic slips a newcomer met (make-shards' `converted 0 )`, a skipped sample shown as
`members: []`, top-5 of 2 classes, bench profiles described nowhere, doctor's `deepspeed
--num_gpus` on a CPU), and the planner says what it assumed. References: timm itself (its
registry, its class, its forward in float64), files on disk, argparse, arithmetic."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from gigamim.models import SimMIM, create_model, list_models
from gigamim.models import timm_compat
from tests.helpers.randomize import randomize_weights

SWINV2 = list_models("swinv2_*")


# ----------------------------------------------------------------------------- timm, every size

ROOT = Path(__file__).resolve().parent.parent
LOAD_LINE = 'state, meta = load_export("timm.safetensors")'


def readme_timm_block() -> str:
    """The Python block between the timm-export markers of docs/checkpoints.md (the README's
    export reference since the docs split), as written."""
    m = re.search(r"<!-- timm-export:.*?-->\n```python\n(.*?)```\n<!-- /timm-export -->",
                  (ROOT / "docs" / "checkpoints.md").read_text(), re.S)
    assert m, "docs/checkpoints.md lost its timm-export block"
    assert LOAD_LINE in m.group(1)
    return m.group(1)


def _timm_metadata_as_exported(name: str, enc: dict) -> dict:
    """The metadata `gigamim export --format timm` writes for the weights of a run of `name` at its
    default geometry (the export's own path from the run config to the timm fields)."""
    from gigamim.checkpoint.export import run_geometry

    run = {"gigamim_config": yaml.safe_dump({"model": {"name": name}})}
    meta, _ = timm_compat.timm_metadata(enc, run_geometry(run))
    return meta


# timm registers exactly these at the sizes' default geometry (192 px, window 12; nano window 6)
NAMED = {"swinv2_base": "swinv2_base_window12_192", "swinv2_large": "swinv2_large_window12_192"}


@pytest.mark.parametrize("name", SWINV2)
def test_readme_timm_block_loads_every_size_strictly(name):
    """The README's block as written, on the meta device (giant is 3B parameters): for every size
    the model it builds from the export's metadata takes the encoder's state with strict=True,
    through timm.create_model where timm names the model and timm's class otherwise; H/G carry
    their main-branch norm period. Without the constructor-argument branch the block gave
    timm.create_model('') for nano, tiny, small, huge and giant."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    head, body = readme_timm_block().split(LOAD_LINE)
    with torch.device("meta"):
        enc = create_model(name).state_dict()
    meta = _timm_metadata_as_exported(name, enc)
    assert meta["timm_model"] == NAMED.get(name, "")
    assert int(meta.get("timm_extra_norm_period", 0)) == (6 if name in ("swinv2_huge", "swinv2_giant") else 0)
    scope: dict = {}
    exec(compile(head, "README.md timm-export", "exec"), scope)
    scope.update(state=enc, meta=meta)
    with torch.device("meta"):
        exec(compile(body, "README.md timm-export", "exec"), scope)  # load_state_dict(strict=True) inside
    model = scope["model"]
    assert isinstance(model, SwinTransformerV2)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in enc.items()}


@pytest.mark.parametrize("name,kw", [("swinv2_nano", {}),  # no timm name: timm's class + the arguments
                                     ("swinv2_tiny", {"img_size": 256, "window_size": 8}),  # a timm name
                                     ("swinv2_nano", {"extra_norm_period": 1})])  # H/G's norms, small
def test_readme_timm_block_runs_on_a_real_export(tmp_path, capsys, monkeypatch, name, kw):
    """`gigamim export --format timm` of real weights, then the README's block as written in that
    folder: timm's model (timm.create_model where a name fits) gives the features of gigamim's
    encoder holding the same weights."""
    from gigamim.checkpoint import export

    model = randomize_weights(SimMIM(create_model(name, **kw)), seed=2).eval()
    src = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict(), str(src), metadata={"gigamim_config": yaml.safe_dump({"model": {"name": name, **kw}}),
                                                      "step": "9", "format": "simmim"})
    monkeypatch.chdir(tmp_path)
    assert export.main([str(src), "timm.safetensors", "--format", "timm"]) == 0
    printed = capsys.readouterr().out
    scope: dict = {}
    exec(compile(readme_timm_block(), "README.md timm-export", "exec"), scope)
    tm, meta = scope["model"].eval(), scope["meta"]
    named = meta["timm_model"]
    assert named == ("swinv2_tiny_window8_256" if name == "swinv2_tiny" else "")
    if named:
        assert tm.default_cfg["architecture"] == named and f"timm.create_model({named!r}, num_classes=0)" in printed
    side = kw.get("img_size", 192)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():  # float64: two implementations of the same maths agree to rounding
        torch.testing.assert_close(tm.double().forward_features(x), model.encoder.double().eval().forward_features(x),
                                   rtol=1e-9, atol=1e-9)
    assert "timm class: timm.models.swin_transformer_v2.SwinTransformerV2" in printed
    assert "(step 9" in printed and ("LayerNorm every 1 blocks" in printed) == ("extra_norm_period" in kw)


def test_the_note_lists_the_sizes_timm_really_has():
    """The old note said tiny/small/base/large at 192/256/384 px; timm has no tiny or small at 192."""
    import timm

    sizes: dict[str, set] = {}
    for n in timm.list_models("swinv2_*"):
        m = re.match(r"swinv2_(tiny|small|base|large)_", n)
        if m:
            sizes.setdefault(m.group(1), set()).add(timm.models.get_pretrained_cfg(n).input_size[-1])
    text = timm_compat.timm_swinv2_sizes()
    for size, sides in sizes.items():
        assert f"{size} at {'/'.join(map(str, sorted(sides)))} px" in text, text
    assert 192 not in sizes["tiny"] and "tiny at 256 px" in text


# ----------------------------------------------------------------------------- closing lines, cosmetics


def test_make_shards_summary_has_no_empty_counts():
    from gigamim.data.make_shards import summary

    report = {"inputs": 3, "written": 3, "written_unchanged": 3, "converted": {}, "skipped": {}, "shards": 1,
              "classes": ["a", "b"]}
    text = "\n".join(summary(report, "out"))
    assert "3 inputs: wrote 3 samples in 1 shard(s) -> out/index.json (2 classes: a, b)" in text
    assert not re.search(r"converted 0|skipped 0|\{\}|\( *\)", text), text
    report.update(written_unchanged=1, converted={"renamed_jpeg_to_png": 2}, skipped={"not_an_image": 1}, inputs=4)
    text = "\n".join(summary(report, "out"))
    assert "1 unchanged, 2 converted (renamed_jpeg_to_png 2); 1 skipped (not_an_image 1)" in text, text


def test_a_sample_without_an_image_names_its_members(tmp_path, caplog):
    from gigamim.data.loader import SimMIMLoader
    from tests.test_data_helpers import collect, image_bytes, write_tar

    write_tar(tmp_path / "s.tar", [("a.jpg", image_bytes(40, 40, seed=1)), ("meta_only.json", b"{}"),
                                   ("c.jpg", image_bytes(40, 40, seed=2))])
    loader = SimMIMLoader([str(tmp_path / "s.tar")], 2, img_size=32, mask_patch_size=16, model_patch_size=4,
                          shuffle_buffer=2, num_workers=0)
    with caplog.at_level(logging.WARNING):
        collect(loader, len(loader))
    assert loader.skip_counts == {"no_image": 1}
    assert "no image member among ['json']" in caplog.text and "members: []" not in caplog.text, caplog.text


def test_no_top5_with_five_classes_or_fewer():
    from gigamim.train.probe import probe

    g = torch.Generator().manual_seed(0)
    for classes, has_top5 in ((2, False), (5, False), (6, True)):
        y = torch.arange(60) % classes
        x = torch.randn(60, 4, generator=g, dtype=torch.float64) + y[:, None].double()
        res = probe(None, (x, y), (x, y), max_iter=20)
        assert ("top5" in res) is has_top5 and res["num_classes"] == classes


def test_bench_help_describes_every_profile():
    from gigamim import cli
    from gigamim_benchmarks.profiles import PROFILES

    text = cli.parser_for("bench").format_help()
    described = dict(re.findall(r"^  (\w+) +(\S.*)$", text.split("profiles:", 1)[1], re.M))
    assert set(described) == set(PROFILES), described


def test_doctor_suggests_gigamims_launcher(capsys):
    from gigamim.launch import doctor

    assert doctor.launch_suggestion({"devices": ["no CUDA device; CPU: 2 logical cores"]}) == \
        "gigamim launch --nproc-per-node 2 doctor"
    eight = [f"cuda:{i} NVIDIA H100, 79.1 GiB, compute capability 9.0" for i in range(8)]
    assert doctor.launch_suggestion({"devices": eight}) == "gigamim launch --nproc-per-node 8 doctor"
    if torch.cuda.is_available():
        pytest.skip("the one-process line below is for a CPU machine")
    assert doctor.main(["--no-ops"]) == 0
    out = capsys.readouterr().out
    assert "`gigamim launch --nproc-per-node 2 doctor`" in out and "deepspeed --num_gpus" not in out


# ----------------------------------------------------------------------------- the planner's assumptions


def test_plan_marks_assumptions_shows_the_requested_batch_and_the_accumulation_dtype(capsys):
    """Issue 24 point 5: the recommended plan's MFU is the assumed efficiency at work, the table's
    global column was the largest micro-batch x GPUs instead of the requested 9216, and bf16
    gradient accumulation went unmentioned. References: arithmetic on the printed split (mb x acc
    x GPUs = the requested batch), and the DeepSpeed config gigamim writes for the recommended
    template (bf16 on, no data_types.grad_accum_dtype: DeepSpeed then accumulates in the model
    dtype, `DeepSpeedEngine.get_data_types`)."""
    from gigamim.config import load_config
    from gigamim.tools import plan
    from gigamim.train.engines.deepspeed import build_ds_config

    argv = ["--model", "swinv2_giant", "--gpus", "64", "--gpus-per-node", "8", "--gpu-mem", "80",
            "--global-batch", "9216"]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    rows = re.findall(r"^(?:ZeRO-[123](?: offload)?|FSDP2(?: no-reshard)?) +\S+ +[\d.]+ +[\d.]+ +\d+ +(\d+) x (\d+)$",
                      text, re.M)
    assert len(rows) == (6 + 2) * 6, text  # (ZeRO-1/2/3 x offload + FSDP2 x reshard) x activation modes
    assert all(int(mb) * int(acc) * 64 == 9216 for mb, acc in rows), rows
    rec = next(line for line in text.splitlines() if line.startswith("recommended:"))
    mb, acc = map(int, re.search(r"micro-batch (\d+) x (\d+) accumulation", rec).groups())
    assert mb * acc * 64 == 9216 and "= global 9216 (the requested 9216)" in rec, rec
    assert "efficiency 0.50 (assumed)" in text and "the assumed efficiency 0.50 x compute" in text
    assert re.search(r"^  --efficiency 0\.50 .*calibrate: `gigamim bench --profile gpu` on one GPU", text, re.M), text
    cfg = load_config(None, ["deepspeed.config=zero1_bf16", "train.precision=bf16", f"train.micro_batch_size={mb}",
                             f"train.global_batch_size={mb * acc * 64}"])
    ds = build_ds_config(cfg, 64, True, 1e-3)
    assert ds["bf16"]["enabled"] and "grad_accum_dtype" not in ds.get("data_types", {})
    assert ds["gradient_accumulation_steps"] == acc > 1
    assert f"gradient accumulation: {acc} micro-steps summed in bf16" in text and '"grad_accum_dtype": "fp32"' in text
    # a measured efficiency is not called assumed
    assert plan.main(argv + ["--efficiency", "0.41"]) == 0
    text = capsys.readouterr().out
    assert "x efficiency 0.41;" in text and "efficiency 0.41 (assumed)" not in text
    assert not re.search(r"^  --efficiency", text, re.M)
