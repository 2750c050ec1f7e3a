"""Every command line, flag and config key that gigamim's messages tell the user to type exists
(issue 24: "pass the --model the weights were trained as" named a flag `gigamim finetune` does
not have). The messages come from the real code paths (errors and closing summaries, triggered
here on small inputs); what they suggest is run through the real parsers: a `gigamim VERB ...`
line through that verb's argparse parser (`gigamim.cli.parser_for`), a bare `--flag value`
through the parser of the verb that printed it, a `key=value` through the config loader.
Placeholders in capitals (N, NAME, OUT, CONFIG, ...) stand for a value of the right kind."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from gigamim import cli
from gigamim.config import ConfigError, load_config
from tests.helpers.suggestions import Refused, check_message


# ----------------------------------------------------------------------------- the checker itself


def test_the_checker_refuses_what_does_not_parse():
    # the message of issue 24 and its kind: each must fail the check
    with pytest.raises(AssertionError, match="has no --model"):
        check_message("finetune", "... pass the --model the weights were trained as")
    with pytest.raises(Refused, match="unrecognized arguments: --model"):
        check_message("finetune", "run `gigamim finetune --config demo --model swinv2_nano`")
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint.load_universal'"):
        check_message("consolidate", "resume with DeepSpeed config checkpoint.load_universal=true")
    with pytest.raises(ValueError):
        check_message("plan", "pass --efficiency 50%")
    assert check_message("probe", "pass --model swin_nano") == ["--model swin_nano"]


# ----------------------------------------------------------------------------- the messages


def _weights(path: Path, name: str, **kw) -> Path:
    from gigamim.models import SimMIM, create_model

    torch.manual_seed(0)
    save_file(SimMIM(create_model(name, **kw)).state_dict(), str(path),
              metadata={"gigamim_config": yaml.safe_dump({"model": {"name": name, **kw}})})
    return path


@pytest.fixture(scope="module")
def flat_shards(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from gigamim.data.make_shards import make_shards

    root = tmp_path_factory.mktemp("sugg")
    (root / "img").mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
    make_shards(str(root / "img"), str(root / "flat"), progress=False)
    return root


def test_finetune_messages(tmp_path, flat_shards, capsys):
    from gigamim.train import finetune
    from gigamim.train.classifier import FinetuneError, classes_from_shards, configure_from_weights

    nano = _weights(tmp_path / "nano.safetensors", "swinv2_nano", img_size=32, window_size=4)
    msgs = []
    # the recipe's model.name against the weights' model (issue 24's case): one line, on stderr
    assert finetune.main(["--config", "finetune_swinv2_base", "--set", f"finetune.weights={nano}"]) == 2
    msgs.append(capsys.readouterr().err)
    cfg = load_config(None, [f"finetune.weights={nano}", "model.img_size=64", "model.window_size=8",
                             "model.pretrained_window_sizes=[8,8,8,8]"])
    with pytest.raises(FinetuneError) as e:
        configure_from_weights(cfg)
    msgs.append(str(e.value))
    cfg = load_config(None, [f"finetune.train_shards={flat_shards / 'flat' / 'index.json'}"])
    with pytest.raises(FinetuneError) as e:
        classes_from_shards(cfg)
    msgs.append(str(e.value))
    checked = [c for m in msgs for c in check_message("finetune", m)]
    assert "--set model.name=swinv2_nano" in checked and "--set finetune.num_classes=N" in checked
    assert any(c.startswith("--set model.pretrained_window_sizes=[4,4,2,1]") for c in checked), checked


def test_probe_and_encoder_messages(tmp_path):
    from gigamim.train.load_encoder import EncoderLoadError, build_encoder

    swin = _weights(tmp_path / "swin.safetensors", "swin_nano", img_size=64, window_size=4)
    msgs = []
    for name, weights in (("swinv2_nano", str(swin)), (None, None)):
        with pytest.raises(EncoderLoadError) as e:
            build_encoder(name, weights)
        msgs.append(str(e.value))
    # the same error as fine-tuning says it (its model flag is --set model.name=)
    with pytest.raises(EncoderLoadError) as e:
        build_encoder("swinv2_nano", str(swin), name_hint="--set model.name={name}")
    checked = [c for m in msgs for c in check_message("probe", m)] + check_message("finetune", str(e.value))
    assert "--model swin_nano" in checked and "--set model.name=swin_nano" in checked


def test_resume_checks_suggest_working_commands():
    from gigamim.checkpoint.layout import CheckpointError
    from gigamim.train.resume import check_compatible

    cfg = load_config(None, ["model.name=swinv2_nano", "finetune.num_classes=10"])
    tag = Path("ck/step_00000003")
    metas = [({"model": "swinv2_nano", "engine": "fsdp2"}, "pretrain"),
             ({"model": "swinv2_tiny"}, "pretrain"),
             ({"model": "swinv2_nano", "task": "finetune", "num_classes": 7}, "finetune"),
             ({"model": "swinv2_nano", "task": "finetune"}, "pretrain")]
    checked = []
    for meta, task in metas:
        with pytest.raises(CheckpointError) as e:
            check_compatible(meta, cfg, tag, task=task)
        checked += check_message(task, str(e.value))
    assert {"--set train.engine=fsdp2", "--set model.name=swinv2_tiny", "--set finetune.num_classes=7"} <= set(checked)


def test_consolidate_and_trainer_summaries_suggest_working_commands(tmp_path):
    from gigamim.checkpoint.check import CheckpointInfo
    from gigamim.checkpoint.consolidate import closing_lines, universal_lines
    from gigamim.train.tasks import PretrainTask
    from gigamim.train.trainer import Trainer

    info = CheckpointInfo(root="runs/x/checkpoints", tag="step_00000060", tag_dir="runs/x/checkpoints/step_00000060",
                          zero_stage=3, world_size=2, meta={"step": 60, "model": "swinv2_nano"})
    text = "\n".join(closing_lines(info, ["weights/model.safetensors"], "weights/")
                     + universal_lines("runs/x/checkpoints/step_00000060_universal"))
    assert "step_00000060 of runs/x/checkpoints (step 60, swinv2_nano, ZeRO-3 from 2 rank(s))" in text
    checked = check_message("consolidate", text)
    assert any(c.startswith("gigamim export weights/ timm.safetensors --format timm") for c in checked), checked
    assert any(c.startswith("gigamim pretrain --config CONFIG --resume") for c in checked), checked

    cfg = load_config("simmim_swinv2_nano")
    trainer = Trainer(cfg, PretrainTask(cfg))
    trainer.started, trainer.world, trainer.precision = 0.0, 1, "fp32"
    trainer.state = type("S", (), {"step": 60})()
    trainer.records = [{"step": 5, "loss": 0.9, "images_per_sec": 3.0, "mfu": None},
                       {"step": 60, "loss": 0.5, "images_per_sec": 4.0, "mfu": 0.01}]
    trainer.last_tag = Path(cfg.checkpoint.dir) / "step_00000060"
    text = "\n".join(trainer.summary())
    assert "0.9000 (step 5) -> 0.5000 (step 60)" in text and "metrics.jsonl" in text
    checked = check_message("pretrain", text)
    assert "--resume auto" in checked and any(c.startswith("gigamim consolidate") for c in checked), checked


def test_plan_doctor_make_shards_export_messages(tmp_path, flat_shards, capsys):
    from gigamim.checkpoint import export
    from gigamim.data.make_shards import main as make_shards
    from gigamim.launch.doctor import launch_suggestion
    from gigamim.models.timm_compat import TimmCompatError, check_timm_keys, swinv2_arch, timm_kwargs
    from gigamim.tools import plan

    assert plan.main(["--model", "swinv2_nano", "--gpus", "8", "--gpus-per-node", "16"]) == 2
    checked = check_message("plan", capsys.readouterr().err)
    assert "--gpus-per-node 8" in checked
    assert plan.main(["--model", "swinv2_giant", "--gpus", "64", "--gpus-per-node", "8", "--gpu-mem", "80",
                      "--global-batch", "9216"]) == 0
    checked = check_message("plan", capsys.readouterr().out)
    assert {"--efficiency 0.50", "--overlap 0.80", "--margin 0.10"} <= set(checked), checked

    checked = check_message("doctor", launch_suggestion({"devices": ["no CUDA device; CPU: 2 logical cores"]}))
    assert checked == ["gigamim launch --nproc-per-node 2 doctor"]

    src = flat_shards / "img"
    assert make_shards([str(src), str(flat_shards / "flat"), "--no-progress"]) == 2  # exists
    checked = check_message("make-shards", capsys.readouterr().err)
    assert checked == ["--overwrite"]

    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    nano = _weights(tmp_path / "nano.safetensors", "swinv2_nano", img_size=64, window_size=4)
    assert export.main([str(nano), str(out)]) == 2
    checked = check_message("export", capsys.readouterr().err)
    assert checked == ["--force"]
    with torch.device("meta"):
        from gigamim.models import create_model

        enc = create_model("swinv2_huge").state_dict()
    with pytest.raises(TimmCompatError) as e:
        check_timm_keys(enc, timm_kwargs(swinv2_arch(enc), {"img_size": 192, "window_size": 12}))
    assert "--format encoder" in check_message("export", str(e.value))


def test_every_flag_in_gigamims_messages_exists_somewhere():
    """Static sweep: a `--flag` written in any string in gigamim/ is a flag of one of gigamim's
    parsers, or of an outside launcher the text names (deepspeed, torchrun, docker)."""
    outside = {"--num_gpus", "--module", "--hostfile", "--no_local_rank", "--no_ssh", "--node_rank",
               "--master_port", "--master_addr", "--num_nodes", "--launcher", "--nproc_per_node", "--init",
               "--local_rank", "--count", "--first"}  # deepspeed / torchrun / docker / scontrol
    ours = {"--version"}  # `gigamim --version` (cli.main's own)
    for verb in cli.VERBS:
        ours |= set(cli.parser_for(verb)._option_string_actions)
    missing = {}
    for path in Path(cli.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", node.value):
                    if flag not in ours and flag not in outside:
                        missing.setdefault(flag, str(path))
    assert not missing, missing
