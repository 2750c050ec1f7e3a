"""`gigamim finetune`: classification fine-tuning of a (SimMIM-)pretrained encoder on DeepSpeed.

    gigamim finetune --config finetune_swinv2_base.yaml [--set key=value ...] [--resume auto|PATH]
    deepspeed --num_gpus N --module gigamim finetune --config ...

The run config is the pretraining one (model / train / optim / checkpoint / log / deepspeed
sections, `gigamim.config`; data.num_workers / image_key / cache_* apply to the labelled
shards) plus its `finetune:` section (`config.FinetuneConfig`: weights, num_classes,
labelled train/val shards, layer-wise LR decay, Mixup/CutMix, label smoothing, EMA,
evaluation period). The run is `gigamim pretrain`'s `Trainer` with `tasks.FinetuneTask`:
the same ZeRO stages, precision, run lock (`--force-unlock`), resume resolver and checks,
exact resume (data position, per-rank RNG: crops, flips, Mixup draws, drop path),
SIGTERM / `train.stop_after` save-and-exit-0, non-finite guard, metrics (+ top1/top5 when
evaluated) and progress bar. Data: `data.loader.ClassificationLoader` streams the labelled
shards (`gigamim make-shards` of an ImageFolder writes `.cls` members).

SwinV2 fine-tuned at a larger window than pretraining: `model.window_size` is the new window;
`model.pretrained_window_sizes` defaults to the window the weights were trained with (their
recorded config), which scales the CPB coordinates as in the official recipe. Swin V1 tables
and ViT position embeddings are interpolated (timm). At the end rank 0 writes
`<checkpoint.dir>/finetuned.safetensors` (encoder + head, timm keys, metadata with the timm
class arguments; the EMA weights when finetune.ema) that timm loads strictly with its head.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class FinetuneError(ValueError):
    """Bad input for fine-tuning; one line, exit 2."""


def build_classifier(cfg, keep_state: bool = False):
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
        return build_encoder(m.name, ft.weights or None, overrides, num_classes=ft.num_classes, keep_state=keep_state)
    except EncoderLoadError as e:
        raise FinetuneError(str(e)) from None


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
    from gigamim.checkpoint.layout import CheckpointError
    from gigamim.config import ConfigError
    from gigamim.runtime.dist import detect_launch, peer_lost

    launch = detect_launch()
    try:
        from gigamim.config import load_config, validate

        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        from gigamim.train.deepspeed_init import load_template
        from gigamim.train.main import check_compatible, resolve_resume

        validate(cfg, world_size=launch.world_size, check_files=False)  # data.shards is pretraining's
        load_template(cfg.deepspeed.config)
        ft = cfg.finetune
        if not ft.train_shards:
            raise FinetuneError("finetune.train_shards is empty: give labelled shards (make-shards of an ImageFolder)")
        if (ft.mixup > 0 or ft.cutmix > 0) and cfg.train.micro_batch_size % 2:
            raise FinetuneError(f"Mixup/CutMix pair the images of a micro-batch: train.micro_batch_size="
                                f"{cfg.train.micro_batch_size} must be even (or set finetune.mixup=0 finetune.cutmix=0)")
        from gigamim.train.trainer import Trainer, record_window_size

        record_window_size(cfg)
        say = (lambda msg: print(msg, flush=True)) if launch.rank == 0 else (lambda msg: None)
        # The resolver and checks of `gigamim pretrain --resume` (complete tag, world size or
        # universal, same model and task), before any rank builds a model.
        resume_from = resolve_resume(args.resume, cfg.checkpoint.dir, launch.world_size, say=say)
        if resume_from is not None:
            check_compatible(resume_from.meta, cfg, resume_from.tag_dir, say=say, task="finetune")
        from gigamim.train.tasks import FinetuneTask

        # Everything that can be refused is refused here, before any process group exists.
        task = FinetuneTask(cfg)
        task.check_data()
        task.prepare()
        try:
            return Trainer(cfg, resume=resume_from, force_unlock=args.force_unlock, task=task).run()
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            if launch.rank == 0:
                print(f"gigamim finetune: another rank exited ({str(e).splitlines()[0][:200]}); stopping. "
                      "Resume with --resume auto", file=sys.stderr, flush=True)
            return 1
    except (FinetuneError, ConfigError, CheckpointError) as e:
        # Config, weights and checkpoint problems: every rank meets them alike.
        if launch.rank == 0:
            print(f"gigamim finetune: error: {e}", file=sys.stderr, flush=True)
        return 2
    except ValueError as e:
        if not str(e).startswith("data:"):
            raise
        # Bad labelled data (a sample without a label, a label >= num_classes) is met by the
        # rank reading it: that rank says so.
        where = f" (rank {launch.rank})" if launch.world_size > 1 else ""
        print(f"gigamim finetune: error{where}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
