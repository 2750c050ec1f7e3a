"""`gigamim pretrain`: SimMIM pretraining of a SwinV2 under DeepSpeed (ZeRO-3 by default).

The same command runs as one process, under the `deepspeed` launcher
(`deepspeed --num_gpus N --module gigamim pretrain ...`), under `gigamim launch` and under
torchrun; gloo on CPU, nccl on GPUs.

Everything that can be refused is refused here, before any rank builds a model or reads a
shard: the config (keys, values, batch split, shard files, the DeepSpeed template) and the
checkpoint to resume (resolved once, by the same resolver and completeness check as
`gigamim consolidate`). Errors are one line, exit 2, printed by rank 0 only.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from gigamim.checkpoint.layout import CheckpointError
from gigamim.config import Config, ConfigError, load_config, validate

EXIT_CONFIG_ERROR = 2
EXIT_PEER_LOST = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim pretrain", description="SimMIM pretraining of SwinV2 under DeepSpeed.")
    p.add_argument("--config", help="YAML file, or a packaged config name (demo, simmim_swinv2_base_192, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in checkpoint.dir, else start fresh), "
                        "a checkpoint folder, or one tag folder (also a universal one)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--force-unlock", action="store_true",
                   help="take checkpoint.dir's run lock even though another run (on another host) holds it")
    # The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


@dataclass(frozen=True)
class ResumePoint:
    root: Path
    tag: str
    universal: bool  # DeepSpeed's universal format: loads on any world size
    meta: dict

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def resolve_resume(spec: str | None, ckpt_dir: str, world_size: int, say=print) -> ResumePoint | None:
    """`--resume` -> the checked tag to load, or None to start fresh ('auto' with nothing saved)."""
    if not spec:
        return None
    from gigamim.checkpoint.check import resolve_checked
    from gigamim.checkpoint.layout import is_universal, read_meta

    found = resolve_checked(ckpt_dir if spec == "auto" else spec, missing_ok=spec == "auto")
    if found is None:
        say(f"gigamim: no checkpoint in {ckpt_dir}; starting from step 0")
        return None
    resolved, _ = found
    if resolved.note:
        say(f"gigamim: warning: {resolved.note}")
    universal = is_universal(resolved.tag_dir)
    meta = read_meta(resolved.tag_dir)
    saved_world = meta.get("world_size")
    if not universal and saved_world is not None and saved_world != world_size:
        raise CheckpointError(
            f"{resolved.tag_dir} was saved by {saved_world} ranks and this run has {world_size}: convert it first "
            f"(`gigamim consolidate {resolved.root} --tag {resolved.tag} --universal`) and resume from "
            f"{resolved.tag_dir}_universal")
    return ResumePoint(resolved.root, resolved.tag, universal, meta)


def check_compatible(meta: dict, cfg: Config, tag_dir: Path, say=print, task: str = "pretrain") -> None:
    """Before any weight is read: the tag's model must be this run's model (else one line
    instead of a wall of missing state_dict keys after DeepSpeed has read every partition).
    SwinV2 weights follow another image size or window (the position bias is a continuous
    MLP of relative offsets and the index tables are rebuilt), so those are warnings."""
    saved_task = meta.get("task", "pretrain")  # tags before 0.2 are all pretraining's
    if saved_task != task:
        raise CheckpointError(f"{tag_dir} is a {saved_task} checkpoint and this is `gigamim {task}`: give "
                              f"{'finetune.weights' if task == 'finetune' else 'another checkpoint.dir'} instead "
                              "of --resume, or resume it with the verb that wrote it")
    if task == "finetune" and meta.get("num_classes") not in (None, cfg.finetune.num_classes):
        raise CheckpointError(f"{tag_dir} has a {meta['num_classes']}-class head and this run has "
                              f"finetune.num_classes={cfg.finetune.num_classes}: resume with --set "
                              f"finetune.num_classes={meta['num_classes']}, or start fresh in another checkpoint.dir")
    saved = meta.get("model")
    if saved and saved != cfg.model.name:
        raise CheckpointError(f"{tag_dir} holds model {saved} and this run is model.name={cfg.model.name}: "
                              f"resume with --set model.name={saved}, or start fresh in another checkpoint.dir")
    for key, now in (("img_size", cfg.model.img_size), ("window_size", cfg.model.window_size)):
        old = meta.get(key)
        if old is not None and now is not None and old != now:
            say(f"gigamim: warning: model.{key} changed since {tag_dir.name}: {old} -> {now}; "
                f"the weights follow (SwinV2's position bias is continuous), the numbers will not be those of {old}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gigamim.runtime.dist import detect_launch, peer_lost

    launch = detect_launch()
    rank0 = launch.rank == 0
    try:
        cfg: Config = load_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        from gigamim.train.deepspeed_init import load_template

        validate(cfg, world_size=launch.world_size)
        load_template(cfg.deepspeed.config)
        say = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
        resume = resolve_resume(args.resume, cfg.checkpoint.dir, launch.world_size, say=say)
        from gigamim.train.trainer import Trainer, record_window_size

        if resume is not None:
            record_window_size(cfg)
            check_compatible(resume.meta, cfg, resume.tag_dir, say=say)

        try:
            return Trainer(cfg, resume=resume, force_unlock=args.force_unlock).run()
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            # The rank that died printed (or could not print) its own reason; the survivors
            # say one line, not a traceback per rank. Rank 0 speaks unless it is the dead one.
            if rank0:
                print(f"gigamim pretrain: another rank exited ({str(e).splitlines()[0][:200]}); "
                      "stopping. Resume with --resume auto", file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
    except (ConfigError, CheckpointError) as e:
        # Raised before any rank has built a model or touched data, on every rank alike.
        if rank0:
            kind = "config" if isinstance(e, ConfigError) else "checkpoint"
            print(f"gigamim pretrain: {kind} error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
