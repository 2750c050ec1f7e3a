"""`gigamim pretrain`: SimMIM pretraining (a SwinV2 by default) under the configured engine
(DeepSpeed ZeRO-3 by default). The verb is its task; the rest is `train.verb`."""

from __future__ import annotations

import sys

from gigamim.train.verb import Verb, run
from gigamim.train.verb import build_parser as verb_parser


def _task(cfg):
    from gigamim.train.tasks import PretrainTask

    return PretrainTask(cfg)


VERB = Verb("pretrain", "SimMIM pretraining of a SwinV2 (or ViT / Swin V1) encoder.", _task)


def build_parser():
    return verb_parser(VERB)


def main(argv: list[str] | None = None) -> int:
    return run(VERB, argv)


if __name__ == "__main__":
    sys.exit(main())
