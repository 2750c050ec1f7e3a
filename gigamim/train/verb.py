"""One runner for the training verbs (`gigamim pretrain`, `gigamim finetune`).

A verb is a name, a description and its task; everything else is the same for every verb:
the command line, the config (load, `--print-config`, validation, the engine's template),
the resume point (resolved once, by the same resolver and completeness check as `gigamim
consolidate`, and checked against this run), the task's own checks, then the `Trainer`.

Everything that can be refused is refused before any rank joins a process group, builds a
model or reads a shard: one line, exit 2, printed by rank 0 (every rank meets it alike). A
lost peer is one line from rank 0 and exit 1; bad data met by one rank is that rank's line.

The same command runs as one process, under `gigamim launch`, under the `deepspeed` launcher
(`deepspeed --num_gpus N --module gigamim pretrain ...`) and under torchrun; gloo on CPU,
nccl on GPUs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from gigamim.checkpoint.layout import CheckpointError
from gigamim.config import Config, ConfigError

EXIT_BAD_INPUT = 2
EXIT_PEER_LOST = 1


@dataclass(frozen=True)
class Verb:
    name: str  # "pretrain": the command, the task name checkpoints record
    description: str
    make_task: Callable[[Config], object]  # the verb's task (`train.tasks`), before any process group
    data_shards: bool = True  # whether `data.shards` is this verb's data (validated as files)


def build_parser(verb: Verb) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"gigamim {verb.name}", description=verb.description)
    p.add_argument("--config", help="YAML file, or a packaged config name (demo, simmim_swinv2_base_192, "
                                    "finetune_swinv2_base, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--resume", default=None,
                   help="'auto' (newest complete checkpoint in checkpoint.dir, else start fresh), "
                        "a checkpoint folder, or one tag folder (also a universal one)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh although checkpoint.dir / log.dir hold another run: its tags, `latest` and "
                        "log outputs are moved into replaced/<time>/ beside them (never deleted)")
    p.add_argument("--force-unlock", action="store_true",
                   help="take checkpoint.dir's run lock even though another run (on another host) holds it")
    p.add_argument("--verbose", action="store_true",
                   help="show every library warning and DeepSpeed's INFO lines on every rank (also GIGAMIM_VERBOSE=1)")
    # The deepspeed launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run(verb: Verb, argv: list[str] | None = None) -> int:
    args = build_parser(verb).parse_args(argv)
    from gigamim.config import load_config
    from gigamim.data.errors import DataError
    from gigamim.runtime.dist import detect_launch, peer_lost
    from gigamim.train.classifier import FinetuneError

    launch = detect_launch()
    rank0 = launch.rank == 0
    say = (lambda msg: print(msg, flush=True)) if rank0 else (lambda msg: None)
    from gigamim.runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose, rank=launch.rank)
    try:
        cfg = load_config(args.config, args.overrides)
        from gigamim.train.precision import pick_for_device

        # What the task's inputs decide (fine-tuning: the model from the weights, the classes
        # from the shards) and what `auto` means on this device, before anything is checked or
        # printed: --print-config shows the config that would run.
        task = verb.make_task(cfg)
        configured = task.configure()
        device_line = pick_for_device(cfg)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        from gigamim.train.optim import describe_lr
        from gigamim.train.preflight import preflight
        from gigamim.train.trainer import Trainer

        # Every refusal the config and the files allow, before any process group: a refusal is
        # the one line printed (exit 2); what was taken from the weights, the shards and the
        # device is said once the run is going to start.
        preflight(cfg, task, world_size=launch.world_size, resume=args.resume, overwrite=args.overwrite,
                  force_unlock=args.force_unlock, check_files=verb.data_shards)
        for line in configured + ([device_line] if device_line else []) + [describe_lr(cfg)]:
            say(f"gigamim {verb.name}: {line}")
        try:
            return Trainer(cfg, task, resume=args.resume, force_unlock=args.force_unlock,
                           overwrite=args.overwrite).run()
        except RuntimeError as e:
            if not peer_lost(e):
                raise
            # The rank that died printed (or could not print) its own reason; the survivors
            # say one line, not a traceback per rank. Rank 0 speaks unless it is the dead one.
            if rank0:
                print(f"gigamim {verb.name}: another rank exited ({str(e).splitlines()[0][:200]}); "
                      "stopping. Resume with --resume auto", file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
    except (ConfigError, CheckpointError, FinetuneError) as e:
        if rank0:
            kind = "config" if isinstance(e, ConfigError) else "checkpoint" if isinstance(e, CheckpointError) else "input"
            print(f"gigamim {verb.name}: {kind} error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except DataError as e:
        # Bad data (a sample without a label, a label >= num_classes, no readable image) is
        # met by the rank reading it, often in a DataLoader worker (`data.errors`): that rank says so.
        where = f" (rank {launch.rank})" if launch.world_size > 1 else ""
        print(f"gigamim {verb.name}: data error{where}: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def check_before_launch(verb: Verb, argv: list[str], world_size: int) -> int | None:
    """`gigamim launch` runs this before it starts any rank: the verb's pre-flight for a job of
    `world_size` ranks. Returns 2 after printing the one-line refusal, None when the ranks may
    start (they run the same checks again: the files may change, and a rank sees its own node).
    Touches nothing: no lock taken, no folder created."""
    args = build_parser(verb).parse_args(argv)
    if args.print_config:
        return None
    from gigamim.config import load_config
    from gigamim.runtime.quiet import quiet_libraries
    from gigamim.train.classifier import FinetuneError
    from gigamim.train.preflight import preflight

    quiet_libraries(verbose=args.verbose, rank=0)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, verb.make_task(cfg), world_size=world_size, resume=args.resume, overwrite=args.overwrite,
                  force_unlock=args.force_unlock, check_files=verb.data_shards)
    except (ConfigError, CheckpointError, FinetuneError) as e:
        kind = "config" if isinstance(e, ConfigError) else "checkpoint" if isinstance(e, CheckpointError) else "input"
        print(f"gigamim {verb.name}: {kind} error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return None
