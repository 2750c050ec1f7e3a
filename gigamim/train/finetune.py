"""`gigamim finetune`: classification fine-tuning of a (SimMIM-)pretrained encoder on DeepSpeed.

    gigamim finetune --config finetune_swinv2_base.yaml [--set key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus N --module gigamim finetune --config ...

The run config is the pretraining one (model / train / optim / checkpoint / log / deepspeed
sections, `gigamim.config`) plus a `finetune:` section (FinetuneSection below: weights,
num_classes, labelled train/val shards, layer-wise LR decay, Mixup/CutMix, label smoothing,
EMA, evaluation period). Built on the same pieces as `gigamim pretrain`: the DeepSpeed config
from the template + gigamim config (`train.deepspeed_init`), warmup + cosine LR (`train.optim`)
with a per-group layer-decay scale, `checkpoint.layout` saves/resume (`--resume auto`),
`metrics.jsonl` (step, loss, lr, grad_norm, images_per_sec, data_skipped, + top1/top5 when
evaluated). Exact resume: every random draw of step s (batch order, crops, flips, Mixup,
drop path) is seeded from (seed, s, rank), and DeepSpeed restores the optimizer and LR state.

SwinV2 fine-tuned at a larger window than pretraining: `model.window_size` is the new window;
`model.pretrained_window_sizes` defaults to the window the weights were trained with (their
recorded config), which scales the CPB coordinates as in the official recipe. Swin V1 tables
and ViT position embeddings are interpolated (timm). At the end rank 0 writes
`<checkpoint.dir>/finetuned.safetensors` (encoder + head, timm keys, metadata with the timm
class arguments) that timm loads strictly with its classifier head.

Data: labelled shards read into memory by `train.labelled` (a stop-gap until the data
package's classification loader lands): fine for the benchmark/test sizes, not for ImageNet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class FinetuneSection:
    weights: str = ""  # consolidated SimMIM / exported encoder / DeepSpeed checkpoint; "" = from scratch
    num_classes: int = 1000
    train_shards: str = ""
    val_shards: str = ""
    eval_every_steps: int = 0  # 0: only at the end
    layer_decay: float = 0.75  # 1.0 = off; official: SwinV2-B 0.75, Swin-B 0.8, Swin-L 0.7, ViT-B 0.65
    mixup: float = 0.8  # Mixup alpha (0 off)
    cutmix: float = 1.0  # CutMix alpha (0 off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    ema: bool = False
    ema_decay: float = 0.9999
    crop_scale: list = dataclasses.field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    hflip: bool = True


class FinetuneError(ValueError):
    """Bad input for fine-tuning; one line, exit 2."""


# ----------------------------------------------------------------------------- config


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append(f"{key}={json.dumps(v) if isinstance(v, (list, str)) else v}")
    return out


def load_finetune_config(path: str | None, sets: list[str]):
    """(gigamim Config, FinetuneSection) from a YAML with a `finetune:` section and --set
    overrides (`finetune.*` keys go to the section, the rest to gigamim.config)."""
    from gigamim.config import ConfigError, load_config, resolve_config_path

    tree: dict = {}
    if path:
        try:
            p = resolve_config_path(path)
        except (ConfigError, FileNotFoundError) as e:
            raise FinetuneError(str(e)) from None
        tree = yaml.safe_load(Path(p).read_text()) or {}
    ft_tree = dict(tree.pop("finetune", None) or {})
    rest = []
    for item in sets:
        key, _, value = item.partition("=")
        if key.startswith("finetune."):
            ft_tree[key[len("finetune."):]] = yaml.safe_load(value)
        else:
            rest.append(item)
    names = {f.name for f in dataclasses.fields(FinetuneSection)}
    unknown = sorted(set(ft_tree) - names)
    if unknown:
        raise FinetuneError(f"unknown finetune key(s) {unknown}; valid: {sorted(names)}")
    ft = FinetuneSection(**ft_tree)
    try:
        cfg = load_config(None, _flatten(tree) + rest)
    except ConfigError as e:
        raise FinetuneError(str(e)) from None
    return cfg, ft


def dump(cfg, ft: FinetuneSection) -> str:
    tree = yaml.safe_load(cfg.dump())
    tree["finetune"] = dataclasses.asdict(ft)
    return yaml.safe_dump(tree, sort_keys=False)


# ----------------------------------------------------------------------------- pieces


def build_classifier(cfg, ft: FinetuneSection):
    """(encoder with a num_classes head, info). The pretrained window becomes
    pretrained_window_sizes for a SwinV2 fine-tuned at another window."""
    from gigamim.train.load_encoder import EncoderLoadError, build_encoder, read_weights, run_model_config

    m = cfg.model
    overrides: dict[str, Any] = {"img_size": m.img_size, "drop_path_rate": m.drop_path_rate}
    if m.window_size is not None:
        overrides["window_size"] = m.window_size
    if m.pretrained_window_sizes is not None:
        overrides["pretrained_window_sizes"] = list(m.pretrained_window_sizes)
    elif ft.weights and m.name.startswith("swinv2"):
        try:
            run = run_model_config(read_weights(ft.weights)[1])
        except EncoderLoadError:
            run = {}
        if run.get("window_size") and m.window_size and int(run["window_size"]) != int(m.window_size):
            overrides["pretrained_window_sizes"] = int(run["window_size"])
    try:
        return build_encoder(m.name, ft.weights or None, overrides, num_classes=ft.num_classes)
    except EncoderLoadError as e:
        raise FinetuneError(str(e)) from None


def derive_seed(*parts: int) -> int:
    from gigamim.data.seeding import derive_seed as _d

    return _d(*parts) % (2**31)


def train_batch(images, labels, step: int, micro: int, accum: int, rank: int, world: int, micro_bs: int,
                seed: int, ft: FinetuneSection, img_size: int):
    """Micro-batch `micro` of optimizer step `step` on `rank`: a pure function of its arguments
    (epoch permutations of the whole set, then this rank's slice), so resume is exact."""
    import torch
    from torchvision.transforms import v2

    n = len(labels)
    flat = ((step * accum + micro) * world + rank) * micro_bs  # position in the sample stream
    idx = []
    for j in range(micro_bs):
        pos = flat + j
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 17)))
        idx.append(int(perm[off]))
    x = images[idx]
    y = labels[idx]
    g = torch.Generator().manual_seed(derive_seed(seed, step, micro, rank, 23))
    out = []
    for i in range(len(idx)):
        top, left, h, w = _rrc_params(x.shape[-2], x.shape[-1], ft.crop_scale, g)
        im = v2.functional.resized_crop(x[i], top, left, h, w, [img_size, img_size], antialias=True)
        if ft.hflip and torch.rand((), generator=g).item() < 0.5:
            im = im.flip(-1)
        out.append(im)
    return torch.stack(out), y


def _rrc_params(height: int, width: int, scale, g):
    import torch

    area = height * width
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=g).item()
        ar = math.exp(log_r)
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    return 0, 0, height, width


# ----------------------------------------------------------------------------- the run


def run(cfg, ft: FinetuneSection, resume: str | None) -> int:
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from gigamim import __version__
    from gigamim.checkpoint import layout as ckpt
    from gigamim.checkpoint.save import save as save_checkpoint
    from gigamim.data.transforms import normalize_on_device
    from gigamim.launch.dist import init_distributed
    from gigamim.models.param_groups import layer_decay, param_groups
    from gigamim.train.deepspeed_init import build_ds_config, resolve_precision, zero_stage
    from gigamim.train.labelled import LabelError, load_labelled
    from gigamim.train.metrics import MetricsLogger
    from gigamim.train.optim import lr_at, peak_lr

    if not ft.train_shards:
        raise FinetuneError("finetune.train_shards is empty: give labelled shards (make-shards of an ImageFolder)")
    if ft.num_classes < 2:
        raise FinetuneError(f"finetune.num_classes must be >= 2, got {ft.num_classes}")
    if cfg.model.window_size is None:
        from gigamim.models.registry import model_defaults

        cfg.model.window_size = model_defaults(cfg.model.name).get("window_size")
    try:
        train_x, train_y = load_labelled(ft.train_shards, _load_size(cfg.model.img_size))
        val = load_labelled(ft.val_shards, cfg.model.img_size) if ft.val_shards else None
    except LabelError as e:
        raise FinetuneError(str(e)) from None
    top = int(max(train_y.max(), val[1].max() if val else 0))
    if top >= ft.num_classes:
        raise FinetuneError(f"labels go up to {top} but finetune.num_classes={ft.num_classes}: set num_classes to "
                            f"at least {top + 1}")

    torch.manual_seed(cfg.train.seed)  # the same head init on every rank
    model, info = build_classifier(cfg, ft)
    # Bad input is refused above, before any process group exists.
    d = init_distributed()
    rank, world = d.rank, d.world_size
    device = d.device
    on_gpu = device.type == "cuda"
    precision = resolve_precision(cfg, on_gpu)
    from gigamim.config import gradient_accumulation_steps

    accum = gradient_accumulation_steps(cfg, world)
    micro_bs = cfg.train.micro_batch_size
    resume_from = None
    if resume:  # THE resolver: "auto" = the newest complete tag of checkpoint.dir, or start fresh
        target = cfg.checkpoint.dir if resume == "auto" else resume
        found = ckpt.resolve(target, missing_ok=resume == "auto")
        resume_from = (found.root, found.tag) if found is not None else None
    ds_config = build_ds_config(cfg, world, on_gpu, peak_lr=peak_lr(cfg))
    stage = zero_stage(ds_config)
    if ft.ema and stage == 3:
        raise FinetuneError("finetune.ema needs whole parameters on each rank: use ZeRO stage 0-2 with EMA")
    groups = param_groups(model, cfg.optim.weight_decay, layer_decay(ft.layer_decay) if ft.layer_decay != 1 else None)
    peak = peak_lr(cfg)
    for g in groups:
        g["lr"] = peak * g["lr_scale"]  # the schedule below multiplies each group's own peak

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / peak)

    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                                   lr_scheduler=schedule, dist_init_required=False)
    ema = None
    if ft.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(engine.module, decay=ft.ema_decay)
    start = 0
    if resume_from:
        path, client = engine.load_checkpoint(str(resume_from[0]), tag=resume_from[1])
        if path is None:
            raise FinetuneError(f"DeepSpeed could not load {resume_from[0] / resume_from[1]}")
        state = (client or {}).get("gigamim_finetune", {})
        start = int(state.get("step", 0))
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if rank == 0:
            print(f"gigamim finetune: resumed from {resume_from[0] / resume_from[1]} at step {start}", flush=True)

    mixup = None
    if ft.mixup > 0 or ft.cutmix > 0:
        mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mixup_prob,
                      switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing,
                      num_classes=ft.num_classes)
        criterion = SoftTargetCrossEntropy()
    elif ft.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=ft.label_smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    logger = MetricsLogger(cfg.log.dir, cfg.log.tensorboard, after_step=start) if rank == 0 else None
    stop = cfg.train.stop_at_step or cfg.train.max_steps
    config_yaml = dump(cfg, ft)
    t_last, steps_since = time.time(), 0

    def evaluate(step: int) -> dict:
        if val is None:
            return {}
        module = ema.module if ema is not None else engine.module
        module.eval()
        correct1 = correct5 = count = 0
        with torch.no_grad():
            xs, ys = val[0][rank::world], val[1][rank::world]
            # the same number of forwards on every rank (ZeRO-3 gathers are collective)
            n_batches = math.ceil(math.ceil(len(val[1]) / world) / micro_bs)
            for b in range(n_batches):
                xb, yb = xs[b * micro_bs:(b + 1) * micro_bs], ys[b * micro_bs:(b + 1) * micro_bs]
                if len(yb) == 0:
                    xb, yb = xs[:1], ys[:0]
                logits = module(normalize_on_device(xb, device, dtype)).float()[: len(yb)]
                k = min(5, logits.shape[1])
                hit = logits.topk(k, 1).indices.cpu() == yb[:, None]
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(1).sum())
                count += len(yb)
        module.train()
        t = torch.tensor([correct1, correct5, count], dtype=torch.float64)
        dist.all_reduce(t)
        return {"top1": t[0].item() / max(1, t[2].item()), "top5": t[1].item() / max(1, t[2].item()),
                "eval_images": int(t[2].item())}

    def save(step: int):
        client = {"gigamim_finetune": {"step": step, **({"ema": ema.state_dict()} if ema is not None else {})}}
        meta = {"step": step, "model": cfg.model.name, "img_size": cfg.model.img_size, "world_size": world,
                "zero_stage": stage, "precision": precision, "version": __version__, "task": "finetune"}
        save_checkpoint(engine, cfg.checkpoint.dir, step, client, meta, config_yaml, cfg.checkpoint.keep_last)

    engine.train()
    for step in range(start, stop):
        losses = []
        for micro in range(accum):
            torch.manual_seed(derive_seed(cfg.train.seed, step, micro, rank, 5))  # drop path
            np.random.seed(derive_seed(cfg.train.seed, step, micro, rank, 7))  # timm Mixup draws from numpy
            xb, yb = train_batch(train_x, train_y, step, micro, accum, rank, world, micro_bs, cfg.train.seed, ft,
                                 cfg.model.img_size)
            x = normalize_on_device(xb, device, dtype)
            y = yb.to(device)
            if mixup is not None:
                x, y = mixup(x, y)
            loss = criterion(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if ema is not None:
            ema.update(engine.module, step=step)
        steps_since += 1
        done = step + 1
        record = None
        if rank == 0 and (done % max(1, cfg.log.every_steps) == 0 or done == stop):
            now = time.time()
            gn = engine.get_global_grad_norm()
            record = {"step": done, "loss": float(np.mean(losses)), "lr": lr_at(step, cfg),  # x layer scale per group
                      "grad_norm": float(gn) if gn is not None else None,
                      "images_per_sec": steps_since * cfg.train.global_batch_size / max(1e-9, now - t_last),
                      "data_skipped": 0}
            t_last, steps_since = now, 0
        if (ft.eval_every_steps and done % ft.eval_every_steps == 0) or done == stop:
            ev = evaluate(done)
            if rank == 0 and ev:
                record = dict(record or {"step": done}, **ev)
                print(f"gigamim finetune: step {done} top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f}", flush=True)
        if record is not None and logger is not None:
            logger.log(record)
        if (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == stop:
            save(done)
    if stop == cfg.train.max_steps:
        export_finetuned(engine.module if ema is None else ema.module, cfg, ft, info, stop, rank)
    if logger is not None:
        logger.close()
    return 0


def _load_size(img_size: int) -> int:
    return int(round(img_size / 0.875))  # train crops come from a slightly larger resize


def export_finetuned(module, cfg, ft: FinetuneSection, info: dict, step: int, rank: int) -> None:
    """Rank 0 writes encoder + head as timm-keyed safetensors (collective gather under ZeRO-3)."""
    import deepspeed
    import torch

    from gigamim import __version__
    from gigamim.checkpoint import safetensors_io
    from gigamim.models.timm_compat import read_arch, timm_kwargs

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        sd = {k: v.detach().float().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    if rank != 0:
        return
    geo = {"img_size": cfg.model.img_size, "window_size": cfg.model.window_size}
    if getattr(module, "family", "swinv2") == "vit":
        geo["num_heads"] = module.num_heads
    arch = read_arch(sd, geo)
    kw = timm_kwargs(arch, geo, num_classes=ft.num_classes)
    pws = info["kwargs"].get("pretrained_window_sizes")
    if arch["family"] == "swinv2" and pws is not None:
        kw["pretrained_window_sizes"] = list(pws) if isinstance(pws, (list, tuple)) else [int(pws)] * len(arch["depths"])
    out = Path(cfg.checkpoint.dir) / "finetuned.safetensors"
    metadata = {"format": "finetuned", "step": str(step), "gigamim_version": __version__,
                "gigamim_config": dump(cfg, ft), "timm_family": arch["family"], "timm_kwargs": json.dumps(kw),
                "num_classes": str(ft.num_classes)}
    safetensors_io.save(str(out), sd, metadata, max_shard_size=None, dtype=torch.float32, overwrite=True)
    print(f"gigamim finetune: wrote {out} (timm {arch['family']} kwargs {kw})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gigamim finetune", description="Fine-tune an encoder for classification "
                                "under DeepSpeed (layer decay, Mixup/CutMix, EMA, evaluation, exact resume).")
    p.add_argument("--config", help="YAML (a packaged name like finetune_swinv2_base or a path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in checkpoint.dir) or a checkpoint path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg, ft = load_finetune_config(args.config, args.set)
        return run(cfg, ft, args.resume)
    except FinetuneError as e:
        print(f"gigamim finetune: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - config/checkpoint errors from shared code: one line
        from gigamim.checkpoint.layout import CheckpointError
        from gigamim.config import ConfigError

        if isinstance(e, (CheckpointError, ConfigError)):
            print(f"gigamim finetune: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
