"""The README's own-images path, word for word (issue 24): the two blocks between the
`own-images` markers of README.md are read from the file and run as written, in a fresh folder
holding only `photos/` (scikit-image's and scikit-learn's sample photos: RGBA, grey, 1-bit,
16-bit, CMYK, EXIF-rotated, a note that is not an image; `tests/helpers/photos.py`), with
`gigamim` on PATH running this checkout. No override beyond the shard paths.

Default run (~20 s): every command line of the block parses through the real parsers, the
make-shards lines run as written, and the fine-tune line resolves (--print-config) against a
weights file like the one `gigamim consolidate` leaves: the model from its metadata, the classes
from the shards, the device's template and precision. Slow (~7 min on 2 shared cores): the whole
path, then the Python block; the classifier it loads into timm must give the logits of gigamim's
own encoder holding the same file (an independent implementation), and the pretraining loss must
fall."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers.suggestions import check_command

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("skimage", reason="the sample photos come from scikit-image (pip install '.[test]')")


def readme_blocks() -> tuple[str, str]:
    """(bash block, python block) between the own-images markers of README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- own-images:.*?-->\n(.*?)<!-- /own-images -->", text, re.S)
    assert m, "README.md lost its own-images markers"
    blocks = re.findall(r"```(\w+)\n(.*?)```", m.group(1), re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python"], blocks
    return blocks[0][1], blocks[1][1]


def command_lines(bash: str) -> list[list[str]]:
    """The block's commands as argv lists (continuations joined, comments dropped)."""
    joined = bash.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _env(tmp_path: Path) -> dict:
    """`gigamim` on PATH, running this checkout with this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "gigamim"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m gigamim \"$@\"\n")
    shim.chmod(0o755)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # A user's shell, not this pytest process: an earlier in-process run (the real-images check)
    # left its process group's MASTER_PORT etc. here, still bound (EADDRINUSE in the README run).
    from tests.launch import GROUP_VARS

    env = {k: v for k, v in os.environ.items() if k not in GROUP_VARS}
    return dict(env, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=path)


def _folder(tmp_path: Path) -> Path:
    from tests.helpers.photos import write_photos

    work = tmp_path / "fresh"
    work.mkdir()
    write_photos(work)
    return work


def test_readme_commands_parse_and_name_only_the_shards():
    bash, python = readme_blocks()
    commands = command_lines(bash)
    assert [c[:2] for c in commands] == [["gigamim", "make-shards"], ["gigamim", "make-shards"],
                                         ["gigamim", "pretrain"], ["gigamim", "consolidate"],
                                         ["gigamim", "finetune"], ["gigamim", "probe"]]
    for argv in commands:
        check_command(argv[1], argv[2:])
    # the only config overrides are where the shards are
    sets = [argv[i + 1] for argv in commands for i, a in enumerate(argv) if a == "--set"]
    assert sets and all(re.fullmatch(r"(data\.shards|finetune\.(train|val)_shards)=shards/\w+/index\.json", s)
                        for s in sets), sets
    assert "timm_model_from_metadata(meta)" in python and "strict=True" in python


def test_readme_shards_and_finetune_config_from_the_weights(tmp_path, monkeypatch, capsys):
    """The make-shards lines as written on the real photos, then the fine-tune line's config
    (--print-config) against weights that record their run as `gigamim consolidate` writes it;
    in this process (`gigamim.cli.main` with the line's arguments), the slow test runs them as
    commands."""
    from safetensors.torch import save_file

    from gigamim import cli
    from gigamim.models import SimMIM, create_model

    bash, _ = readme_blocks()
    commands = command_lines(bash)
    work = _folder(tmp_path)
    monkeypatch.chdir(work)
    for argv in commands[:2]:
        assert cli.main(argv[1:] + ["--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "19 inputs: wrote 18 samples in 1 shard(s)" in printed and "1 skipped (not_an_image 1)" in printed
    report = json.loads((work / "shards" / "train" / "make_shards_report.json").read_text())
    assert report["written"] == 18 and report["skipped"] == {"not_an_image": 1}, report
    # weights/ as consolidate leaves it: SimMIM tensors + the run's config in the metadata
    cfg = yaml.safe_load((ROOT / "gigamim" / "configs" / "simmim_swinv2_nano.yaml").read_text())
    (work / "weights").mkdir()
    save_file(SimMIM(create_model("swinv2_nano")).state_dict(), str(work / "weights" / "model.safetensors"),
              metadata={"gigamim_config": yaml.safe_dump({**cfg, "model": {**cfg["model"], "window_size": 6}}),
                        "format": "simmim", "step": "60"})
    assert cli.main(commands[4][1:] + ["--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["name"] == "swinv2_nano" and resolved["model"]["img_size"] == 192
    assert resolved["model"]["window_size"] == 6 and resolved["model"]["pretrained_window_sizes"] is None
    assert resolved["finetune"]["num_classes"] == 2 and resolved["finetune"]["weights"] == "weights/"
    assert resolved["deepspeed"]["config"] == ("zero3_bf16" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_readme_own_images_path_word_for_word(tmp_path):
    bash, python = readme_blocks()
    work, env = _folder(tmp_path), _env(tmp_path)
    t0 = time.time()
    p = subprocess.run(["bash", "-e", "-c", bash], cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    took = time.time() - t0
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    out = p.stdout + p.stderr
    for said in ("model from weights/: swinv2_nano, 192 px, window 6", "2 classes from shards/train/index.json",
                 "consolidated step_00000060 of", "gigamim pretrain: done: step 60 of 60",
                 "gigamim finetune: done: step 60 of 60"):
        assert said in out, said
    metrics = [json.loads(x) for x in (work / "runs/simmim_swinv2_nano/logs/metrics.jsonl").read_text().split("\n") if x]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    probe = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    assert probe["num_classes"] == 2 and probe["n_val"] == 6 and "top5" not in probe  # no top-5 of 2 classes

    # the Python block as written, in that folder
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(work)
    try:
        exec(compile(python, "README.md own-images", "exec"), scope)
    finally:
        os.chdir(cwd)
    model, state, meta = scope["model"], scope["state"], scope["meta"]
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from gigamim.models import create_model

    assert type(model) is SwinTransformerV2 and model.head.fc.out_features == 2
    ours = create_model("swinv2_nano", num_classes=2).eval()
    ours.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours(x), rtol=1e-4, atol=1e-4)
    print(f"\nown-images path: {took:.0f} s; fine-tune top-1 "
          f"{json.loads((work / 'runs/finetune_quick/logs/metrics.jsonl').read_text().splitlines()[-1]).get('top1')}, "
          f"probe top-1 {probe['top1']:.3f}")
