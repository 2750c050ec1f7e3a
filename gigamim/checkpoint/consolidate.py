"""`gigamim consolidate`: a training checkpoint -> fp32 safetensors (DeepSpeed ZeRO 1/2/3 -> also universal).

    gigamim consolidate CKPT_DIR OUT [--tag TAG] [--max-shard-size 5GB] [--force]
    gigamim consolidate CKPT_DIR --universal [--tag TAG] [OUT]

CKPT_DIR is a checkpoint folder (holding `latest` and one folder per tag) or a tag folder
itself. Without --tag the tag is the one `--resume` would pick (`checkpoint.layout.resolve`:
`latest` if it names a complete tag, else the newest complete tag, said on stderr).
The checkpoint is checked for completeness before anything is written
(`checkpoint.check`); the weights stream through the reader of the tag's format
(`checkpoint.weights`: DeepSpeed's ZeRO files or torch.distributed.checkpoint files) into
`checkpoint.safetensors_io`, with the same keys and metadata for either; `--universal` is
`checkpoint.universal` (DeepSpeed tags only: a DCP tag loads on any world size as it is).
"""

from __future__ import annotations

import argparse
import os
import sys

from gigamim.checkpoint.check import open_checkpoint
from gigamim.checkpoint.layout import CheckpointError
from gigamim.checkpoint.universal import to_universal
from gigamim.checkpoint.weights import lazy_fp32_state_dict, metadata_for


def consolidate(ckpt_dir: str, out: str, tag: str | None = None, max_shard_size: str | int | None = "5GB",
                overwrite: bool = False, quiet: bool = True) -> list[str]:
    """Check, then stream the fp32 weights of a checkpoint tag into safetensors at `out`
    (a `.safetensors` file or an HF-style folder). Returns the written files."""
    return consolidate_tag(open_checkpoint(ckpt_dir, tag), out, max_shard_size, overwrite, quiet)


def consolidate_tag(info, out: str, max_shard_size: str | int | None = "5GB", overwrite: bool = False,
                    quiet: bool = True) -> list[str]:
    """`consolidate` of a tag already checked (`check.open_checkpoint`)."""
    from gigamim.checkpoint import safetensors_io

    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"output {out} already exists; remove it or pass --force to replace it")
    sd = lazy_fp32_state_dict(info, quiet=quiet)
    import torch

    return safetensors_io.save(out, sd, metadata_for(info, "simmim"), max_shard_size=max_shard_size,
                               dtype=torch.float32, overwrite=overwrite, progress=not quiet or sys.stderr.isatty())


def describe_tag(info) -> str:
    """Which tag, in words: `step_00000120 of runs/x/checkpoints (step 120, swinv2_nano, ZeRO-3 from 2 ranks)`."""
    saver = (f"ZeRO-{info.zero_stage}" if info.zero_stage is not None else "torch.distributed.checkpoint")
    facts = [f"step {info.meta['step']}" if info.meta.get("step") is not None else None,
             info.meta.get("model"), f"{saver} from {info.world_size} rank(s)"]
    return f"{info.tag} of {info.root} ({', '.join(f for f in facts if f)})"


def closing_lines(info, files: list[str], out: str) -> list[str]:
    """What `gigamim consolidate` did (which tag) and what to run next."""
    return [f"consolidated {describe_tag(info)}",
            f"wrote {len(files)} fp32 file(s): " + ", ".join(files),
            f"next: `gigamim export {out} timm.safetensors --format timm` (timm), or "
            f"`gigamim finetune --config CONFIG --set finetune.weights={out}`"]


def universal_lines(out: str) -> list[str]:
    """What `gigamim consolidate --universal` wrote and how a run resumes from it."""
    tag = os.path.basename(out)
    tag = tag[:-len("_universal")] if tag.endswith("_universal") else tag
    return [f"universal checkpoint of {tag}: {out}",
            f"resume it on any world size: `gigamim pretrain --config CONFIG --resume {out}` (the trainer loads "
            "it with DeepSpeed's load_universal)"]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gigamim consolidate",
        description="Consolidate a training checkpoint (DeepSpeed ZeRO 1/2/3, or torch.distributed.checkpoint "
                    "from train.engine=fsdp2) into fp32 safetensors (or, with --universal, a DeepSpeed checkpoint "
                    "into DeepSpeed's universal format to resume on another world size).")
    p.add_argument("ckpt_dir", help="checkpoint folder (holding 'latest' and tag folders) or a tag folder")
    p.add_argument("out", nargs="?", help="output: a .safetensors file, or a folder (model.safetensors, or "
                   "shards + model.safetensors.index.json above --max-shard-size). With --universal: the "
                   "universal folder (default CKPT_DIR/<TAG>_universal)")
    p.add_argument("--tag", help="checkpoint tag (default: the one --resume would pick: 'latest' if it names a "
                   "complete tag, else the newest complete one)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard when OUT is a folder "
                   "(default 5GB; units B, KB, MB, GB, KiB, MiB, GiB)")
    p.add_argument("--universal", action="store_true", help="write DeepSpeed's universal checkpoint instead")
    p.add_argument("--workers", type=int, default=1, help="--universal: worker processes (default 1)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's own progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.universal:
            out = to_universal(args.ckpt_dir, args.tag, args.out, overwrite=args.force, workers=args.workers,
                               quiet=not args.verbose)
            print("\n".join(universal_lines(out)))
            return 0
        if not args.out:
            p.error("OUT is required (or pass --universal)")
        try:
            from gigamim.sizes import parse_size

            parse_size(args.max_shard_size)
        except ValueError as e:
            p.error(str(e))
        info = open_checkpoint(args.ckpt_dir, args.tag)
        files = consolidate_tag(info, args.out, args.max_shard_size, overwrite=args.force, quiet=not args.verbose)
        print("\n".join(closing_lines(info, files, args.out)))
        return 0
    except (CheckpointError, FileExistsError) as e:
        print(f"gigamim consolidate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
