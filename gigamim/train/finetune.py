"""`gigamim finetune`: classification fine-tuning of a (SimMIM-)pretrained encoder on DeepSpeed.

    gigamim finetune --config finetune_swinv2_base.yaml [--set key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus N --module gigamim finetune --config ...

The run config is the pretraining one (model / train / optim / checkpoint / log / deepspeed
sections, `gigamim.config`) plus its `finetune:` section (`config.FinetuneConfig`: weights,
num_classes, labelled train/val shards, layer-wise LR decay, Mixup/CutMix, label smoothing,
EMA, evaluation period). Built on the same pieces as `gigamim pretrain`: the DeepSpeed config
from the template + gigamim config (`train.deepspeed_init`), warmup + cosine LR (`train.optim`)
with a per-group layer-decay scale, `checkpoint.save`; from `gigamim pretrain` also the
resume resolver and checks (`train.main.resolve_resume` / `check_compatible`), the run lock of
checkpoint.dir (`--force-unlock`), SIGTERM / `train.stop_after` save-and-exit-0 and the
non-finite guard (`train.step`'s agreement all-reduce). `metrics.jsonl` (step, loss, lr,
grad_norm, images_per_sec, data_skipped, nonfinite_skipped, + top1/top5 when evaluated).
The loop itself is still its own, not `Trainer.fit` (see issue 12). Exact resume: every random draw of step s (batch order, crops, flips, Mixup,
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
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any



class FinetuneError(ValueError):
    """Bad input for fine-tuning; one line, exit 2."""


# ----------------------------------------------------------------------------- pieces


def build_classifier(cfg):
    """(encoder with a num_classes head, info). The pretrained window becomes
    pretrained_window_sizes for a SwinV2 fine-tuned at another window."""
    from gigamim.train.load_encoder import EncoderLoadError, build_encoder, read_weights, run_model_config

    m, ft = cfg.model, cfg.finetune
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
                seed: int, ft, img_size: int):
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


def run(cfg, resume_from, force_unlock: bool = False) -> int:
    """resume_from: a `train.main.ResumePoint` (resolved and checked by `main`) or None."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gigamim.launch.dist import init_distributed
    from gigamim.train.labelled import LabelError, load_labelled
    from gigamim.train.signals import Deadline, StopFlag
    from gigamim.train.trainer import take_run_lock

    deadline = Deadline(cfg.train.stop_after)  # the clock starts with the run
    ft = cfg.finetune
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
    model, info = build_classifier(cfg)
    # Bad input is refused above, before any process group exists.
    d = init_distributed()
    rank = d.rank
    lock = take_run_lock(cfg.checkpoint.dir, rank, force_unlock)  # the same lock as `gigamim pretrain`
    try:
        # SIGTERM/SIGINT and train.stop_after: save at the next step boundary, exit 0 (as pretrain).
        with StopFlag() as signalled:
            return _train(cfg, ft, resume_from, model, info, d, train_x, train_y, val, signalled, deadline)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg, ft, resume_from, model, info, d, train_x, train_y, val, signalled, deadline) -> int:
    import numpy as np
    import torch

    import deepspeed
    import torch.distributed as dist
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from gigamim import __version__
    from gigamim.checkpoint.save import save as save_checkpoint
    from gigamim.config import gradient_accumulation_steps
    from gigamim.data.transforms import normalize_on_device
    from gigamim.models.param_groups import layer_decay, param_groups
    from gigamim.train.deepspeed_init import build_ds_config, resolve_precision, zero_stage
    from gigamim.train.metrics import MetricsLogger
    from gigamim.train.optim import lr_at, peak_lr
    from gigamim.train.step import NonFiniteGuard, agree
    from gigamim.train.trainer import EXIT_NONFINITE

    rank, world = d.rank, d.world_size
    device = d.device
    on_gpu = device.type == "cuda"
    precision = resolve_precision(cfg, on_gpu)
    accum = gradient_accumulation_steps(cfg, world)
    micro_bs = cfg.train.micro_batch_size
    ds_config = build_ds_config(cfg, world, on_gpu, peak_lr=peak_lr(cfg))
    if resume_from is not None and resume_from.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
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
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    if resume_from:
        path, client = engine.load_checkpoint(str(resume_from.root), tag=resume_from.tag)
        if path is None:
            raise FinetuneError(f"DeepSpeed could not load {resume_from.tag_dir}")
        state = (client or {}).get("gigamim_finetune", {})
        start = int(state.get("step", 0))
        guard.total = int(state.get("nonfinite_total", 0))
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        if rank == 0:
            print(f"gigamim finetune: resumed from {resume_from.tag_dir} at step {start}", flush=True)

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
    stop = min(cfg.train.max_steps, cfg.train.stop_at_step or cfg.train.max_steps)
    config_yaml = cfg.dump()
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
        client = {"gigamim_finetune": {"step": step, "nonfinite_total": guard.total,
                                       **({"ema": ema.state_dict()} if ema is not None else {})}}
        meta = {"step": step, "model": cfg.model.name, "img_size": cfg.model.img_size, "world_size": world,
                "zero_stage": stage, "precision": precision, "version": __version__, "task": "finetune"}
        save_checkpoint(engine, cfg.checkpoint.dir, step, client, meta, config_yaml, cfg.checkpoint.keep_last)

    engine.train()
    def say(message: str, err: bool = False) -> None:
        if rank == 0:
            print(message, file=sys.stderr if err else sys.stdout, flush=True)

    for step in range(start, stop):
        losses, attempt, stopping = [], 0, False
        while len(losses) < accum:
            # micro == the micro-batch index unless one was dropped: the draws follow (step, micro)
            micro, attempt = attempt, attempt + 1
            torch.manual_seed(derive_seed(cfg.train.seed, step, micro, rank, 5))  # drop path
            np.random.seed(derive_seed(cfg.train.seed, step, micro, rank, 7))  # timm Mixup draws from numpy
            xb, yb = train_batch(train_x, train_y, step, micro, accum, rank, world, micro_bs, cfg.train.seed, ft,
                                 cfg.model.img_size)
            x = normalize_on_device(xb, device, dtype)
            y = yb.to(device)
            if mixup is not None:
                x, y = mixup(x, y)
            loss = criterion(engine(x).float(), y)
            # train.step's one agreement all-reduce: finite loss on every rank, and a stop request
            bad, stop_now = agree([0.0 if torch.isfinite(loss.detach()).all() else 1.0,
                                   1.0 if (signalled or deadline) else 0.0], device)
            stopping = stopping or stop_now > 0
            guard.record(bad > 0)
            if bad > 0:  # dropped before backward on every rank: no rank applies it
                say(f"gigamim finetune: non-finite loss at step {step}; micro-batch skipped "
                    f"({guard.in_a_row} in a row)", err=True)
                if guard.exhausted:
                    say(f"gigamim finetune: stopping: {guard.in_a_row} non-finite losses in a row "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}). Lower optim.lr, check the "
                        "data, or resume from the last checkpoint. No checkpoint written.", err=True)
                    if logger is not None:
                        logger.close()
                    return EXIT_NONFINITE
                continue
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if ema is not None:
            ema.update(engine.module, step=step)
        steps_since += 1
        done = step + 1
        record = None
        if rank == 0 and (done % max(1, cfg.log.every_steps) == 0 or done == stop or stopping):
            now = time.time()
            gn = engine.get_global_grad_norm()
            record = {"step": done, "loss": float(np.mean(losses)), "lr": lr_at(step, cfg),  # x layer scale per group
                      "grad_norm": float(gn) if gn is not None else None,
                      "images_per_sec": steps_since * cfg.train.global_batch_size / max(1e-9, now - t_last),
                      "data_skipped": 0, "nonfinite_skipped": guard.total}
            t_last, steps_since = now, 0
        if (ft.eval_every_steps and done % ft.eval_every_steps == 0) or done == stop:
            ev = evaluate(done)
            if rank == 0 and ev:
                record = dict(record or {"step": done}, **ev)
                print(f"gigamim finetune: step {done} top-1 {ev['top1']:.4f} top-5 {ev['top5']:.4f}", flush=True)
        if record is not None and logger is not None:
            logger.log(record)
        if stopping or (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or done == stop:
            save(done)
        if stopping:
            why = (f"got signal {signalled.signum}" if signalled else
                   f"train.stop_after={cfg.train.stop_after} reached" if deadline else "another rank got a signal")
            say(f"gigamim finetune: {why}; checkpoint saved at step {done}, exiting. Continue with --resume auto.")
            if logger is not None:
                logger.close()
            return 0
    if stop == cfg.train.max_steps:
        export_finetuned(engine.module if ema is None else ema.module, cfg, info, stop, rank)
    if logger is not None:
        logger.close()
    return 0


def _load_size(img_size: int) -> int:
    return int(round(img_size / 0.875))  # train crops come from a slightly larger resize


def export_finetuned(module, cfg, info: dict, step: int, rank: int) -> None:
    """Rank 0 writes encoder + head as timm-keyed safetensors (collective gather under ZeRO-3)."""
    import deepspeed
    import torch

    from gigamim import __version__
    from gigamim.checkpoint import safetensors_io
    from gigamim.models.timm_compat import read_arch, timm_kwargs

    ft = cfg.finetune
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
                "gigamim_config": cfg.dump(), "timm_family": arch["family"], "timm_kwargs": json.dumps(kw),
                "num_classes": str(ft.num_classes)}
    safetensors_io.save(str(out), sd, metadata, max_shard_size=None, dtype=torch.float32, overwrite=True)
    print(f"gigamim finetune: wrote {out} (timm {arch['family']} kwargs {kw})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gigamim finetune", description="Fine-tune an encoder for classification "
                                "under DeepSpeed (layer decay, Mixup/CutMix, EMA, evaluation, exact resume).")
    p.add_argument("--config", help="YAML (a packaged name like finetune_swinv2_base or a path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in checkpoint.dir) or a checkpoint path")
    p.add_argument("--force-unlock", action="store_true",
                   help="take checkpoint.dir's run lock even though another run (on another host) holds it")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        from gigamim.config import load_config, validate

        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        from gigamim.launch.dist import detect_launch
        from gigamim.train.main import check_compatible, resolve_resume

        launch = detect_launch()
        validate(cfg, world_size=launch.world_size, check_files=False)  # data.* is pretraining's
        if not cfg.finetune.train_shards:
            raise FinetuneError("finetune.train_shards is empty: give labelled shards (make-shards of an ImageFolder)")
        if cfg.model.window_size is None:
            from gigamim.models.registry import model_defaults

            cfg.model.window_size = model_defaults(cfg.model.name).get("window_size")
        say = (lambda msg: print(msg, flush=True)) if launch.rank == 0 else (lambda msg: None)
        # The resolver and checks of `gigamim pretrain --resume` (complete tag, world size or
        # universal, same model), before any rank builds a model.
        resume_from = resolve_resume(args.resume, cfg.checkpoint.dir, launch.world_size, say=say)
        if resume_from is not None:
            check_compatible(resume_from.meta, cfg, resume_from.tag_dir, say=say)
        return run(cfg, resume_from, force_unlock=args.force_unlock)
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
