"""`gigamim finetune`: exact resume on 2 ZeRO-3 CPU ranks (real DeepSpeed launcher, real
shards of sklearn's real digits), the final export loads into timm with its classifier head
(same logits as timm's forward), and bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from gigamim.config import load_config
from gigamim.models import SimMIM, create_model
from gigamim.train import classifier, finetune
from tests.launch import free_port, run, tail


def deepspeed_cmd(nproc, *args):
    # the module itself: the `finetune` CLI verb is the lead's to add to gigamim/cli.py
    import sys

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(free_port()), "--module", "gigamim.train.finetune", *args]

BASE = ["model.name=swinv2_nano", "model.img_size=32", "model.window_size=4", "finetune.num_classes=10",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=6", "deepspeed.config=cpu",
        "log.every_steps=1", "log.tensorboard=false", "optim.warmup_steps=2", "optim.lr=5e-3",
        "checkpoint.every_steps=3", "finetune.eval_every_steps=3", "model.drop_path_rate=0.1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    from gigamim.data.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("ftdigits")
    d = load_digits()
    order = np.random.default_rng(1).permutation(len(d.target))
    out = {}
    for split, idx in (("train", order[:80]), ("val", order[80:120])):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8), mode="L")
            img.resize((36, 36), Image.BICUBIC).convert("RGB").save(folder / f"d{i}.png")
        assert make_shards([str(root / split), str(root / f"{split}_s"), "--max-count", "30"]) == 0
        out[split] = str(root / f"{split}_s" / "index.json")
    flat = root / "flat"
    flat.mkdir()
    for i in order[:8]:
        Image.fromarray((d.images[i] * 16).astype(np.uint8), mode="L").convert("RGB").save(flat / f"u{i}.png")
    assert make_shards([str(flat), str(root / "flat_s")]) == 0
    out["unlabelled"] = str(root / "flat_s" / "index.json")
    return out


def _pretrained(tmp_path, name="swinv2_nano", kw=dict(img_size=32, window_size=4)):
    torch.manual_seed(0)
    path = tmp_path / f"{name}_simmim.safetensors"
    save_file(SimMIM(create_model(name, **kw)).state_dict(), str(path),
              metadata={"gigamim_config": yaml.safe_dump({"model": {"name": name, **kw}}), "format": "simmim"})
    return path


def _sets(shards, tmp_path, run_dir, extra=()):
    items = BASE + [f"finetune.train_shards={shards['train']}", f"finetune.val_shards={shards['val']}",
                    f"finetune.weights={_pretrained(tmp_path)}",
                    f"checkpoint.dir={run_dir}/ckpt", f"log.dir={run_dir}/logs", *extra]
    return [a for s in items for a in ("--set", s)]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _assert_summary(out: str, run_dir, metrics: list[dict]) -> None:
    """The run ends with what it did and where things are (issue 24: runs ended on "saved
    checkpoint"): the first and last logged loss and the last throughput as metrics.jsonl has
    them, the last tag, the metrics file, the held-out accuracy and the classifier file."""
    text = out[out.index("gigamim finetune: done: step 6 of 6"):]
    first, last = metrics[0], metrics[-1]
    assert f"loss        {first['loss']:.4f} (step 1) -> {last['loss']:.4f} (step 6); " \
           f"{last['images_per_sec']:.1f} images/s" in text, text
    assert f"checkpoint  {run_dir}/ckpt/step_00000006 (continue: --resume auto" in text, text
    assert f"metrics     {run_dir}/logs/metrics.jsonl" in text, text
    assert f"eval        top-1 {last['top1']:.4f}, top-5 {last['top5']:.4f} on 40 held-out images" in text, text
    assert f"classifier  {run_dir}/ckpt/finetuned.safetensors (10 classes" in text, text


def test_resume_is_exact_and_export_loads_into_timm_with_head(shards, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    p = run(deepspeed_cmd(2, *_sets(shards, tmp_path, full)), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    first_out = p.stdout
    p = run(deepspeed_cmd(2, *_sets(shards, tmp_path, split, ["train.stop_at_step=3"])), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    assert not (split / "ckpt" / "finetuned.safetensors").exists()  # stopped early: no final export yet
    p = run(deepspeed_cmd(2, *_sets(shards, tmp_path, split), "--resume", "auto"), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    assert "resumed from" in p.stdout + p.stderr
    # train.stop_after (the pretrain trainer's deadline): the clock runs out during set-up, so
    # the first step boundary saves (not a checkpoint.every_steps one) and exits 0, no export
    timed = tmp_path / "timed"
    p = run(deepspeed_cmd(2, *_sets(shards, tmp_path, timed, ["train.stop_after=0.5s"])), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    assert "train.stop_after=0.5s reached; checkpoint saved at step 1" in p.stdout + p.stderr, tail(p.stdout + p.stderr)
    assert not (timed / "ckpt" / "finetuned.safetensors").exists()
    p = run(deepspeed_cmd(2, *_sets(shards, tmp_path, timed), "--resume", "auto"), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    a, b, c = _metrics(full), _metrics(split), _metrics(timed)
    _assert_summary(first_out, full, a)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [r["step"] for r in c] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] == [r["loss"] for r in c]  # bit-identical after resume
    assert [r.get("top1") for r in a] == [r.get("top1") for r in b] == [r.get("top1") for r in c]
    assert a[2]["top1"] is not None and a[5]["top5"] >= a[5]["top1"]

    # the export: timm's SwinTransformerV2 with the recorded arguments loads it strictly, head included
    from gigamim.checkpoint import safetensors_io
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    sd, md = safetensors_io.load(str(full / "ckpt" / "finetuned.safetensors"))
    kwargs = json.loads(md["timm_kwargs"])
    assert kwargs["num_classes"] == 10 and "head.fc.weight" in sd
    tm = SwinTransformerV2(**kwargs).eval()
    tm.load_state_dict(sd, strict=True)
    ours = create_model("swinv2_nano", img_size=32, window_size=4, num_classes=10).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tm(x), rtol=1e-4, atol=1e-4)


def test_pretrained_window_becomes_pretrained_window_sizes(tmp_path):
    # Pretrained at 32 px / window 4: stage maps 8, 4, 2, 1, so the windows the position bias was
    # scaled by are 4, 4, 2, 1 (a map no larger than the window is one window: the official
    # recipe's [12, 12, 12, 6] for 192 px / window 12). Fine-tuned at 64 px / window 8 (maps
    # 16, 8, 4, 2), each stage keeps its own pretraining window.
    cfg = load_config(None, ["model.img_size=64", "model.window_size=8",
                             f"finetune.weights={_pretrained(tmp_path)}", "finetune.num_classes=10"])
    model, info = classifier.build_classifier(cfg)
    assert list(info["kwargs"]["pretrained_window_sizes"]) == [4, 4, 2, 1] and info["kwargs"]["window_size"] == 8
    assert [tuple(layer.blocks[0].attn.pretrained_window_size) for layer in model.layers] == [(4, 4), (4, 4),
                                                                                            (2, 2), (1, 1)]
    assert [tuple(layer.blocks[0].attn.window_size) for layer in model.layers] == [(8, 8), (8, 8), (4, 4), (2, 2)]
    assert model.head.fc.out_features == 10 and cfg.model.name == "swinv2_nano"  # the name from the weights


@pytest.mark.parametrize("case", ["other_arch", "bad_window", "no_labels", "num_classes", "unknown_key"])
def test_bad_input_is_one_line(shards, tmp_path, capsys, case):
    sets = _sets(shards, tmp_path, tmp_path / "r")
    if case == "other_arch":
        sets += ["--set", f"finetune.weights={_pretrained(tmp_path, 'vit_nano_patch16', dict(img_size=64))}"]
        want = ("holds vit_nano_patch16 and the config sets model.name=swinv2_nano: drop model.name from the "
                "config (the weights' model is used) or pass --set model.name=vit_nano_patch16")
    elif case == "bad_window":
        sets += ["--set", "model.window_size=3"]
        want = "window_size=3"
    elif case == "no_labels":
        sets += ["--set", f"finetune.train_shards={shards['unlabelled']}"]
        want = "has no .cls member"
    elif case == "num_classes":
        sets += ["--set", "finetune.num_classes=5"]
        want = "labels go up to 9 but finetune.num_classes=5"
    else:
        sets += ["--set", "finetune.mixupp=0.5"]
        want = "unknown config key 'finetune.mixupp'; did you mean 'finetune.mixup'?"
    assert finetune.main(sets) == 2
    err = capsys.readouterr().err
    assert want in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("name,model,ld,window", [("swinv2_base", "swinv2_base", 0.75, 14),
                                                   ("swin_base", "swin_base", 0.8, 7),
                                                   ("swin_large", "swin_large", 0.7, 14),
                                                   ("vit_base", "vit_base_patch16", 0.65, None)])
def test_packaged_recipes_load_and_build(name, model, ld, window):
    """The official SimMIM fine-tune settings (issue 12 / main_finetune.py configs)."""
    cfg = load_config(f"finetune_{name}", ["finetune.weights="])
    ft = cfg.finetune
    assert cfg.model.name == model and cfg.model.img_size == 224 and cfg.model.window_size == window
    assert ft.layer_decay == ld and ft.mixup == 0.8 and ft.cutmix == 1.0 and ft.label_smoothing == 0.1
    assert cfg.optim.lr * cfg.train.global_batch_size / 512 == pytest.approx(5e-3) and cfg.train.grad_clip == 5.0
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_steps * 5 == cfg.train.max_steps
    with torch.device("meta"):
        m, _ = classifier.build_classifier(cfg)
    assert m.num_classes == 1000


def test_swin_table_and_vit_pos_embed_follow_the_new_geometry(tmp_path):
    """Swin V1 fine-tuned at another window: bias tables resized (timm's resize_rel_pos_bias_table,
    the pretrained window's values at the matching relative offsets); ViT at another image
    size: position embeddings resampled (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed

    from gigamim.train.load_encoder import build_encoder, read_weights

    path = _pretrained(tmp_path, "swin_nano", dict(img_size=64, window_size=2))
    enc, _ = build_encoder("swin_nano", str(path), dict(img_size=64, window_size=4))
    old = read_weights(str(path))[0]["layers.0.blocks.0.attn.relative_position_bias_table"]  # (3*3, heads)
    new = enc.layers[0].blocks[0].attn.relative_position_bias_table.detach()  # (7*7, heads)
    assert old.shape[0] == 9 and new.shape[0] == 49
    # the centre offset (0, 0) keeps its pretrained bias
    torch.testing.assert_close(new[24], old[4], rtol=1e-4, atol=1e-5)
    vpath = _pretrained(tmp_path, "vit_nano_patch16", dict(img_size=64))
    vit, _ = build_encoder("vit_nano_patch16", str(vpath), dict(img_size=96))
    pe = read_weights(str(vpath))[0]["pos_embed"]
    torch.testing.assert_close(vit.pos_embed.detach(), resample_abs_pos_embed(pe, new_size=(6, 6), num_prefix_tokens=1))
    assert vit(torch.zeros(1, 3, 96, 96)).shape == (1, 64)


def _in_process(shards, tmp_path, run_dir, name, kw, extra=(), zero="zero1", resume=False):
    """`gigamim finetune` in this process (a group of one), from a SimMIM file of `name`
    (resume: continue `run_dir` with `--resume auto`)."""
    items = [s for s in BASE if not s.startswith(("model.", "deepspeed."))] + [
        f"model.name={name}", *(f"model.{k}={v}" for k, v in kw.items()), f"deepspeed.config={zero}",
        f"finetune.train_shards={shards['train']}", f"finetune.val_shards={shards['val']}",
        f"finetune.weights={_pretrained(tmp_path, name, kw)}", "data.num_workers=0", "log.progress_bar=false",
        f"checkpoint.dir={run_dir}/ckpt", f"log.dir={run_dir}/logs", *extra]
    return finetune.main(["--resume", "auto"] * resume + [a for s in items for a in ("--set", s)])


@pytest.mark.parametrize("name,kw,timm_path", [
    ("vit_nano_patch16", dict(img_size=32), "timm.models.vision_transformer.VisionTransformer"),
    ("swin_nano", dict(img_size=64, window_size=4), "timm.models.swin_transformer.SwinTransformer"),
])
def test_vit_and_swin_v1_finetune_export_loads_into_timm_with_head(shards, tmp_path, name, kw, timm_path):
    """The paper's other encoders through the same verb: the export is timm's class with its
    classifier head, loaded strictly, and gives timm's logits."""
    from gigamim.checkpoint import safetensors_io

    assert _in_process(shards, tmp_path, tmp_path / "r", name, kw, ["train.max_steps=2"]) == 0
    sd, md = safetensors_io.load(str(tmp_path / "r" / "ckpt" / "finetuned.safetensors"))
    kwargs = json.loads(md["timm_kwargs"])
    assert kwargs["num_classes"] == 10 and md["timm_family"] == name.split("_")[0]
    module, cls = timm_path.rsplit(".", 1)
    tm = getattr(__import__(module, fromlist=[cls]), cls)(**kwargs).eval()
    tm.load_state_dict(sd, strict=True)
    ours = create_model(name, num_classes=10, **kw).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = tm(x)
        assert theirs.shape == (2, 10)
        torch.testing.assert_close(ours(x), theirs, rtol=1e-4, atol=1e-4)
    records = _metrics(tmp_path / "r")
    assert [r["step"] for r in records] == [1, 2] and records[-1]["top1"] is not None


def test_ema_and_bf16_resume_exactly(shards, tmp_path):
    """finetune.ema (timm ModelEmaV3, ZeRO-1) in bf16: a stop + `--resume auto` gives the same
    losses, the same raw and EMA accuracies and a bit-identical exported EMA model; without
    the EMA state in the checkpoint the resumed EMA would restart from the step-2 weights."""
    from safetensors.torch import load_file

    kw = dict(img_size=32, window_size=4)
    # no warmup and a large LR: the weights move, so an EMA restarted at the resume would differ
    extra = ["train.precision=bf16", "finetune.ema=true", "finetune.ema_decay=0.5", "train.max_steps=4",
             "checkpoint.every_steps=2", "finetune.eval_every_steps=2", "optim.warmup_steps=0", "optim.lr=2e-2"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert _in_process(shards, tmp_path, full, "swinv2_nano", kw, extra) == 0
    assert _in_process(shards, tmp_path, split, "swinv2_nano", kw, extra + ["train.stop_at_step=2"]) == 0
    assert finetune.main(["--resume", "auto"] + [a for s in [
        s for s in BASE if not s.startswith(("model.", "deepspeed."))] + [
        "model.name=swinv2_nano", "model.img_size=32", "model.window_size=4", "deepspeed.config=zero1",
        f"finetune.train_shards={shards['train']}", f"finetune.val_shards={shards['val']}",
        f"finetune.weights={_pretrained(tmp_path)}", "data.num_workers=0", "log.progress_bar=false",
        f"checkpoint.dir={split}/ckpt", f"log.dir={split}/logs", *extra] for a in ("--set", s)]) == 0
    a, b = _metrics(full), _metrics(split)
    keys = ("step", "loss", "top1", "top5", "ema_top1", "ema_top5")
    assert [tuple(r.get(k) for k in keys) for r in a] == [tuple(r.get(k) for k in keys) for r in b]
    assert a[1]["ema_top1"] is not None and a[3]["ema_top1"] is not None
    ea, eb = (load_file(str(d / "ckpt" / "finetuned.safetensors")) for d in (full, split))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_a_tag_of_the_other_task_is_refused_before_any_weight_is_read(tmp_path):
    """Tags record their task; tags written before 0.2 (no task key) are pretraining's."""
    from pathlib import Path

    from gigamim.checkpoint.layout import CheckpointError
    from gigamim.train.resume import check_compatible

    cfg = load_config(None, ["model.name=swinv2_nano", "finetune.num_classes=1000"])
    tag = Path("ck/step_00000003")
    check_compatible({"model": "swinv2_nano"}, cfg, tag)  # an old pretraining tag resumes pretraining
    check_compatible({"model": "swinv2_nano", "task": "finetune"}, cfg, tag, task="finetune")
    with pytest.raises(CheckpointError, match="is a pretrain checkpoint and this is `gigamim finetune`"):
        check_compatible({"model": "swinv2_nano"}, cfg, tag, task="finetune")
    with pytest.raises(CheckpointError, match="is a finetune checkpoint and this is `gigamim pretrain`"):
        check_compatible({"model": "swinv2_nano", "task": "finetune"}, cfg, tag)
    with pytest.raises(CheckpointError, match="has a 7-class head and this run has finetune.num_classes=1000"):
        check_compatible({"model": "swinv2_nano", "task": "finetune", "num_classes": 7}, cfg, tag, task="finetune")



def test_zero3_reads_the_weights_into_the_partitioned_model(shards, tmp_path):
    """Under ZeRO-3 the classifier is built partitioned (zero.Init) and the checked weights are
    read into it one parameter at a time; under ZeRO-1 it is built whole and loaded by
    load_state_dict. After one step of LR 1e-12 the exported encoder of both must still be
    the pretrained file's (written here by safetensors, the reference); a random-init run
    shows the comparison can tell."""
    from safetensors.torch import load_file

    kw = dict(img_size=32, window_size=4)
    extra = ["train.max_steps=1", "optim.lr=1e-12", "optim.warmup_lr=0", "optim.min_lr=0", "finetune.mixup=0",
             "finetune.cutmix=0"]
    from tests.helpers.randomize import randomize_weights

    # weights no initialisation gives (a random init with the run's seed must not match them)
    path = tmp_path / "distinct.safetensors"
    save_file(randomize_weights(SimMIM(create_model("swinv2_nano", **kw)), seed=7).state_dict(), str(path),
              metadata={"gigamim_config": yaml.safe_dump({"model": {"name": "swinv2_nano", **kw}}),
                        "format": "simmim"})
    pretrained = {k[len("encoder."):]: v for k, v in load_file(str(path)).items()
                  if k.startswith("encoder.") and k != "encoder.mask_token"}

    def exported(run, *more, zero):
        assert _in_process(shards, tmp_path, tmp_path / run, "swinv2_nano", kw,
                           extra + [f"finetune.weights={path}", *more], zero=zero) == 0
        return load_file(str(tmp_path / run / "ckpt" / "finetuned.safetensors"))

    for zero in ("zero1", "cpu"):  # cpu: the ZeRO-3 template
        got = exported(zero, zero=zero)
        assert set(pretrained) <= set(got) and {"head.fc.weight", "head.fc.bias"} <= set(got)
        for k, v in pretrained.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-8, msg=f"{zero}: {k}")
    rand = exported("rand", "finetune.weights=", zero="cpu")
    assert not torch.allclose(rand["layers.0.blocks.0.attn.qkv.weight"], pretrained["layers.0.blocks.0.attn.qkv.weight"])


def test_zero3_swin_v1_at_a_new_window_reads_the_resized_tables(shards, tmp_path):
    """The SimMIM Swin recipe fine-tunes at another window (6 -> 7): under ZeRO-3 the weights
    are checked on the meta device and the bias tables resized on the host, then read into
    the partitioned model. Reference: timm's resize_rel_pos_bias_table of the file's table."""
    from safetensors.torch import load_file
    from timm.layers import resize_rel_pos_bias_table

    path = _pretrained(tmp_path, "swin_nano", dict(img_size=64, window_size=2))
    items = [s for s in BASE if not s.startswith(("model.", "deepspeed."))] + [
        "model.name=swin_nano", "model.img_size=64", "model.window_size=4", "deepspeed.config=cpu",
        f"finetune.train_shards={shards['train']}", f"finetune.val_shards={shards['val']}",
        f"finetune.weights={path}", "data.num_workers=0", "log.progress_bar=false", "train.max_steps=1",
        "optim.lr=1e-12", "optim.warmup_lr=0", "optim.min_lr=0", "finetune.mixup=0", "finetune.cutmix=0",
        f"checkpoint.dir={tmp_path}/r/ckpt", f"log.dir={tmp_path}/r/logs"]
    assert finetune.main([a for s in items for a in ("--set", s)]) == 0
    got = load_file(str(tmp_path / "r" / "ckpt" / "finetuned.safetensors"))
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    old = load_file(str(path))[f"encoder.{key}"]  # (3*3, heads)
    want = resize_rel_pos_bias_table(old, new_window_size=(4, 4), new_bias_shape=(49, old.shape[1]),
                                     old_window_size=(2, 2))
    torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_reads_the_weights_into_the_sharded_model(shards, tmp_path):
    """train.engine=fsdp2 on 2 ranks: the classifier is built on the meta device and sharded,
    the checked weights reach every rank's shards from rank 0 (`Engine.load_weights`), and the
    export gathers them back (`Engine.full_state_dict`): after one step of LR 1e-12 the exported
    encoder is the pretrained file's (written here by safetensors, the reference)."""
    from safetensors.torch import load_file

    from tests.helpers.faults import launch_cmd
    from tests.helpers.randomize import randomize_weights

    kw = dict(img_size=32, window_size=4)
    path = tmp_path / "distinct.safetensors"
    save_file(randomize_weights(SimMIM(create_model("swinv2_nano", **kw)), seed=7).state_dict(), str(path),
              metadata={"gigamim_config": yaml.safe_dump({"model": {"name": "swinv2_nano", **kw}}),
                        "format": "simmim"})
    pretrained = {k[len("encoder."):]: v for k, v in load_file(str(path)).items()
                  if k.startswith("encoder.") and k != "encoder.mask_token"}
    items = [s for s in BASE if not s.startswith("deepspeed.")] + [
        "train.engine=fsdp2", f"finetune.train_shards={shards['train']}", f"finetune.val_shards={shards['val']}",
        f"finetune.weights={path}", "data.num_workers=0", "log.progress_bar=false", "train.max_steps=1",
        "optim.lr=1e-12", "optim.warmup_lr=0", "optim.min_lr=0", "finetune.mixup=0", "finetune.cutmix=0",
        f"checkpoint.dir={tmp_path}/r/ckpt", f"log.dir={tmp_path}/r/logs"]
    p = run(launch_cmd(2, "finetune", *[a for s in items for a in ("--set", s)]), timeout=600)
    assert p.returncode == 0, tail(p.stdout + p.stderr)
    got = load_file(str(tmp_path / "r" / "ckpt" / "finetuned.safetensors"))
    assert set(pretrained) <= set(got) and {"head.fc.weight", "head.fc.bias"} <= set(got)
    for k, v in pretrained.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-8, msg=k)
    assert _metrics(tmp_path / "r")[-1]["top1"] is not None


def test_official_augmentation_trains_and_resumes_exactly(shards, tmp_path):
    """The official loaders' augmentation on (timm RandAugment rand-m9-mstd0.5-inc1; random
    erasing with p 1 and up to 2 boxes so every image is erased) in a real run whose transforms
    run in a DataLoader worker: a stop at step 2 + `--resume auto` gives bit-identical losses and
    accuracies (the worker's global RNGs are not in the checkpoint: only per-sample seeds make
    this hold), and the same run without augmentation gives other losses (it reached the model)."""
    kw = dict(img_size=32, window_size=4)
    common = ["train.max_steps=4", "checkpoint.every_steps=2", "finetune.eval_every_steps=2", "data.num_workers=1",
              "finetune.mixup=0", "finetune.cutmix=0"]   # Mixup off: the losses then show the images alone
    aug = common + ["finetune.auto_augment=rand-m9-mstd0.5-inc1", "finetune.reprob=1.0", "finetune.remode=pixel",
                    "finetune.recount=2"]
    full, split, plain = tmp_path / "full", tmp_path / "split", tmp_path / "plain"
    assert _in_process(shards, tmp_path, full, "swinv2_nano", kw, aug) == 0
    assert _in_process(shards, tmp_path, split, "swinv2_nano", kw, aug + ["train.stop_at_step=2"]) == 0
    assert _in_process(shards, tmp_path, split, "swinv2_nano", kw, aug, resume=True) == 0
    assert _in_process(shards, tmp_path, plain, "swinv2_nano", kw,
                       common + ["finetune.auto_augment=", "finetune.reprob=0"]) == 0
    a, b, c = _metrics(full), _metrics(split), _metrics(plain)
    keys = ("step", "loss", "top1", "top5")
    assert [tuple(r.get(k) for k in keys) for r in a] == [tuple(r.get(k) for k in keys) for r in b]
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a[3]["top1"] is not None
    assert a[0]["loss"] != c[0]["loss"]
