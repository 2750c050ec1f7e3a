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

import sys

from gigamim.train.verb import Verb, run
from gigamim.train.verb import build_parser as verb_parser


def _task(cfg):
    from gigamim.train.tasks import FinetuneTask

    return FinetuneTask(cfg)


VERB = Verb("finetune", "Fine-tune an encoder for classification (layer decay, Mixup/CutMix, EMA, evaluation, "
            "exact resume).", _task, data_shards=False)  # data.shards is pretraining's; finetune.* has its own


def build_parser():
    return verb_parser(VERB)


def main(argv: list[str] | None = None) -> int:
    return run(VERB, argv)


if __name__ == "__main__":
    sys.exit(main())
